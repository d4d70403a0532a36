"""The same trained BLIP models recalibrated without and with the structure floor (``uq.structure_floor``).

    OMP_NUM_THREADS=1 python benchmarks/structure_floor.py RUNS_DIR --sets ethanol,acac [--protocol energy-split] \
        [--seeds 0,1,2] [--method blip] [--data ../shared/data]
    OMP_NUM_THREADS=1 python benchmarks/structure_floor.py RUNS_DIR --protocol finetune-si --method blip-finetune

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench`` run (``seedS/SET/METHOD/model_calibrated.pt``; a
single-seed run, ``--seed S --seeds 1``, keeps no ``seedS`` folder: give ``--seeds S``). For every
(set, seed) the model is recalibrated on its validation split by :func:`blip.uq.recalibration.recalibrate`
with the model's own settings, once with ``uq.structure_floor`` false and once true (everything else
as trained), and each test set with forces is scored as ``blip bench`` scores it: force NLL per
component (nats), 95 % coverage and the mean spread over that of the in-distribution test set (the
first test set: σ ratio), with the fitted floor c (eV/A) and slope b; then the means over seeds.
Each line also gives the largest relative difference between the spreads ``predict`` returns with
that calibration and the bench's formula (``recalibrated_std``): the two paths must agree.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import method_dir, recalibrated_std, score
from blip.uq.metrics import coverage, nll
from blip.uq.recalibration import STRUCTURE_FLOOR_KEYS, recalibrate


def scored(model, structures, calibration: dict, seed: int) -> tuple[float, float, float, float]:
    """(force NLL, 95 % coverage, mean spread, largest relative gap predict vs bench formula) of one test set."""
    model.calibration = {"energy": 1.0, "forces": 1.0}
    raw = model.predict([s.atoms for s in structures], seed=seed, novelty=True)
    model.calibration = dict(calibration)
    direct = model.predict([s.atoms for s in structures], seed=seed)
    a = score(structures, raw)["forces"]
    std = recalibrated_std(a, "forces", calibration)
    gap = float(np.max(np.abs(np.concatenate([np.ravel(x) for x in direct["forces_std"]]) - std) / std))
    err = a["ref"] - a["pred"]
    return nll(err, std), coverage(err, std, 0.95), float(np.mean(std)), gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--sets", default=None, help="comma-separated experiments (as for blip bench --sets)")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--method", default="blip", help="the method's folder (blip-finetune for finetune-si)")
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table: dict[tuple[str, str, bool], list[tuple[float, float, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data),
                          Options(seed=seed, experiments=args.sets.split(",") if args.sets else None))
        for exp in plan.experiments:
            runs = Path(args.runs_dir) / f"seed{seed}"
            runs = runs if runs.is_dir() else Path(args.runs_dir)
            path = method_dir(runs, exp, args.method) / "model_calibrated.pt"
            tests = [t for t in exp.tests if all(s.forces is not None for s in t.structures)]
            for floor in (False, True):
                model = blip.load(str(path))
                model.config["uq"]["structure_floor"] = floor
                calibration = recalibrate(model, exp.valid, seed=seed)
                cells, reference = [], None
                for t in tests:
                    value, cov, mean_std, gap = scored(model, t.structures, calibration, seed)
                    reference = reference or mean_std
                    table.setdefault((exp.name, t.name, floor), []).append((value, cov, mean_std / reference))
                    cells.append(f"{t.name} {value:.3f} ({cov:.2f}, {mean_std / reference:.2f}x; gap {gap:.0e})")
                c, b = (calibration.get(k, 0.0) for k in STRUCTURE_FLOOR_KEYS[:2])
                label = f"floor c {c:.3g} eV/A b {b:.3g}" if floor else "without"
                print(f"{exp.name or 'run'} seed {seed} {label}: " + " | ".join(cells), flush=True)
    print("\nmeans over seeds: force NLL (coverage, σ ratio), without -> with the structure floor")
    for (name, test, floor), rows in table.items():
        if floor:
            continue
        before, after = rows, table[(name, test, True)]
        better = sum(a[0] < b[0] for a, b in zip(after, before))
        mean = [statistics.mean(r[i] for r in before) for i in range(3)]
        mean_after = [statistics.mean(r[i] for r in after) for i in range(3)]
        print(f"{name or 'run'} {test}: {mean[0]:.3f} ({mean[1]:.2f}, {mean[2]:.2f}x) -> {mean_after[0]:.3f} "
              f"({mean_after[1]:.2f}, {mean_after[2]:.2f}x); lower on {better} of {len(rows)} seeds; per seed "
              + ", ".join(f"{b[0]:.2f} -> {a[0]:.2f}" for a, b in zip(after, before)))


if __name__ == "__main__":
    main()
