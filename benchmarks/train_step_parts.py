"""Where a BLIP-PaiNN training step's extra time goes: the noise-contrastive pass, side by side.

    OMP_NUM_THREADS=1 python benchmarks/train_step_parts.py [--repeats 9] [--batch 8] [--train-file FILE.xyz]

Part 1: one training step (forward, forces, loss, double backward, optimiser) on acetylacetone
batches (or those of ``--train-file``, e.g. a set of ``make_xtb_dataset.py``), over the deterministic model's step, for BLIP as configured by default, without the
contrastive pass (``uq.contrastive.weight = 0``) and with one every 4 steps instead of 2
(``blip.bench.cost.train_step_ratios`` with these variants: interleaved repeats of one epoch of
8 steps, medians and minima of the ratios).
Part 2: the contrastive pass alone (``BayesianPotential.rates`` on perturbed copies, the KL and
its backward into the rate heads) against a no-gradient MAP and sampled forward of the same
batch, for 8, 16 and 32 structures: whether it is dispatch-bound (then more copies per pass
would be nearly free) or grows with the rows.
Models: the example PaiNN of ``blip bench cost`` (untrained, feature statistics fitted on the 8
acetylacetone molecules for part 2; float32, one thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from blip.bayes.inference import kl_divergence
from blip.bench import cost
from blip.data import build_graph, collate
from blip.train.contrastive import perturbed_batch

VARIANTS = {"deterministic": ("deterministic", {}), "blip (default)": ("blip", {}),
            "blip, no contrastive pass": ("blip", {"contrastive": {"weight": 0.0}}),
            "blip, contrastive every 4": ("blip", {"contrastive": {"every": 4}})}


def step_ratios(batch: int, repeats: int, train_file: str | None = None) -> None:
    rows = cost.train_step_ratios(cost.MODELS["painn"], repeats, 8, batch, variants=VARIANTS, train_file=train_file)
    print(f"training step, {train_file or 'acac'} batch {batch}, {repeats} interleaved repeats of one epoch:")
    for r in rows:
        print(f"  {r['method']:28s} {r['seconds_per_step'] * 1000:6.1f} ms   median ratio {r['ratio']:.3f}"
              f"   min ratio {r['ratio_min']:.3f}")


def contrastive_pass(repeats: int) -> None:
    model, acac = cost.acac_blip_model("painn")
    net = model.members[0]
    graphs = [build_graph(a, model.cutoff, index=i) for i, a in enumerate(acac)]
    rng = np.random.default_rng(0)
    print("contrastive pass alone (ms, best of the repeats):")
    for n in (8, 16, 32):
        batch = collate([graphs[i % len(graphs)] for i in range(n)], dtype=model.dtype)

        def map_forward():
            with torch.no_grad():
                net(batch, forces=False)

        def sampled_forward():
            with torch.no_grad():
                net(batch, sample=True, seed=1, forces=False)

        def contrastive():
            copies = lambda b: perturbed_batch(b, rng, (0.05, 0.3), (0.1, 0.3))  # noqa: E731
            kl_divergence(net.rates(batch, seed=1, transform=copies), 0.5).backward()

        row = {}
        for name, fn in (("MAP forward", map_forward), ("sampled forward", sampled_forward),
                         ("rates + KL backward", contrastive)):
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(5):
                    fn()
                times.append((time.perf_counter() - start) / 5 * 1000)
            row[name] = min(times)
        print(f"  {n:2d} structures: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-file", help="labelled extxyz of other molecules for part 1 (default: acetylacetone); "
                                             "part 2 is skipped")
    args = parser.parse_args()
    torch.set_num_threads(1)
    step_ratios(args.batch, args.repeats, args.train_file)
    if not args.train_file:
        contrastive_pass(max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
