"""Other forms of post-hoc recalibration than one scale factor, on the models of a ``blip bench`` run.

    OMP_NUM_THREADS=1 python benchmarks/recalibration_forms.py RUNS_DIR --protocol energy-split \
        --sets ethanol,acac --seeds 0,1,2 [--method blip] [--data ../shared/data]

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seedS/SET/METHOD/model_calibrated.pt``).
For every (set, seed) the model predicts its validation split and test sets without calibration
(force spreads per atom or per component as its recalibration chose), then maps from the raw force
sigma to a calibrated one (each floored as blip floors: ``uq.force_std_floor``) are fitted on the
validation split only, by Gaussian NLL, and scored
on every test set (NLL per force component in nats, 95 % coverage):

* ``constant``: one spread for every component, whatever the model's sigma (what the model's
  accuracy alone scores; the other forms' gain over it is what their sigma's ranking of the errors buys);
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

Forms with each structure's mean feature distance m (the mean of its atoms' nu) and its RMS raw sigma S:

* ``blip+structure``: ``blip``'s spread times ``exp(b (m - mean m))``, s and b >= 0 refitted;
* ``blip+structure-swap``: ``blip``'s spread times ``S^-w exp(b (m - mean m))`` (a structure's own
  spread partly replaced by one from m);
* ``blip+within``: ``blip``'s spread with each structure's spreads compressed about their RMS,
  ``(sigma / S)^(w - 1)``; ``blip+within+structure``: that and ``exp(b (m - mean m))``;
* ``structure-nu``: ``exp(a + b (m - mean m))`` alone, the same for every component of a structure
  (no model spread at all: what the distance ranks by itself);
* ``blip+snfloor``: ``blip``'s spread and a floor ``c exp(b (m - mean m))`` in quadrature, s, c, b fitted
  together; ``blip+snfloor-add``: the floor added to ``blip``'s spread as ``blip`` fits it (c, b
  unbounded in sign); ``blip+snfloor-cap-add``: the same with m capped at the validation split's
  largest (what ``uq.structure_floor`` does, there with b >= 0; ``benchmarks/structure_floor.py``
  scores the library's own recalibration).

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
from blip.bench.runner import method_dir, score
from blip.uq.metrics import coverage, nll
from blip.config import DEFAULTS
from blip.uq.recalibration import fit_novelty_widening, fit_scale, novelty_factor

UQ = DEFAULTS["uq"]  # blip's default recalibration settings, which the forms follow
FLOOR = UQ["force_std_floor"]  # of the validation force RMSE
FORMS = ("constant", "scale", "blip", "blip+structure", "blip+structure-swap", "blip+within", "blip+within+structure", "structure-nu", "blip+snfloor", "blip+snfloor-add", "blip+snfloor-cap-add", "species", "floor", "power", "fmag", "fpow", "nfloor", "blip+nfloor", "blip+nfloor-add")


def fit_form(form: str, err: np.ndarray, sigma: np.ndarray, species: np.ndarray, force: np.ndarray,
             novelty: np.ndarray, floor: float, structure_novelty: np.ndarray | None = None):
    """A map ``(sigma, species, |F|, nu) -> calibrated sigma`` fitted on validation residuals ``err`` (n,)
    by Gaussian NLL; every form's spread is floored in quadrature at ``floor`` (eV/A), in the fit and
    after it, as ``blip`` recalibrates (``uq.force_std_floor``)."""
    s0 = fit_scale(err, sigma, floor)
    if structure_novelty is None:
        structure_novelty = np.stack([novelty, np.log(sigma)], axis=1)
    mean_force, centre = float(np.mean(force)), float(np.mean(novelty))
    s_centre, log_sd_centre = (float(c) for c in np.mean(structure_novelty, axis=0))
    elements = [int(e) for e in np.unique(species)]
    _, b = fit_novelty_widening(err, sigma, novelty - centre, b_min=float(UQ["novelty_widening"]), floor=floor)
    widening = {"forces_novelty": b, "novelty_centre": centre, "forces_novelty_beyond": float(UQ["novelty_beyond"]),
                "novelty_limit": float(np.max(novelty))}

    def widened(s, nu):  # blip's default widening with its fitted b
        return s * novelty_factor(nu, widening)

    forms = {  # name -> (spread(x, sigma, species, |F|, nu), starting x)
        "constant": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * np.ones_like(s), [np.log(np.std(err))]),
        "scale": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * s, [np.log(s0)]),
        "blip": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * widened(s, nu), [np.log(s0)]),
        "species": (lambda x, s, z, f, nu, snu: s * np.exp(np.select([z == e for e in elements], x, x[0])),
                    [np.log(s0)] * len(elements)),
        "floor": (lambda x, s, z, f, nu, snu: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1])),
                  [np.log(s0), np.log(np.std(err) / 3)]),
        "power": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * s ** x[1], [np.log(s0), 1.0]),
        "fmag": (lambda x, s, z, f, nu, snu: np.sqrt(np.exp(2 * x[0]) * s ** 2 + np.exp(2 * x[1]) * f ** 2),
                 [np.log(s0), np.log(0.01)]),
        "fpow": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * s * (f / mean_force) ** x[1], [np.log(s0), 0.0]),
        "nfloor": (lambda x, s, z, f, nu, snu: np.sqrt(np.exp(2 * x[0]) * s ** 2
                                                  + np.exp(2 * x[1] + 2 * x[2] * (nu - centre))),
                   [np.log(s0), np.log(np.std(err) / 3), 0.5]),
        "blip+structure": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * widened(s, nu)
                           * np.exp(x[1] ** 2 * (snu[:, 0] - s_centre)), [np.log(s0), 0.5]),
        "blip+structure-swap": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * widened(s, nu)
                                * np.exp(-x[2] * (snu[:, 1] - log_sd_centre) + x[1] * (snu[:, 0] - s_centre)),
                                [np.log(s0), 0.5, 0.5]),
        "blip+within": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * widened(s, nu)
                        * np.exp((x[1] - 1.0) * (np.log(s) - snu[:, 1])), [np.log(s0), 1.0]),
        "blip+within+structure": (lambda x, s, z, f, nu, snu: np.exp(x[0]) * widened(s, nu)
                                  * np.exp((x[1] - 1.0) * (np.log(s) - snu[:, 1]) + x[2] * (snu[:, 0] - s_centre)),
                                  [np.log(s0), 1.0, 0.0]),
        "structure-nu": (lambda x, s, z, f, nu, snu: np.exp(x[0] + x[1] * (snu[:, 0] - s_centre)),
                         [np.log(np.std(err)), 1.0]),
        "blip+nfloor": (lambda x, s, z, f, nu, snu: np.sqrt(np.exp(2 * x[0]) * widened(s, nu) ** 2
                                                       + np.exp(2 * x[1] + 2 * x[2] * (nu - centre))),
                        [np.log(s0), np.log(np.std(err) / 3), 0.5]),
    }
    if form in ("blip+nfloor-add", "blip+snfloor-add", "blip+snfloor-cap-add"):
        fixed = fit_form("blip", err, sigma, species, force, novelty, floor)
    if form == "blip+snfloor-add":  # a floor constant over each structure, from its mean feature distance
        forms[form] = (lambda x, s, z, f, nu, snu: np.sqrt(fixed(s, z, f, nu, snu) ** 2 - floor ** 2
                                                           + np.exp(2 * x[0] + 2 * x[1] * (snu[:, 0] - s_centre))),
                       [np.log(np.std(err) / 3), 0.5])
    if form == "blip+snfloor-cap-add":  # the same floor, no longer growing beyond the validation split's largest
        s_max = float(np.max(structure_novelty[:, 0]))
        forms[form] = (lambda x, s, z, f, nu, snu: np.sqrt(
            fixed(s, z, f, nu, snu) ** 2 - floor ** 2
            + np.exp(2 * x[0] + 2 * x[1] * (np.minimum(snu[:, 0], s_max) - s_centre))), [np.log(np.std(err) / 3), 0.5])
    if form == "blip+snfloor":
        forms[form] = (lambda x, s, z, f, nu, snu: np.sqrt(np.exp(2 * x[0]) * widened(s, nu) ** 2
                                                           + np.exp(2 * x[1] + 2 * x[2] * (snu[:, 0] - s_centre))),
                       [np.log(s0), np.log(np.std(err) / 3), 0.5])
    if form == "blip+nfloor-add":
        forms[form] = (lambda x, s, z, f, nu, snu: np.sqrt(fixed(s, z, f, nu, snu) ** 2 - floor ** 2
                                                      + np.exp(2 * x[0] + 2 * x[1] * (nu - centre))),
                       [np.log(np.std(err) / 3), 0.5])
    spread, x0 = forms[form]

    def floored(x, s, z, f, nu, snu):
        return np.sqrt(spread(x, s, z, f, nu, snu) ** 2 + floor ** 2)

    x = minimize(lambda x: nll(err, floored(x, sigma, species, force, novelty, structure_novelty)), x0,
                 method="Nelder-Mead").x
    if form in ("nfloor", "blip+nfloor"):
        print(f"    {form}: s {np.exp(x[0]):.3g}, c {np.exp(x[1]):.3g} eV/A, b {x[2]:.3g}")
    if form in ("blip+nfloor-add", "blip+snfloor-add", "blip+snfloor-cap-add"):
        print(f"    {form}: c {np.exp(x[0]):.3g} eV/A, b {x[1]:.3g}")
    if form == "blip+snfloor":
        print(f"    {form}: s {np.exp(x[0]):.3g}, c {np.exp(x[1]):.3g} eV/A, b {x[2]:.3g}")
    if form == "blip+structure":
        print(f"    {form}: s {np.exp(x[0]):.3g}, b_structure {x[1] ** 2:.3g}")
    if form.startswith("blip+within"):
        print(f"    {form}: s {np.exp(x[0]):.3g}, within-structure power {x[1]:.3g}"
              + (f", b_structure {x[2]:.3g}" if len(x) > 2 else ""))
    if form == "blip+structure-swap":
        print(f"    {form}: s {np.exp(x[0]):.3g}, b_structure {x[1]:.3g}, structure sigma power {-x[2]:.3g}")
    return lambda s, z, f, nu, snu: floored(x, s, z, f, nu, snu)


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
        mean_nu = np.concatenate([np.full(3 * len(v), np.mean(v)) for v in pred["atom_novelty"]])
    else:  # a model without rate heads: the distance forms reduce to their plain ones
        novelty = mean_nu = np.zeros_like(norm)
    sizes = [3 * len(s.atoms) for s in structures]
    log_sd = np.concatenate([np.full(n, 0.5 * np.log(np.mean(part ** 2)))
                             for n, part in zip(sizes, np.split(forces["std"], np.cumsum(sizes)[:-1]))])
    structure = np.stack([mean_nu, log_sd], axis=1)
    return {"err": forces["ref"] - forces["pred"], "std": forces["std"], "species": species, "force": norm,
            "novelty": novelty, "structure_novelty": structure}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--sets", default=None, help="comma-separated experiments (as for blip bench --sets)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--method", default="blip")
    parser.add_argument("--data", default=None)
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated forms to fit (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = args.sets.split(",") if args.sets else None
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data), Options(seed=seed, experiments=sets))
        for exp in plan.experiments:
            runs = Path(args.runs_dir) / f"seed{seed}"
            runs = runs if runs.is_dir() else Path(args.runs_dir)  # a single-seed run
            path = method_dir(runs, exp, args.method)
            model = blip.load(str(path / "model_calibrated.pt"))
            model.calibration = {"energy": 1.0, "forces": 1.0}
            valid = force_arrays(model, exp.valid, seed)
            tests = {t.name: force_arrays(model, t.structures, seed) for t in exp.tests}
            tests = {name: a for name, a in tests.items() if a is not None}
            rmse = " | ".join(f"{name} {1000 * np.sqrt(np.mean(a['err'] ** 2)):.1f}" for name, a in tests.items())
            print(f"{exp.name} seed {seed} ({args.method}, force spread per {model.force_std}; "
                  f"force RMSE [meV/A] {rmse}):")
            floor = FLOOR * float(np.sqrt(np.mean(valid["err"] ** 2)))  # blip's default force_std_floor
            for form in args.forms.split(","):
                calibrate = fit_form(form, valid["err"], valid["std"], valid["species"], valid["force"],
                                     valid["novelty"], floor, valid["structure_novelty"])
                cells = []
                for name, a in tests.items():
                    sigma = calibrate(a["std"], a["species"], a["force"], a["novelty"], a["structure_novelty"])
                    cells.append(f"{name} NLL {nll(a['err'], sigma):7.3f} cov {coverage(a['err'], sigma, 0.95):.3f}")
                print(f"  {form:8s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
