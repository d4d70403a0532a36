"""Where a BLIP-PaiNN training step's extra time goes: the noise-contrastive pass, side by side.

    OMP_NUM_THREADS=1 python benchmarks/train_step_parts.py [--repeats 9] [--batch 8]

Part 1: one training step (forward, forces, loss, double backward, optimiser) on acetylacetone
batches, over the deterministic model's step, for BLIP as configured by default, without the
contrastive pass (``uq.contrastive.weight = 0``) and with one every 4 steps instead of 2
(interleaved repeats of one epoch of 8 steps, medians and minima of the ratios).
Part 2: the contrastive pass alone (``BayesianPotential.rates`` on perturbed copies, the KL and
its backward into the rate heads) against a no-gradient MAP and sampled forward of the same
batch, for 8, 16 and 32 structures: whether it is dispatch-bound (then more copies per pass
would be nearly free) or grows with the rows.
Models: the example PaiNN of ``blip bench cost`` (untrained; float32, one thread).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from blip import config as config_mod
from blip.bayes.inference import kl_divergence
from blip.bench.cost import EXAMPLES, MODELS
from blip.data import collate
from blip.train.contrastive import perturbed_batch
from blip.train.datasets import prepare_data
from blip.train.loop import GraphSet, Trainer, _sizes

STEPS = 8
VARIANTS = {"deterministic": ("deterministic", {}), "blip (default)": ("blip", {}),
            "blip, no contrastive pass": ("blip", {"contrastive": {"weight": 0.0}}),
            "blip, contrastive every 4": ("blip", {"contrastive": {"every": 4}})}


def _setup(method: str, uq: dict, batch: int, tmp: str, structures: int):
    cfg = config_mod.resolve({
        "data": {"train_file": str(EXAMPLES / "acac" / "train_300K.xyz"), "max_train": structures,
                 "valid_fraction": 0.1, "e0s": str(EXAMPLES / "acac" / "isolated_atoms.xyz")},
        "model": dict(MODELS["painn"]), "uq": {"method": method, "samples": 16, **uq},
        "training": {"batch_size": batch, "seed": 0}, "output_dir": tmp})
    trainer, data = Trainer(cfg, progress=False), prepare_data(cfg)
    graphs, sizes = GraphSet(data.train, float(cfg["model"]["cutoff"])), _sizes(data.train)
    net, opt, ema = trainer._new_member(data, 0)
    return trainer, data, graphs, sizes, net, opt, ema


def step_ratios(batch: int, repeats: int) -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, uq) in VARIANTS.items():
            trainer, _, graphs, sizes, net, opt, ema = _setup(method, uq, batch, tmp, STEPS * batch)
            rng = np.random.default_rng(0)
            steps = -(-len(graphs) // batch)

            def epoch(e, trainer=trainer, net=net, opt=opt, ema=ema, graphs=graphs, sizes=sizes, rng=rng):
                trainer._train_epoch(net, opt, ema, graphs, sizes, rng, epoch=e)

            epoch(0)  # warm-up
            runs[name] = (epoch, steps, [])
        for rep in range(repeats):
            for epoch, steps, times in runs.values():
                start = time.perf_counter()
                epoch(rep + 1)
                times.append((time.perf_counter() - start) / steps * 1000)
    base_median = statistics.median(runs["deterministic"][2])
    base_min = min(runs["deterministic"][2])
    print(f"training step, acac batch {batch}, {repeats} interleaved repeats of one epoch:")
    for name, (_, _, times) in runs.items():
        print(f"  {name:28s} {statistics.median(times):6.1f} ms   median ratio {statistics.median(times) / base_median:.3f}"
              f"   min ratio {min(times) / base_min:.3f}")


def contrastive_pass(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, data, graphs, _, net, _, _ = _setup("blip", {}, 8, tmp, 40)
    rng = np.random.default_rng(0)
    print("contrastive pass alone (ms, best of the repeats):")
    for n in (8, 16, 32):
        batch = collate([graphs[i % len(graphs)] for i in range(n)], dtype=torch.float32)

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
    args = parser.parse_args()
    torch.set_num_threads(1)
    step_ratios(args.batch, args.repeats)
    contrastive_pass(max(3, args.repeats // 2))


if __name__ == "__main__":
    main()
