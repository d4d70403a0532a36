"""Training cost of BLIP (and MC dropout) over the deterministic model: the trainer's own steps.

Every method trains with ``blip.train.loop.Trainer``'s epoch function on the same batches:
forward (with noise for BLIP / MC dropout), energy + forces loss, BLIP's KL and its
noise-contrastive pass, backward (double backward through the forces), clipping, the AdamW
step and the EMA update; feature statistics included. Methods are timed in interleaved
repetitions (order rotating), so slow drifts of a shared machine hit all alike; the median
time per step and its ratio to the deterministic model are printed.

    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py examples/acac/config.yaml
    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py examples/acac/mace.yaml --set uq.samples=4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from blip import config as config_mod
from blip.train.datasets import prepare_data
from blip.train.loop import Trainer, _graphs

METHODS = ("deterministic", "blip", "mc_dropout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a blip train config (its data and model are used)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per method")
    parser.add_argument("--batches", type=int, default=8, help="training steps per repetition")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",")]
    setups = []
    for method in methods:
        cfg = config_mod.load(args.config, args.set + [f"uq.method={method}", "output_dir=/tmp/blip-step-cost"])
        trainer = Trainer(cfg, progress=False)
        data = prepare_data(cfg)
        graphs = _graphs(data.train, float(cfg["model"]["cutoff"]))
        bs = int(cfg["training"]["batch_size"])
        graphs = (graphs * (1 + args.batches * bs // max(len(graphs), 1)))[:args.batches * bs]
        model, opt, ema = trainer._new_member(data, 0)
        rng = np.random.default_rng(0)
        trainer._train_epoch(model, opt, ema, graphs[:2 * bs], rng)  # warm-up (TorchScript, caches)
        setups.append((method, trainer, model, opt, ema, graphs, rng))
    times = {m: [] for m in methods}
    for rep in range(args.reps):
        order = setups[rep % len(setups):] + setups[:rep % len(setups)]
        for method, trainer, model, opt, ema, graphs, rng in order:
            start = time.perf_counter()
            trainer._train_epoch(model, opt, ema, graphs, rng)
            times[method].append((time.perf_counter() - start) / args.batches)
    base = statistics.median(times[methods[0]])
    print(f"config {args.config} {' '.join(args.set)}; {args.batches} steps x {args.reps} interleaved repetitions, "
          f"1 torch thread")
    for m in methods:
        t = statistics.median(times[m])
        print(f"{m:14s} {1000 * t:8.1f} ms/step   x{t / base:.2f} of {methods[0]}")


if __name__ == "__main__":
    main()
