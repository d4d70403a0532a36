"""Where a force sigma's ranking of the errors comes from: between structures or within them.

    OMP_NUM_THREADS=1 python benchmarks/ranking_levels.py RUNS_DIR --sets oxirane_gfn2.xyz \
        [--methods blip,ensemble] [--test low_energy] [--seeds 0,1,2] [--data ../shared/data] [--only-slots 0,4]
    OMP_NUM_THREADS=1 python benchmarks/ranking_levels.py RUNS_DIR --protocol ood-ethanol --test test_eth_meth

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seedS/SET/METHOD/model_calibrated.pt``;
a single-seed run keeps no ``seedS`` folder: give ``--seeds S``; ``--protocol`` energy-split by
default, ``--sets`` its experiment, none for a protocol of one). For each seed and
method, on one test set of the experiment (its structures rebuilt from the protocol's split),
with the force sigma scaled by the factor fitted on the validation split (as ``blip train`` does):
the recalibrated NLL per force component (nats); the NLL with the best single factor on the test
set itself ("oracle": what is lost to the scale found on validation); the NLL of a constant
sigma equal to the RMSE (no ranking); the Spearman rank correlation of the structures' RMS error
with their RMS sigma (between structures) and the mean of the per-structure Spearman of |error|
with sigma over components (within structures); for BLIP also that of the structures' RMS error
with their atoms' mean log feature distance (what ``uq.structure_floor`` grows with). ``--only-slots``: BLIP's sigma from the noise of
these noisy MLPs only (node-domain slots, printed with their layer names; an MLP's layers share the
rate of its first layer's slot, so name that one), the rates of every other MLP multiplied by
1e-8, the model otherwise as trained. After the seeds, per method the means of the NLL and of the
constant's: the constant's difference between two methods is what their accuracy alone is worth
(log of their RMSE ratio), and NLL minus constant what each sigma's ranking of the errors buys.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import method_dir, score
from blip.uq.metrics import nll
from blip.uq.recalibration import fit_scale


def force_arrays(model, structures, seed: int):
    """Residuals, raw sigma and structure index of every force component (flat), and each structure's
    mean log feature distance (G,; None for a model without one)."""
    pred = model.predict([s.atoms for s in structures], samples=None, seed=seed, novelty=True)
    forces = score(structures, pred)["forces"]
    structure = np.concatenate([np.full(3 * len(s.atoms), i) for i, s in enumerate(structures)])
    mean_novelty = np.array([np.mean(v) for v in pred["atom_novelty"]]) if "atom_novelty" in pred else None
    return forces["ref"] - forces["pred"], forces["std"], structure, mean_novelty


def keep_noise_of(model, slots: set[int]) -> None:
    """Scale the rates of every noisy layer whose slot is not in ``slots`` by 1e-8 (in each member)."""
    for potential in model.members:
        print("noisy layers:", ", ".join(f"{i} {name}" for i, name in enumerate(potential.layers["node"])))
        rate = potential.inference.rate

        def only(domain, slot, *args, _rate=rate, **kwargs):
            p = _rate(domain, slot, *args, **kwargs)
            return p if slot in slots else p * 1e-8

        potential.inference.rate = only


def per_structure_rms(values: np.ndarray, structure: np.ndarray) -> np.ndarray:
    n = structure.max() + 1
    return np.sqrt(np.bincount(structure, values ** 2, n) / np.bincount(structure, None, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--sets", default=None, help="the experiment (as for blip bench --sets)")
    parser.add_argument("--methods", default="blip,ensemble")
    parser.add_argument("--test", default="low_energy")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--only-slots", default=None, help="comma-separated node slots whose noise to keep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    totals: dict[str, list[tuple[float, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data),
                          Options(seed=seed, experiments=[args.sets] if args.sets else None))
        exp = plan.experiments[0]
        test = next(t for t in exp.tests if t.name == args.test)
        runs = Path(args.runs_dir) / f"seed{seed}"
        runs = runs if runs.is_dir() else Path(args.runs_dir)  # a single-seed run
        for method in args.methods.split(","):
            model = blip.load(str(method_dir(runs, exp, method) / "model_calibrated.pt"))
            model.calibration = {"energy": 1.0, "forces": 1.0}
            if args.only_slots is not None and method == "blip":
                keep_noise_of(model, {int(s) for s in args.only_slots.split(",")})
            err_v, sigma_v, _, _ = force_arrays(model, exp.valid, seed)
            err, sigma, structure, mean_novelty = force_arrays(model, test.structures, seed)
            sigma = fit_scale(err_v, sigma_v) * sigma
            rmse = float(np.sqrt(np.mean(err ** 2)))
            score_nll, constant = nll(err, sigma), nll(err, np.full_like(err, rmse))
            totals.setdefault(method, []).append((score_nll, constant))
            between = spearmanr(per_structure_rms(err, structure), per_structure_rms(sigma, structure))[0]
            within = np.nanmean([spearmanr(np.abs(err[structure == g]), sigma[structure == g])[0]
                                 for g in range(structure.max() + 1)])
            by_distance = ("" if mean_novelty is None else ", structures by their mean feature distance "
                           f"{spearmanr(per_structure_rms(err, structure), mean_novelty)[0]:.2f}")
            print(f"seed {seed} {method:9s} F RMSE {rmse * 1000:6.1f} meV/A  NLL {score_nll:7.3f}  "
                  f"oracle {nll(err, fit_scale(err, sigma) * sigma):7.3f}  constant {constant:7.3f}  "
                  f"Spearman between structures {between:.2f}, within {within:.2f}{by_distance}")
    for method, rows in totals.items():
        score_nll, constant = np.mean(rows, axis=0)
        print(f"mean {method:9s} NLL {score_nll:7.3f}  constant {constant:7.3f}  "
              f"ranking buys {constant - score_nll:.3f} nats")


if __name__ == "__main__":
    main()
