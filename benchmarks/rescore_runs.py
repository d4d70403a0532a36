"""Recalibrate and score the trained models of a finished ``blip bench`` run with the current code.

    OMP_NUM_THREADS=1 python benchmarks/rescore_runs.py RUNS_DIR --sets ethanol [--protocol energy-split] \
        [--seeds 0,1,2] [--method blip]

RUNS_DIR is the ``--runs-dir`` of the run (``seedS/SET/METHOD/model_calibrated.pt``). For each seed the
model is recalibrated on the protocol's validation split as ``blip bench`` does, then every test set
of the experiment is scored as in its tables (recalibrated NLL, 95 % coverage and Spearman of the
target, forces where labelled; σ ratio to the reference test set; RMSE in meV/Å or meV); then the
means ± std over seeds. For a change of the recalibration alone: the same figures as a new run
without training again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import add_sigma_ratios, method_dir, row_metrics, score, timed_predict
from blip.uq.recalibration import recalibrate, uncalibrated


def scored_rows(model_path: Path, exp, seed: int) -> list[dict]:
    """Rows of every test set of ``exp`` for the model at ``model_path``, recalibrated on ``exp.valid``."""
    model = blip.load(str(model_path))
    scales = recalibrate(model, exp.valid, seed=seed, source="validation split")
    model.calibration = uncalibrated(scales)
    rows = []
    for test in exp.tests:
        pred, _ = timed_predict(model, test.structures, None, seed)
        rows.append({"test_set": test.name, **row_metrics(score(test.structures, pred), scales)})
    add_sigma_ratios(rows, exp.reference_test)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs")
    p.add_argument("--protocol", default="energy-split")
    p.add_argument("--sets", default=None, help="the experiment (as for blip bench --sets)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--method", default="blip")
    args = p.parse_args()
    torch.set_num_threads(1)
    table: dict[str, list] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(None),
                          Options(seed=seed, experiments=[args.sets] if args.sets else None))
        exp = plan.experiments[0]
        runs = Path(args.runs) / f"seed{seed}"
        runs = runs if runs.is_dir() else Path(args.runs)  # a single-seed run
        for r in scored_rows(method_dir(runs, exp, args.method) / "model_calibrated.pt", exp, seed):
            q = r["uq_target"]
            values = (r["nll_recal"], r["coverage_95_recal"], r["spearman_recal"], r["sigma_ratio_recal"] or 0.0,
                      1000 * r[f"{q}_rmse"])
            table.setdefault(r["test_set"], []).append(values)
            print(f"seed {seed} {r['test_set']:16s} {q:6s} NLL {values[0]:8.3f}  cov {values[1]:.2f}  "
                  f"Spearman {values[2]:.2f}  σ ratio {values[3]:.2f}  RMSE {values[4]:.1f}", flush=True)
    for name, rows in table.items():
        mean, std = np.mean(rows, axis=0), np.std(rows, axis=0)
        print(f"mean {name:16s} NLL {mean[0]:.3f} ± {std[0]:.3f}  cov {mean[1]:.2f}  Spearman {mean[2]:.2f}  "
              f"σ ratio {mean[3]:.2f}  RMSE {mean[4]:.1f} ± {std[4]:.1f}")


if __name__ == "__main__":
    main()
