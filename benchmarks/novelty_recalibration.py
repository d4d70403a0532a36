"""The same trained BLIP models recalibrated with and without widening by the feature distance (``uq.novelty_widening``).

    OMP_NUM_THREADS=1 python benchmarks/novelty_recalibration.py RUNS_DIR --sets ammonia \
        [--protocol energy-split] [--seeds 0,1,2] [--samples K] [--data ../shared/data]
    OMP_NUM_THREADS=1 python benchmarks/novelty_recalibration.py RUNS_DIR --protocol finetune-si --method blip-finetune

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench energy-split`` (or, with ``--protocol
ood-ethanol`` and no ``--sets``, ``blip bench ood-ethanol``) run with BLIP
(``seedS/SET/blip/model_calibrated.pt``). For every seed the model is recalibrated on its
validation split (``blip.uq.recalibration.recalibrate``, K = ``--samples`` or the model's default, the run's seed)
with ``uq.novelty_widening`` false (one factor per target) and true (each atom's force spread also
times ``exp(b (nu - nu_0))``, b >= 0 fitted there), and each test set with forces is scored as
the bench does: force NLL per component (nats), 95 % coverage, Spearman(|error|, σ) and the mean σ over
that of the in-distribution test set (σ ratio), all of the recalibrated spreads, and b; then the means
over seeds (``--target energy``: the same for energies per structure, widened with each
structure's largest atom novelty, ``uq.energy_novelty_widening``; energy-only test sets included).
``--fixed-b 0.1,0.2`` also scores those b (``uq.novelty_widening: 0.1``), each with its
factor refitted on the validation split as ``recalibrate`` fits it (with the model's force floor
and, with ``--beyond``, the growth beyond the split's largest distance); ``--fit-above 0.1`` b
fitted there with 0.1 as its floor
(``uq.novelty_widening_fit: true``, the default since 2026-12-05; forces only). ``--beyond B2`` adds to every row the extra widening
``exp(B2 (nu - limit))`` beyond the validation split's largest distance (``uq.novelty_beyond``;
default 0: none, whatever the model's config says). (The version of this script at commit eb43b8a fitted a
per-structure form offline, from one sampled pass; its outputs are in
docs/results/energy-split/message-noise-off/novelty-recalibration/.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.bench.runner import method_dir, recalibrated_std
from blip.evaluate import evaluate_structures
from blip.uq.metrics import regression_metrics
from blip.uq.recalibration import BEYOND_SETTINGS, NOVELTY_KEYS, WIDENING_SETTINGS, recalibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--sets", default=None, help="the experiment (as for blip bench --sets)")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--samples", type=int, default=None, help="K (default: the model's)")
    parser.add_argument("--method", default="blip", help="the method's folder (blip-finetune for finetune-si)")
    parser.add_argument("--fixed-b", default="", help="also score these b (comma-separated), s refitted for each")
    parser.add_argument("--beyond", type=float, default=0.0,
                        help="b2 of the extra widening beyond the validation range, on every row (0: none)")
    parser.add_argument("--fit-above", type=float, default=None,
                        help="also score b fitted on validation with this floor (uq.novelty_widening_fit)")
    parser.add_argument("--target", default="forces", choices=("forces", "energy"),
                        help="the widened spread (energy: each structure's, with its atoms' largest novelty)")
    args = parser.parse_args()
    target, setting = args.target, WIDENING_SETTINGS[args.target]
    b_key = NOVELTY_KEYS[target][0]
    torch.set_num_threads(1)
    scores: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data),
                          Options(seed=seed, experiments=[args.sets] if args.sets else None))
        exp = plan.experiments[0]
        model = blip.load(str(method_dir(Path(args.runs_dir) / f"seed{seed}", exp, args.method) / "model_calibrated.pt"))
        tests = [t for t in exp.tests if all(getattr(s, target) is not None for s in t.structures)]
        factors = {}
        model.config["uq"][BEYOND_SETTINGS[target]] = args.beyond or False
        model.config["uq"]["novelty_widening_fit"] = False
        for widening in (False, True):
            model.config["uq"][setting] = widening
            factors[widening] = recalibrate(model, exp.valid, samples=args.samples, seed=seed)
        if args.fit_above is not None:  # b fitted on validation with the set b as its floor (forces)
            model.config["uq"].update({setting: args.fit_above, "novelty_widening_fit": True})
            factors[f"b>={args.fit_above:g}"] = recalibrate(model, exp.valid, samples=args.samples, seed=seed)
        for b in (float(x) for x in args.fixed_b.split(",") if x):  # uq.novelty_widening: b, not fitted
            model.config["uq"].update({setting: b, "novelty_widening_fit": False})
            factors[f"b={b:g}"] = recalibrate(model, exp.valid, samples=args.samples, seed=seed)
        model.calibration = {"energy": 1.0, "forces": 1.0}
        arrays = {t.name: evaluate_structures(model, t.structures, samples=args.samples, seed=seed)[1][target]
                  for t in tests}  # raw spreads and each entry's novelty: one prediction per test set
        for widening, scales in factors.items():
            std = {name: recalibrated_std(a, target, scales) for name, a in arrays.items()}
            reference = float(np.mean(std[exp.reference_test])) if exp.reference_test in std else float("nan")
            for name, a in arrays.items():
                m = regression_metrics(a["ref"] - a["pred"], std[name])
                row = (m["nll"], m["coverage_95"], m["spearman"], float(np.mean(std[name])) / reference)
                scores.setdefault((name, str(widening)), []).append(row)
                print(f"seed {seed} {name:17s} widening {widening!s:7s} NLL {row[0]:8.3f} cov {row[1]:.2f} "
                      f"Spearman {row[2]:.2f} sigma ratio {row[3]:6.2f} b {scales.get(b_key, 0.0):.2f}",
                      flush=True)
    for (name, widening), rows in sorted(scores.items()):
        mean = np.mean(np.array(rows), axis=0)
        print(f"mean {name:17s} widening {widening!s:7s} NLL {mean[0]:8.3f} cov {mean[1]:.2f} "
              f"Spearman {mean[2]:.2f} sigma ratio {mean[3]:6.2f}")


if __name__ == "__main__":
    main()
