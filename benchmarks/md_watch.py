"""Uncertainty-watched MD: how late each watch setting stops a run leaving the training data.

    OMP_NUM_THREADS=1 python benchmarks/md_watch.py MODEL.pt START.xyz --temperature 1500 \
        --threshold-factor 3 --steps 2000

The dynamics are driven by the MAP forces with a fixed seed, so every setting follows the
same trajectory; only the checks differ. The reference checks every step with K = 16; the
threshold is ``threshold-factor`` x the max per-atom force std of the starting structure.
For each (K, every M, adaptive) it prints the step at which the run stopped, the delay
behind the reference, and the wall time over the reference run's. The cost of the watch
in familiar territory is measured by ``blip bench cost`` (MD rows).
"""

from __future__ import annotations

import argparse
import time

import torch

import blip
from blip.calculator import BlipCalculator, max_atom_force_std
from blip.data import read_structures
from blip.md import MDSettings, run_md

SETTINGS = [(16, 1, None), (16, 10, None), (16, 20, 0.5), (8, 20, 0.5), (4, 20, 0.5), (16, 60, 0.5), (8, 20, None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("start")
    parser.add_argument("--temperature", type=float, default=1500.0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threshold-factor", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = blip.load(args.model)
    atoms = read_structures(args.start)[0]
    calc = BlipCalculator(model, samples=16, seed=0)
    probe = atoms.copy()
    probe.calc = calc
    probe.get_forces()
    threshold = args.threshold_factor * max_atom_force_std(calc.results["forces_std"])
    print(f"threshold {threshold:.4g} eV/A ({args.threshold_factor} x the start's max force std); "
          f"{args.temperature:g} K, up to {args.steps} steps of 0.5 fs")
    print("| seed | K | every | adaptive | stopped at step | delay [steps] | wall [x reference] |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for seed in range(args.seeds):
        reference = None
        for k, every, adaptive in SETTINGS:
            s = MDSettings(steps=args.steps, temperature_K=args.temperature, max_force_std=threshold, every=every,
                           adaptive=adaptive, samples=k, seed=seed, max_temperature_K=10 * args.temperature)
            start = time.perf_counter()
            result = run_md(model, atoms, s)
            wall = time.perf_counter() - start
            stop = result.steps_done if result.status == "uncertain" else None
            if reference is None:
                reference = (stop, wall)
            delay = None if stop is None or reference[0] is None else stop - reference[0]
            print(f"| {seed} | {k} | {every} | {adaptive or 'off'} | {stop if stop is not None else 'never'} | "
                  f"{delay if delay is not None else '–'} | {wall / reference[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
