"""Post-hoc recalibration of predicted standard deviations by one scale factor."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_scale", "apply_scale", "recalibrate"]


def fit_scale(err, sigma) -> float:
    """Scale factor s minimising the Gaussian NLL of ``err`` under N(0, (s*sigma)^2).

    ``err`` are residuals (reference - prediction) and ``sigma`` predicted
    **standard deviations** in the same unit (eV or eV/Angstrom).  Closed
    form ``s = sqrt(mean((err/sigma)^2))`` over entries with sigma > 0; the
    result multiplies standard deviations (s^2 multiplies variances) and is
    dimensionless.  Returns 1.0 if no entry has sigma > 0 or if every
    residual is 0 (no information about the scale).
    """
    e = np.asarray(err, dtype=np.float64).ravel()
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if e.shape != s.shape:
        raise ValueError(f"residuals ({e.size}) and sigma ({s.size}) differ in length")
    keep = np.isfinite(e) & np.isfinite(s) & (s > 0)
    if not np.any(keep):
        return 1.0
    z = e[keep] / s[keep]
    scale = math.sqrt(float(np.mean(z * z)))
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def apply_scale(sigma, s: float):
    """Return standard deviations multiplied by ``s`` (variances would scale by s^2).

    Works on an array or on a list of arrays (e.g. per-structure forces_std
    of shape (n_i, 3)); inputs are not modified.
    """
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"scale factor must be a positive finite number, got {s}")
    if isinstance(sigma, (list, tuple)):
        return [np.asarray(x, dtype=np.float64) * s for x in sigma]
    return np.asarray(sigma, dtype=np.float64) * s


def recalibrate(model, structures, samples: int | None = None, seed: int = 0,
                progress: bool = False, source: str = "validation") -> dict:
    """Fit and store one standard-deviation factor per target (energy, forces; stress when every
    structure has a stress label) on labelled data.

    ``model`` is a :class:`blip.predictor.BlipModel`; its previous calibration is discarded.
    Returns the factors, also stored in ``model.calibration``.
    """
    from ..evaluate import evaluate_structures

    model.calibration = {"energy": 1.0, "forces": 1.0}
    _, arrays = evaluate_structures(model, structures, samples=samples, seed=seed,
                                    progress=progress, source=source)
    model.calibration = {q: fit_scale(arrays[q]["ref"] - arrays[q]["pred"], arrays[q]["std"])
                         for q in ("energy", "forces", "stress") if q in arrays}
    return dict(model.calibration)
