"""What ``uq.backbone_training: noise_free`` costs per training step, side by side with the sampled
(joint) training and the deterministic model.

    OMP_NUM_THREADS=1 python benchmarks/backbone_training_cost.py [--repeats 5] [--backbones mace,painn]

``blip.bench.cost.train_step_ratios`` on batches of 8 acetylacetone molecules (the example models of
``blip bench cost``, one torch thread, interleaved repeats of one epoch of 8 steps): the deterministic
model, BLIP trained on sampled passes, and BLIP whose backbone trains on the noise-free pass with a
sampled step of the rate heads every 1, 2 or 4 steps. Ratios to the deterministic step.
"""

from __future__ import annotations

import argparse

import torch

from blip.bench import cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="mace,painn")
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {"deterministic": ("deterministic", {}), "blip, sampled": ("blip", {"backbone_training": "sampled"})}
    variants.update({f"blip, noise_free, rate_every {n}": ("blip", {"backbone_training": "noise_free", "rate_every": n})
                     for n in (1, 2, 4)})
    for backbone in args.backbones.split(","):
        rows = cost.train_step_ratios(cost.MODELS[backbone], args.repeats, 8, 8, variants=variants)
        print(f"{backbone}: training step, acac batch 8, {args.repeats} interleaved repeats of one epoch")
        for r in rows:
            print(f"  {r['method']:34s} {r['seconds_per_step'] * 1000:7.1f} ms   median ratio {r['ratio']:.3f}"
                  f"   min ratio {r['ratio_min']:.3f}")


if __name__ == "__main__":
    main()
