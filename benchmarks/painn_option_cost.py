"""What a PaiNN noise option costs, side by side: ``model.vector_noise`` (noise on U and V too) or
``model.message_noise`` (noise on the message MLPs phi), on against off.

    OMP_NUM_THREADS=1 python benchmarks/painn_option_cost.py [--option vector_noise] [--repeats 9]

Predict: 8 acetylacetone molecules, K = 4 and 16 samples, BLIP-PaiNN (the example config,
untrained, feature statistics fitted) with the option on and off (the other options at their
defaults), each timing over the MAP predict just before it (the MAP pass is the same either way),
median of interleaved repeats. Training step: ``blip.bench.cost.train_step_ratios`` on batches
of 8 acetylacetone molecules, the deterministic model and BLIP with the option on and off.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from blip.bench import cost

OPTIONS = ("vector_noise", "message_noise")


def predict(option: str, repeats: int) -> None:
    acac = cost.systems(False)["acac"]
    models = {}
    for on in (True, False):
        model = cost.build_models({**cost.MODELS["painn"], option: on}, False)["blip"]
        cost.fit_statistics(model, acac)
        model.predict(acac, samples=2, seed=0)  # warm-up
        models[on] = model
    configs = [(on, k) for on in (True, False) for k in (4, 16)]
    ratios = cost.paired_ratios(configs, lambda c: models[c[0]].predict(acac, samples=0, seed=0),
                                lambda c: models[c[0]].predict(acac, samples=c[1], seed=0), repeats)
    print(f"predict, {len(acac)} acac, {repeats} interleaved repeats [x MAP predict], median (min):")
    for (on, k), r in ratios.items():
        print(f"  {option} {'on ' if on else 'off'} K = {k:2d}: {statistics.median(r):6.2f} ({min(r):.2f})")


def training(option: str, repeats: int) -> None:
    variants = {"deterministic": ("deterministic", {}), f"blip, {option} on": ("blip", {}, {option: True}),
                f"blip, {option} off": ("blip", {}, {option: False})}
    rows = cost.train_step_ratios(cost.MODELS["painn"], repeats, 8, 8, variants=variants)
    print(f"training step, acac batch 8, {repeats} interleaved repeats of one epoch:")
    for r in rows:
        print(f"  {r['method']:30s} {r['seconds_per_step'] * 1000:6.1f} ms   median ratio {r['ratio']:.3f}"
              f"   min ratio {r['ratio_min']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--option", choices=OPTIONS, default="vector_noise")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    predict(args.option, args.repeats)
    training(args.option, args.repeats)


if __name__ == "__main__":
    main()
