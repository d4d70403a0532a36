"""Score predictions with uncertainty against reference labels."""

from __future__ import annotations

import numpy as np

from .data.io import full_to_voigt
from .errors import DataError
from .uq.metrics import evaluate_predictions, prediction_arrays, regression_metrics


def reference_arrays(structures) -> tuple[np.ndarray | None, list | None]:
    """Reference energies (N,) eV and forces list of (n_i, 3) eV/A, None where any is missing."""
    energies = None
    if structures and all(s.energy is not None for s in structures):
        energies = np.array([s.energy for s in structures], dtype=float)
    forces = None
    if structures and all(s.forces is not None for s in structures):
        forces = [np.asarray(s.forces, dtype=float) for s in structures]
    return energies, forces


def evaluate_structures(model, structures, samples: int | None = None, seed: int = 0,
                        progress: bool = False, source: str = "input", split: bool = False) -> tuple[dict, dict]:
    """Predict and score labelled structures.

    ``split``: under ``torchrun`` (every rank calling this) the structures are split over the
    ranks and rank 0 gets the results (the other ranks (None, None)).
    Returns (metrics, arrays): metrics as in ``blip evaluate --json``; arrays
    ``{quantity: {"ref", "pred", "std"}}`` flat numpy arrays (std = standard deviation; forces also
    ``novelty``, each component's atom's log feature distance, where the prediction has it)
    for plots, reports and recalibration. ``stress`` (Voigt components, eV/A^3) is scored
    when every structure is periodic and has a stress label.
    """
    with_stress = bool(structures) and all(s.stress is not None for s in structures)
    predict = model.predict_distributed if split else model.predict
    pred = predict([s.atoms for s in structures], samples=samples, seed=seed, progress=progress, source=source,
                   stress=with_stress, novelty=True)
    if pred is None:  # a rank other than 0 of a distributed run: rank 0 scores the gathered predictions
        return None, None
    _check_finite(pred, structures, source)
    ref_e, ref_f = reference_arrays(structures)
    n_atoms = np.array([len(s.atoms) for s in structures])
    args = (ref_e, pred["energy"], pred["energy_std"], ref_f, pred["forces"], pred["forces_std"], n_atoms)
    metrics, arrays = evaluate_predictions(*args), prediction_arrays(*args, pred.get("atom_novelty"))
    if with_stress:
        ref = full_to_voigt(np.stack([s.stress for s in structures])).ravel()
        arrays["stress"] = {"ref": ref, "pred": pred["stress"].ravel(), "std": pred["stress_std"].ravel()}
        metrics["stress"] = regression_metrics(ref - arrays["stress"]["pred"], arrays["stress"]["std"])
    return metrics, arrays


def nonfinite_structures(pred: dict) -> list[int]:
    """Positions of the structures in a ``predict`` result whose prediction or spread (energy,
    forces, stress) is not finite: far outside its training data a float32 network can overflow."""
    keys = [k for k in ("energy", "energy_std", "forces", "forces_std", "stress", "stress_std") if k in pred]
    return [i for i in range(len(pred["energy"])) if not all(np.all(np.isfinite(pred[k][i])) for k in keys)]


def _check_finite(pred: dict, structures, source: str) -> None:
    """Raise DataError naming the structures whose prediction or spread is not finite, instead of
    failing inside a metric."""
    bad = [structures[i].index for i in nonfinite_structures(pred)]
    if bad:
        shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(source, f"the prediction or its spread is not finite for {len(bad)} structure(s) "
                                f"(structures {shown}): the model overflowed far outside its training data; "
                                "leave them out, or train with model.dtype: float64")
