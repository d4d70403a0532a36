"""Rescore a trained si-defects BLIP model with its rate heads' learned term scaled by ``--head``.

Each rate head's logit is ``logit(p_init) + 3 tanh(head(inputs) / 3) + slope (u - u0)``
(blip.bayes.inference.RateHead); ``--head 0`` keeps only the distance term, ``--head 1`` is the
model as trained (and reproduces the bench's figures). The model is recalibrated on its seed's
validation split, then scored on the three test sets at K = 16, as `blip bench si-defects` does.

    OMP_NUM_THREADS=1 BLIP_DATA=/path/to/data python rate_head_ablation.py RUNS/run/blip/model.pt SEED --head 0
"""
import argparse
import os
from pathlib import Path

import blip.io
from blip.bench.protocols import Options, _si_groups
from blip.bench.runner import row_metrics, score
from blip.uq.recalibration import recalibrate

from head_scaling import scale_rate_heads

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model")
parser.add_argument("seed", type=int)
parser.add_argument("--head", type=float, default=1.0, help="factor on the learned term (1: as trained)")
args = parser.parse_args()
scale_rate_heads(args.head)
model = blip.io.load(args.model)
_, valid, tests, _ = _si_groups(Path(os.environ.get("BLIP_DATA", "data")), Options(seed=args.seed))
scales = recalibrate(model, valid, seed=args.seed)
model.calibration = {"energy": 1.0, "forces": 1.0}
for test in tests:
    pred = model.predict([s.atoms for s in test.structures], samples=16, seed=args.seed, novelty=True)
    r = row_metrics(score(test.structures, pred), scales)
    print(f"head x {args.head:g} seed {args.seed} {test.name:18s} force NLL {r['forces_nll_recal']:.3f} "
          f"coverage {r['forces_coverage_95_recal']:.3f} Spearman {r['forces_spearman_recal']:.2f}")
