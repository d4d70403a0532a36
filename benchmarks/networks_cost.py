"""Predict cost of two BLIP networks (``uq.networks: 2``) against one, in MAP passes of one network.

    OMP_NUM_THREADS=1 python benchmarks/networks_cost.py [--repeats 7]

Untrained PaiNN of the example config (cost does not depend on the weights), 8 acetylacetone
structures, float32, one thread; the two-network model gets the one-network model's default
calibration for each network (so each records its feature distances as a recalibrated model
does). Each timing is over the MAP predict of one network timed just before it; median of the
interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blip.bench.cost import acac_blip_model, fit_statistics
from blip.build import build_potential
from blip.predictor import BlipModel


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    one, acac = acac_blip_model("painn")
    torch.manual_seed(1)
    config = {**one.config, "uq": {**one.config["uq"], "networks": 2}}
    two = BlipModel([one.members[0], build_potential(config, one.summary)], config, one.summary,
                    calibration={"energy": 1.0, "forces": 1.0, "networks": [dict(one.calibration)] * 2})
    fit_statistics(two, acac)
    for model in (one, two):
        model.predict(acac, samples=4, seed=0)  # warm-up
    ratios = {(name, k): [] for name in ("one network", "two networks") for k in (4, 16)}
    for _ in range(args.repeats):
        for name, k in ratios:
            model = one if name == "one network" else two
            reference = seconds(lambda: one.predict(acac, samples=0, seed=0))
            ratios[(name, k)].append(seconds(lambda: model.predict(acac, samples=k, seed=0)) / reference)
    for (name, k), values in ratios.items():
        print(f"{name}, K = {k:2d}: {statistics.median(values):6.2f} MAP passes "
              f"(min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
