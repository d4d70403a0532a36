"""Other forms of post-hoc recalibration than one scale factor, on the models of a ``blip bench`` run.

    OMP_NUM_THREADS=1 python benchmarks/recalibration_forms.py RUNS_DIR --protocol energy-split \
        --sets ethanol,acac --seeds 0,1,2 [--method blip] [--data ../shared/data]

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seedS/SET/METHOD/model_calibrated.pt``).
For every (set, seed) the model predicts its validation split and test sets without calibration
(force spreads per atom or per component as its recalibration chose), then maps from the raw force
sigma to a calibrated one (each floored as blip floors: ``uq.force_std_floor``) are fitted on the
validation split only, by Gaussian NLL, and scored
on every test set (NLL per force component in nats, 95 % coverage):

* ``scale``: ``s sigma`` (one factor);
* ``blip``: what ``blip train`` and ``blip calibrate`` fit with the default settings: ``s sigma
  exp(b (nu - mean nu) + b2 max(0, nu - max nu))``, nu the atom's log feature distance
  (``atom_novelty``), b >= 0.1 fitted, b2 = 0.2 (the ``uq`` defaults ``novelty_widening``,
  ``novelty_beyond``), means and maxima over the validation atoms;
* ``species``: one scale factor per chemical element;
* ``floor``: ``sqrt(s^2 sigma^2 + c^2)``, a scale plus a constant floor (eV/A);
* ``power``: ``a sigma^b``;
* ``fmag``: ``sqrt(s^2 sigma^2 + a^2 |F|^2)``, |F| the predicted force of the component's atom (eV/A);
* ``fpow``: ``s sigma (|F| / mean |F|)^g``, mean over the validation atoms;
* ``nfloor``: ``sqrt(s^2 sigma^2 + c^2 exp(2 b (nu - mean nu)))``, nu the atom's feature distance
  (``atom_novelty``), mean over the validation atoms: a floor that grows away from the training
  data whatever the size of the predicted force;
* ``blip+nfloor``: ``blip``'s spread (its s and b refitted with the floor) and the ``nfloor`` floor in
  quadrature;
* ``blip+nfloor-add``: the same with ``blip``'s s and b kept as ``blip`` fits them (only c and the
  floor's b fitted): the spread can only grow over ``blip``'s.

Single-seed runs (``blip bench ... --seed S --seeds 1 --runs-dir RUNS``) keep no ``seedS`` folder:
give ``--seeds S`` and RUNS_DIR is read as that seed's.
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
from blip.config import DEFAULTS
from blip.uq.recalibration import fit_novelty_widening, fit_scale, novelty_factor

UQ = DEFAULTS["uq"]  # blip's default recalibration settings, which the forms follow
FLOOR = UQ["force_std_floor"]  # of the validation force RMSE
FORMS = ("scale", "blip", "species", "floor", "power", "fmag", "fpow", "nfloor", "blip+nfloor", "blip+nfloor-add")


def fit_form(form: str, err: np.ndarray, sigma: np.ndarray, species: np.ndarray, force: np.ndarray,
             novelty: np.ndarray, floor: float):
    """A map ``(sigma, species, |F|, nu) -> calibrated sigma`` fitted on validation residuals ``err`` (n,)
    by Gaussian NLL; every form's spread is floored in quadrature at ``floor`` (eV/A), in the fit and
    after it, as ``blip`` recalibrates (``uq.force_std_floor``)."""
    s0 = fit_scale(err, sigma, floor)
    mean_force, centre = float(np.mean(force)), float(np.mean(novelty))
    elements = [int(e) for e in np.unique(species)]
    _, b = fit_novelty_widening(err, sigma, novelty - centre, b_min=float(UQ["novelty_widening"]), floor=floor)
    widening = {"forces_novelty": b, "novelty_centre": centre, "forces_novelty_beyond": float(UQ["novelty_beyond"]),
                "novelty_limit": float(np.max(novelty))}

    def widened(s, nu):  # blip's default widening with its fitted b
        return s * novelty_factor(nu, widening)

    forms = {  # name -> (spread(x, sigma, species, |F|, nu), starting x)
        "scale": (lambda x, s, z, f, nu: np.exp(x[0]) * s, [np.log(s0)]),
        "blip": (lambda x, s, z, f, nu: np.exp(x[0]) * widened(s, nu), [np.log(s0)]),
        "species": (lambda x, s, z, f, nu: s * np.exp(np.select([z == e for e in elements], x, x[0])),
                    [np.log(s0)] * len(elements)),
        "floor": (lambda x, s, z, f, nu: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1])),
                  [np.log(s0), np.log(np.std(err) / 3)]),
        "power": (lambda x, s, z, f, nu: np.exp(x[0]) * s ** x[1], [np.log(s0), 1.0]),
        "fmag": (lambda x, s, z, f, nu: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1]) * f ** 2),
                 [np.log(s0), np.log(0.01)]),
        "fpow": (lambda x, s, z, f, nu: np.exp(x[0]) * s * (f / mean_force) ** x[1], [np.log(s0), 0.0]),
        "nfloor": (lambda x, s, z, f, nu: np.sqrt(np.exp(2 * x[0]) * s ** 2
                                                  + np.exp(2 * x[1] + 2 * x[2] * (nu - centre))),
                   [np.log(s0), np.log(np.std(err) / 3), 0.5]),
        "blip+nfloor": (lambda x, s, z, f, nu: np.sqrt(np.exp(2 * x[0]) * widened(s, nu) ** 2
                                                       + np.exp(2 * x[1] + 2 * x[2] * (nu - centre))),
                        [np.log(s0), np.log(np.std(err) / 3), 0.5]),
    }
    if form == "blip+nfloor-add":
        fixed = fit_form("blip", err, sigma, species, force, novelty, floor)
        forms[form] = (lambda x, s, z, f, nu: np.sqrt(fixed(s, z, f, nu) ** 2 - floor ** 2
                                                      + np.exp(2 * x[0] + 2 * x[1] * (nu - centre))),
                       [np.log(np.std(err) / 3), 0.5])
    spread, x0 = forms[form]

    def floored(x, s, z, f, nu):
        return np.sqrt(spread(x, s, z, f, nu) ** 2 + floor ** 2)

    x = minimize(lambda x: nll(err, floored(x, sigma, species, force, novelty)), x0, method="Nelder-Mead").x
    if form in ("nfloor", "blip+nfloor"):
        print(f"    {form}: s {np.exp(x[0]):.3g}, c {np.exp(x[1]):.3g} eV/A, b {x[2]:.3g}")
    if form == "blip+nfloor-add":
        print(f"    {form}: c {np.exp(x[0]):.3g} eV/A, b {x[1]:.3g}")
    return lambda s, z, f, nu: floored(x, s, z, f, nu)


def force_arrays(model, structures, seed: int) -> dict:
    """Residuals, raw sigma, element, predicted force norm and feature distance of the atom of every force
    component (flat arrays; distances 0 for models without them); None for a set without force labels."""
    pred = model.predict([s.atoms for s in structures], samples=None, seed=seed, novelty=True)
    forces = score(structures, pred).get("forces")
    if forces is None:  # a test set without force labels (energy paths)
        return None
    species = np.concatenate([np.repeat(s.atoms.numbers, 3) for s in structures])
    norm = np.concatenate([np.repeat(np.linalg.norm(np.asarray(f), axis=1), 3) for f in pred["forces"]])
    if "atom_novelty" in pred:
        novelty = np.concatenate([np.repeat(np.asarray(v), 3) for v in pred["atom_novelty"]])
    else:  # a model without rate heads: the distance forms reduce to their plain ones
        novelty = np.zeros_like(norm)
    return {"err": forces["ref"] - forces["pred"], "std": forces["std"], "species": species, "force": norm,
            "novelty": novelty}


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
            runs = Path(args.runs_dir) / f"seed{seed}"
            runs = runs if runs.is_dir() else Path(args.runs_dir)  # a single-seed run
            path = runs / (exp.name.replace("=", "") or "run") / args.method
            model = blip.load(str(path / "model_calibrated.pt"))
            model.calibration = {"energy": 1.0, "forces": 1.0}
            valid = force_arrays(model, exp.valid, seed)
            tests = {t.name: force_arrays(model, t.structures, seed) for t in exp.tests}
            tests = {name: a for name, a in tests.items() if a is not None}
            print(f"{exp.name} seed {seed} ({args.method}, force spread per {model.force_std}):")
            floor = FLOOR * float(np.sqrt(np.mean(valid["err"] ** 2)))  # blip's default force_std_floor
            for form in FORMS:
                calibrate = fit_form(form, valid["err"], valid["std"], valid["species"], valid["force"],
                                     valid["novelty"], floor)
                cells = []
                for name, a in tests.items():
                    sigma = calibrate(a["std"], a["species"], a["force"], a["novelty"])
                    cells.append(f"{name} NLL {nll(a['err'], sigma):7.3f} cov {coverage(a['err'], sigma, 0.95):.3f}")
                print(f"  {form:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
