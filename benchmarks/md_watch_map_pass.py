"""Cost of the MD watch with and without its own noise-free pass, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/md_watch_map_pass.py [--backbones painn,mace] [--repeats 3]

For each backbone (an untrained model of the example config: cost does not depend on the
weights): `blip md` on acetylacetone, 200 NVT steps, K = 16 samples every 20 steps, over the same
run without checks; "before" repeats the MAP pass in every check (``map_pass=True``, the
behaviour before the watch reused the step's MAP forces), "after" is the current watch. Prints
the median ratio and every repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import blip.md as md
from blip.bench import cost


def seconds(model, atoms, samples: int, every: int, old: bool) -> float:
    """Wall seconds of 200 watched steps; ``old``: every check runs its own noise-free pass (the
    step's MAP values handed to ``predict`` as ``map_values`` are dropped)."""
    if old:
        full = model.predict
        model.predict = lambda *args, map_values=None, **kwargs: full(*args, **kwargs)
    try:
        start = time.perf_counter()
        md.run_md(model, atoms, md.MDSettings(steps=200, every=every, samples=samples, seed=0))
        return time.perf_counter() - start
    finally:
        if old:
            del model.predict  # the class's method again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="painn,mace")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.backbones.split(","):
        model, acac = cost.acac_blip_model(name)
        seconds(model, acac[0], 2, 201, False)  # warm-up
        before, after = [], []
        for _ in range(args.repeats):  # interleaved, each over its own plain run
            before.append(seconds(model, acac[0], 16, 20, True) / seconds(model, acac[0], 1, 201, False))
            after.append(seconds(model, acac[0], 16, 20, False) / seconds(model, acac[0], 1, 201, False))
        print(f"{name}: watch K=16 every 20 over MD without checks: before {statistics.median(before):.3f} "
              f"after {statistics.median(after):.3f} (repeats {[round(x, 3) for x in before]}, "
              f"{[round(x, 3) for x in after]})", flush=True)


if __name__ == "__main__":
    main()
