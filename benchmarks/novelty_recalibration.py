"""The same trained BLIP models recalibrated with and without widening by the feature distance (``uq.novelty_widening``).

    OMP_NUM_THREADS=1 python benchmarks/novelty_recalibration.py RUNS_DIR --sets ammonia \
        [--protocol energy-split] [--seeds 0,1,2] [--samples K] [--data ../shared/data]

RUNS_DIR is the ``--runs-dir`` of a finished ``blip bench energy-split`` (or, with ``--protocol
ood-ethanol`` and no ``--sets``, ``blip bench ood-ethanol``) run with BLIP
(``seedS/SET/blip/model_calibrated.pt``). For every seed the model is recalibrated on its
validation split (``blip.uq.recalibration.recalibrate``, K = ``--samples`` or the model's default, the run's seed)
with ``uq.novelty_widening`` off (one factor per target) and on (each atom's force spread also
times ``exp(b (nu - nu_0))``, b >= 0 fitted there), and each test set with forces is scored as
``blip evaluate`` would: force NLL per component (nats), 95 % coverage and b; then the means over
seeds. (The version of this script at commit eb43b8a fitted a per-structure form offline, from one
sampled pass; its outputs are in docs/results/energy-split/message-noise-off/novelty-recalibration/.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import blip
from blip.bench.protocols import Options, build_plan, data_dir
from blip.evaluate import evaluate_structures
from blip.uq.recalibration import recalibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir")
    parser.add_argument("--sets", default=None, help="the experiment (as for blip bench --sets)")
    parser.add_argument("--protocol", default="energy-split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", default=None)
    parser.add_argument("--samples", type=int, default=None, help="K (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scores: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        plan = build_plan(args.protocol, data_dir(args.data),
                          Options(seed=seed, experiments=[args.sets] if args.sets else None))
        exp = plan.experiments[0]
        folder = exp.name.replace("=", "") or "run"  # as blip bench names its runs
        model = blip.load(str(Path(args.runs_dir) / f"seed{seed}" / folder / "blip" / "model_calibrated.pt"))
        tests = [t for t in exp.tests if all(s.forces is not None for s in t.structures)]
        for widening in (False, True):
            model.config["uq"]["novelty_widening"] = widening
            factors = recalibrate(model, exp.valid, samples=args.samples, seed=seed)
            for test in tests:
                metrics, _ = evaluate_structures(model, test.structures, samples=args.samples, seed=seed)
                row = (metrics["forces"]["nll"], metrics["forces"]["coverage_95"])
                scores.setdefault((test.name, widening), []).append(row)
                print(f"seed {seed} {test.name:12s} widening {widening!s:5s} NLL {row[0]:8.3f} cov {row[1]:.2f} "
                      f"b {factors.get('forces_novelty', 0.0):.2f}", flush=True)
    for (name, widening), rows in sorted(scores.items()):
        mean = np.mean(np.array(rows), axis=0)
        print(f"mean {name:12s} widening {widening!s:5s} NLL {mean[0]:8.3f} cov {mean[1]:.2f}")


if __name__ == "__main__":
    main()
