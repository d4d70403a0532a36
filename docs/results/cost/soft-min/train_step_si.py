"""Training step of PaiNN on silicon cells (batch 8 of ../shared/data/si/train.xyz): BLIP with the
Euclidean and with the nearest-training-rows distance over the deterministic model, interleaved in
one process (blip.bench.cost.train_step_ratios). ``subnormal``: the soft minimum without its floor
(every term kept, as before 2026-12-06), to see what subnormal floats cost in training.

    OMP_NUM_THREADS=1 python docs/results/cost/soft-min/train_step_si.py [subnormal]
"""

import sys

import torch

import blip.bayes.density as density
from blip.bench.cost import MODELS, train_step_ratios

torch.set_num_threads(1)
if sys.argv[1:] == ["subnormal"]:
    density.SOFT_MIN_FLOOR = float("-inf")
variants = {"deterministic": ("deterministic", {}), "blip-euclidean": ("blip", {"distance_metric": "euclidean"}),
            "blip-nearest": ("blip", {"distance_metric": "nearest"})}
rows = train_step_ratios(MODELS["painn"], repeats=5, steps=12, batch_size=8, variants=variants,
                         train_file="../shared/data/si/train.xyz")
for r in rows:
    print(f"{r['method']:15s} {1000 * r['seconds_per_step']:7.1f} ms/step  ratio {r['ratio']:.3f} (fastest {r['ratio_min']:.3f})")
