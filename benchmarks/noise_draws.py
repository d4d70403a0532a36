"""Cost of the counter-based noise: layer by layer against one batch of kernels per domain.

    OMP_NUM_THREADS=1 python benchmarks/noise_draws.py [--repeats 200]

1. The normal draws of one sampled pass of the example PaiNN (its 10 noisy node layers, as
   the plan of a first pass lists them) for 120 rows (8 acetylacetone molecules, a training batch), 1920
   (the same with K = 16 replicas) and 16000 rows (16 replicas of a 1000-atom cell), drawn
   layer by layer (``counter_normal`` per layer) and at once (``counter_normals``, what a
   :class:`blip.bayes.noise.NoiseContext` with a plan does).
2. One sampled pass with forces of that model on those 8 molecules (K = 1 and 16), with the
   plan and with the plan forgotten before every pass (layer by layer), interleaved.
Prints medians (ms) and the ratio; the draws are the same numbers either way.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blip.bayes.noise import counter_normal, counter_normals, row_keys, stream_word
from blip.bench import cost
from blip.data import build_graph, collate

def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def draws(plan: list[tuple[int, int]], repeats: int) -> None:
    layers = [(stream_word("node", slot), channels) for slot, channels in plan]
    print(f"{len(layers)} noisy node layers, channels {[c for _, c in layers]}")
    for rows in (120, 1920, 16000):
        keys = row_keys(0, torch.tensor([0]), torch.tensor([0]), torch.tensor([rows]), torch.arange(rows)[:, None])
        n = max(10, repeats * 120 // rows)
        by_layer = _median_ms(lambda: [counter_normal(keys, s, c, torch.float32) for s, c in layers], n)
        at_once = _median_ms(lambda: counter_normals(keys, layers, torch.float32), n)
        print(f"draws of one pass, {rows:5d} rows: layer by layer {by_layer:7.2f} ms, at once {at_once:7.2f} ms "
              f"({at_once / by_layer:.2f}x)")


def passes(model, acac, repeats: int) -> None:
    potential = model.members[0]
    graphs = [build_graph(a, model.cutoff, index=i) for i, a in enumerate(acac)]
    for k in (1, 16):
        batch = collate([g for g in graphs for _ in range(k)], dtype=model.dtype)
        batch["replica"] = torch.arange(k).repeat(len(graphs))

        def run(plan: bool):
            if not plan:
                potential.noise_state.plans.clear()
            potential(batch, sample=True, seed=0)

        run(True)
        with_plan, without = [], []
        for i in range(max(5, repeats // (4 * k))):
            for plan in ((True, False) if i % 2 else (False, True)):
                start = time.perf_counter()
                run(plan)
                (with_plan if plan else without).append(time.perf_counter() - start)
        a, b = 1e3 * statistics.median(with_plan), 1e3 * statistics.median(without)
        print(f"sampled pass with forces, 8 acac x K = {k:2d}: layer by layer {b:7.2f} ms, with the plan {a:7.2f} ms "
              f"({a / b:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, acac = cost.acac_blip_model("painn")  # fitting its statistics ran sampled passes: a plan
    potential = model.members[0]
    draws(potential.noise_state.plans[potential.noise_kind]["node"], args.repeats)
    passes(model, acac, args.repeats)


if __name__ == "__main__":
    main()
