"""Cost of prediction with uncertainty relative to the noise-free (MAP) prediction.

    python benchmarks/predict_cost.py MODEL.pt STRUCTURES.xyz [--samples 16] [--repeats 3]

Times ``model.predict(samples=K)`` and ``model.predict(samples=0)`` on the same
structures, same process and threads, interleaved, and prints the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import blip
from blip.data import read_structures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("structures")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = blip.load(args.model)
    atoms = read_structures(args.structures)
    model.predict(atoms[:4], samples=args.samples, seed=0)  # warm-up
    times = {"map": [], "samples": []}
    for _ in range(args.repeats):
        for name, k in (("map", 0), ("samples", args.samples)):
            start = time.perf_counter()
            model.predict(atoms, samples=k, seed=0)
            times[name].append(time.perf_counter() - start)
    t_map, t_k = statistics.median(times["map"]), statistics.median(times["samples"])
    print(f"structures: {len(atoms)}  threads: {torch.get_num_threads()}  method: {model.method}")
    print(f"MAP predict:          {t_map:.3f} s (median of {args.repeats})")
    print(f"K={args.samples} predict:        {t_k:.3f} s")
    print(f"ratio K={args.samples} / MAP:      {t_k / t_map:.2f}")
    print(f"ratio per sample:     {t_k / t_map / max(args.samples, 1):.3f}")


if __name__ == "__main__":
    main()
