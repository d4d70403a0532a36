"""What PaiNN's vector-channel noise (``model.vector_noise``, U and V noisy) costs, side by side.

    OMP_NUM_THREADS=1 python benchmarks/vector_noise_cost.py [--repeats 9]

Predict: 8 acetylacetone molecules, K = 4 and 16 samples, BLIP-PaiNN (the example config,
untrained, feature statistics fitted) with and without vector noise, each timing over the MAP
predict just before it (the MAP pass is the same with and without), median of interleaved repeats.
Training step: ``blip.bench.cost.train_step_ratios`` on batches of 8 acetylacetone molecules, the
deterministic model, BLIP with vector noise and without it (the default).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from blip.bench import cost


def predict(repeats: int) -> None:
    acac = cost.systems(False)["acac"]
    models = {}
    for vector_noise in (True, False):
        model = cost.build_models({**cost.MODELS["painn"], "vector_noise": vector_noise}, False)["blip"]
        cost.fit_statistics(model, acac)
        model.predict(acac, samples=2, seed=0)  # warm-up
        models[vector_noise] = model
    configs = [(v, k) for v in (True, False) for k in (4, 16)]
    ratios = {c: [] for c in configs}
    for rep in range(repeats):
        for v, k in configs[rep % len(configs):] + configs[:rep % len(configs)]:
            t_map = cost._seconds(lambda: models[v].predict(acac, samples=0, seed=0))
            ratios[(v, k)].append(cost._seconds(lambda: models[v].predict(acac, samples=k, seed=0)) / t_map)
    print(f"predict, {len(acac)} acac, {repeats} interleaved repeats [x MAP predict], median (min):")
    for (v, k), r in ratios.items():
        print(f"  vector noise {'on ' if v else 'off'} K = {k:2d}: {statistics.median(r):6.2f} ({min(r):.2f})")


def training(repeats: int) -> None:
    variants = {"deterministic": ("deterministic", {}), "blip, vector noise": ("blip", {}, {"vector_noise": True}),
                "blip, no vector noise (default)": ("blip", {})}
    rows = cost.train_step_ratios(cost.MODELS["painn"], repeats, 8, 8, variants=variants)
    print(f"training step, acac batch 8, {repeats} interleaved repeats of one epoch:")
    for r in rows:
        print(f"  {r['method']:30s} {r['seconds_per_step'] * 1000:6.1f} ms   median ratio {r['ratio']:.3f}"
              f"   min ratio {r['ratio_min']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    predict(args.repeats)
    training(args.repeats)


if __name__ == "__main__":
    main()
