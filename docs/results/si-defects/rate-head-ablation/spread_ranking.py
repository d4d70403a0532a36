"""Which per-atom quantity ranks a trained si-defects model's force errors: Spearman of |error| with
the raw force spread, the widened spread, the log feature distance nu, and the predicted |F|.

Atom-level figures pool every atom of a set; "within structure" is the mean over the set's
structures of the Spearman inside each one. Raw spreads (before recalibration), K samples.
``--head``: factor on the rate heads' learned term, as in rate_head_ablation.py.

    OMP_NUM_THREADS=1 BLIP_DATA=/path/to/data python spread_ranking.py RUNS/run/blip/model_calibrated.pt SEED [--head 0]
"""
import argparse
import os
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import blip.io
from blip.bench.protocols import Options, _si_groups
from blip.uq.recalibration import novelty_factor

from head_scaling import scale_rate_heads

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a recalibrated model file (its widening is applied to the spread)")
parser.add_argument("seed", type=int)
parser.add_argument("--head", type=float, default=1.0)
parser.add_argument("--samples", type=int, default=16)
args = parser.parse_args()


def rho(a, b):
    return spearmanr(a, b).statistic


scale_rate_heads(args.head)
model = blip.io.load(args.model)
calibration = dict(model.calibration)
model.calibration = {"energy": 1.0, "forces": 1.0}
_, valid, tests, _ = _si_groups(Path(os.environ.get("BLIP_DATA", "data")), Options(seed=args.seed))
print(f"head x {args.head:g}, seed {args.seed}, K = {args.samples}")
for name, structures in [("validation", valid)] + [(t.name, t.structures) for t in tests]:
    pred = model.predict([s.atoms for s in structures], samples=args.samples, seed=args.seed, novelty=True)
    ref, forces = np.concatenate([s.forces for s in structures]), np.concatenate(pred["forces"])
    deviation = np.concatenate(pred["forces_samples"], axis=1) - forces[None]
    spread = np.sqrt((deviation ** 2).mean(axis=(0, 2)))  # per atom, eV/A
    nu = np.concatenate(pred["atom_novelty"])
    widened = spread * novelty_factor(nu, calibration, "forces")
    error, predicted = np.linalg.norm(ref - forces, axis=1), np.linalg.norm(forces, axis=1)
    ends = np.cumsum([0] + [len(s.atoms) for s in structures])
    inside = np.mean([rho(error[a:b], spread[a:b]) for a, b in zip(ends[:-1], ends[1:])])
    print(f"{name:18s} Spearman(|error|, .): spread {rho(error, spread):.2f}, widened {rho(error, widened):.2f}, "
          f"nu {rho(error, nu):.2f}, |F_pred| {rho(error, predicted):.2f}; within structure: spread {inside:.2f}; "
          f"mean nu {nu.mean():.2f}")
