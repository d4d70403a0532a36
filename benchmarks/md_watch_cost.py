"""Cost of the MD watch per check, in blocks of plain MD steps, interleaved in one process.

    OMP_NUM_THREADS=1 python benchmarks/md_watch_cost.py [--backbones painn,mace] [--blocks 15]

For each backbone (an untrained model of the example config: cost does not depend on the
weights), on acetylacetone: NVT (Langevin, 0.5 fs, 300 K) driven by the MAP forces, timed in
blocks; every block times M plain steps and then one watch check (K samples, the check of
``blip md``: ``model.predict`` with the step's MAP energy and forces as ``map_values``, so no
noise-free pass) on the block's last structure,
for every K in turn. The watched run with a check every M steps costs
``(t_steps(M) + t_check(K)) / t_steps(M)`` of the plain run. Timing a check right after the
steps it follows, block by block, keeps the two under the same machine load, which a
whole-run comparison on a shared machine does not (there single ratios swing by 20-30 %).
Prints the median over blocks for M = 10, 20, 30 and every K, and a check's cost in MD steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from ase import units
from ase.md.langevin import Langevin

from blip.bench import cost
from blip.calculator import BlipCalculator, max_atom_force_std

SAMPLES = (4, 8, 16)
EVERY = (10, 20, 30)


def check_seconds(model, atoms, samples: int) -> float:
    """Wall seconds of one watch check of ``atoms`` with K = ``samples``."""
    step = atoms.calc.results  # the MAP energy and forces of the step just taken
    start = time.perf_counter()
    out = model.predict([atoms], samples=samples, seed=0, stress=False,
                        map_values={"energy": [step["energy"]], "forces": [step["forces"]]})
    max_atom_force_std(out["forces_std"][0])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="painn,mace")
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="plain MD steps per block")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.backbones.split(","):
        model, acac = cost.acac_blip_model(name)
        atoms = acac[0].copy()
        atoms.calc = BlipCalculator(model, seed=0, mode="map")
        dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=False)
        dyn.run(5)  # warm-up
        for k in SAMPLES:
            check_seconds(model, atoms, k)
        step, checks = [], {k: [] for k in SAMPLES}
        for _ in range(args.blocks):
            start = time.perf_counter()
            dyn.run(args.steps)
            step.append((time.perf_counter() - start) / args.steps)
            for k in SAMPLES:
                checks[k].append(check_seconds(model, atoms, k) / step[-1])  # in MD steps of this block
        print(f"{name}: one plain MD step {1e3 * statistics.median(step):.1f} ms (median of {args.blocks} blocks)")
        for k in SAMPLES:
            c = statistics.median(checks[k])
            ratios = ", ".join(f"every {m}: {1 + c / m:.3f}x" for m in EVERY)
            print(f"  K = {k:2d}: a check costs {c:.2f} MD steps; watched over plain MD: {ratios}", flush=True)


if __name__ == "__main__":
    main()
