"""How many operators (kernels) a training step dispatches, by the BLIP function that dispatched them.

    OMP_NUM_THREADS=1 python benchmarks/train_step_kernels.py [--batch 8] [--train-file FILE.xyz] [--top 25]

On a CPU a training step of small molecules costs about 4 us per dispatched operator whatever its
size (docs/results/cost/README.md), so the count is a timing-free measure of BLIP's overhead over
the plain model. For the deterministic model and BLIP (the example PaiNN of ``blip bench cost``,
untrained, float32) one epoch of 8 steps is run under a ``TorchDispatchMode`` that attributes every
operator to the innermost ``blip`` function on the Python stack ("optimizer" for ``torch.optim``'s,
"torch.nn.utils" for gradient clipping; the backward pass counts under the function that called
it, ``train/loop.py:_train_epoch``). Prints the operators per step and the largest sources.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip.bench import cost

STEPS = 8


class OperatorCount(TorchDispatchMode):
    """Counts dispatched operators by the innermost blip function (or torch part) that called them."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = "backward"
        for frame in reversed(traceback.extract_stack(limit=40)[:-1]):
            if "/blip/" in frame.filename:
                source = frame.filename.split("/blip/")[-1] + ":" + frame.name
                break
            if "torch/optim" in frame.filename:
                source = "optimizer"
                break
            if "torch/nn/utils" in frame.filename:
                source = "torch.nn.utils"
                break
        self.counts[source] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-file", help="labelled extxyz of other molecules (default: acetylacetone)")
    parser.add_argument("--top", type=int, default=25, help="sources listed per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("deterministic", "blip"):
            run, steps = cost.training_epoch(cost.MODELS["painn"], method, {}, STEPS, args.batch, tmp,
                                             train_file=args.train_file)
            with OperatorCount() as counter:
                run(1)
            total = sum(counter.counts.values()) / steps
            print(f"{method}: {total:.0f} operators per training step ({args.train_file or 'acac'}, batch {args.batch})")
            for source, n in counter.counts.most_common(args.top):
                print(f"  {n / steps:8.1f}  {source}")


if __name__ == "__main__":
    main()
