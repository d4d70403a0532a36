"""Other forms of post-hoc recalibration than one scale factor, on the models of a ``blip bench`` run.

    OMP_NUM_THREADS=1 python benchmarks/recalibration_forms.py RUNS_DIR --protocol energy-split \
        --sets ethanol,acac --seeds 0,1,2 [--method blip] [--data ../shared/data]

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seedS/SET/METHOD/model_calibrated.pt``).
For every (set, seed) the model predicts its validation split and test sets without calibration
(force spreads per atom or per component as its recalibration chose), then four maps from the raw
force sigma to a calibrated one are fitted on the validation split only, by Gaussian NLL, and scored
on every test set (NLL per force component in nats, 95 % coverage):

* ``scale``: ``s sigma`` (what ``blip train`` and ``blip calibrate`` fit);
* ``species``: one scale factor per chemical element;
* ``floor``: ``sqrt(s^2 sigma^2 + c^2)``, a scale plus a constant floor (eV/A);
* ``power``: ``a sigma^b``;
* ``fmag``: ``sqrt(s^2 sigma^2 + a^2 |F|^2)``, |F| the predicted force of the component's atom (eV/A);
* ``fpow``: ``s sigma (|F| / mean |F|)^g``, mean over the validation atoms.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import score
from blip.uq.metrics import coverage, nll
from blip.uq.recalibration import fit_scale

FORMS = ("scale", "species", "floor", "power", "fmag", "fpow")


def fit_form(form: str, err: np.ndarray, sigma: np.ndarray, species: np.ndarray, force: np.ndarray):
    """A map ``(sigma, species, |F|) -> calibrated sigma`` fitted on validation residuals ``err`` (n,)."""
    s0 = fit_scale(err, sigma)
    if form == "scale":
        return lambda s, z, f: s0 * s
    if form == "species":
        factors = {int(e): fit_scale(err[species == e], sigma[species == e]) for e in np.unique(species)}
        return lambda s, z, f: s * np.array([factors.get(int(e), s0) for e in z])
    if form == "floor":
        x = minimize(lambda x: nll(err, np.sqrt(np.exp(2 * x[0]) * sigma ** 2 + np.exp(2 * x[1]))),
                     [np.log(s0), np.log(np.std(err) / 3)], method="Nelder-Mead").x
        return lambda s, z, f: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1]))
    if form == "power":
        x = minimize(lambda x: nll(err, np.exp(x[0]) * sigma ** x[1]),
                     [np.log(s0), 1.0], method="Nelder-Mead").x
        return lambda s, z, f: np.exp(x[0]) * s ** x[1]
    if form == "fmag":
        x = minimize(lambda x: nll(err, np.sqrt(np.exp(2 * x[0]) * sigma ** 2 + np.exp(2 * x[1]) * force ** 2)),
                     [np.log(s0), np.log(0.01)], method="Nelder-Mead").x
        return lambda s, z, f: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1]) * f ** 2)
    if form == "fpow":
        mean = float(np.mean(force))
        x = minimize(lambda x: nll(err, np.exp(x[0]) * sigma * (force / mean) ** x[1]),
                     [np.log(s0), 0.0], method="Nelder-Mead").x
        return lambda s, z, f: np.exp(x[0]) * s * (f / mean) ** x[1]
    raise ValueError(form)


def force_arrays(model, structures, seed: int) -> dict:
    """Residuals, raw sigma, element and predicted force norm of the atom of every force component (flat)."""
    pred = model.predict([s.atoms for s in structures], samples=None, seed=seed)
    forces = score(structures, pred)["forces"]
    species = np.concatenate([np.repeat(s.atoms.numbers, 3) for s in structures])
    norm = np.concatenate([np.repeat(np.linalg.norm(np.asarray(f), axis=1), 3) for f in pred["forces"]])
    return {"err": forces["ref"] - forces["pred"], "std": forces["std"], "species": species, "force": norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--sets", default=None, help="comma-separated experiments (as for blip bench --sets)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--method", default="blip")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = args.sets.split(",") if args.sets else None
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data), Options(seed=seed, experiments=sets))
        for exp in plan.experiments:
            path = Path(args.runs_dir) / f"seed{seed}" / (exp.name.replace("=", "") or "run") / args.method
            model = blip.load(str(path / "model_calibrated.pt"))
            model.calibration = {"energy": 1.0, "forces": 1.0}
            valid = force_arrays(model, exp.valid, seed)
            tests = {t.name: force_arrays(model, t.structures, seed) for t in exp.tests}
            print(f"{exp.name} seed {seed} ({args.method}, force spread per {model.force_std}):")
            for form in FORMS:
                calibrate = fit_form(form, valid["err"], valid["std"], valid["species"], valid["force"])
                cells = []
                for name, a in tests.items():
                    sigma = calibrate(a["std"], a["species"], a["force"])
                    cells.append(f"{name} NLL {nll(a['err'], sigma):7.3f} cov {coverage(a['err'], sigma, 0.95):.3f}")
                print(f"  {form:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
