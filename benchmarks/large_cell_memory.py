"""Peak memory and time of predicting one large periodic Si cell, MAP and with K samples.

    OMP_NUM_THREADS=1 python benchmarks/large_cell_memory.py [--atoms 10648] [--samples 16]

Each case runs in a fresh process (peak RSS is per process). The model is an untrained
BLIP-PaiNN of the default size (64 features, 3 interactions, cutoff 5 A) with its feature
statistics fitted on the cell, so every noisy layer is active. Prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(atoms_n: int, samples: int) -> dict:
    import numpy as np
    import torch
    from ase.build import bulk

    from blip import config
    from blip.backbones.base import DatasetSummary
    from blip.build import build_potential
    from blip.data import build_graph, collate
    from blip.predictor import BlipModel

    torch.set_num_threads(1)
    reps = round((atoms_n / 8) ** (1 / 3))
    cell = bulk("Si", "diamond", a=5.43, cubic=True).repeat((reps, reps, reps))
    cell.rattle(0.05, seed=0)
    cfg = config.resolve({"model": {"backbone": "painn"}, "uq": {"method": "blip"}})
    summary = DatasetSummary(elements=[14], e0s={14: -158.4})
    net = build_potential(cfg, summary)
    small = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))
    net.fit_feature_statistics([collate([build_graph(small, 5.0)])])
    model = BlipModel([net], cfg, summary)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = model.predict([cell], samples=samples, seed=0)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert np.all(np.isfinite(out["forces"][0]))
    return {"atoms": len(cell), "samples": samples, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak / 1024), "predict_mb": round((peak - base) / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atoms", type=int, default=10648)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    for k in (0, 4, args.samples):
        res = subprocess.run([sys.executable, __file__, "--one", str(args.atoms), str(k)], capture_output=True,
                             text=True, check=True)
        print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
