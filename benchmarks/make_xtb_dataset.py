"""Make the bundled GFN2-xTB ammonia data set of ``blip bench energy-split`` (runs offline).

    python benchmarks/make_xtb_dataset.py -o blip/bench/data/ammonia_gfn2.xyz
    python benchmarks/make_xtb_dataset.py --molecule H3CNH2 -o methylamine_gfn2.xyz   # another molecule

``--molecule`` takes any name of ``ase.build.molecule`` (the G2 set); the rest of the recipe is the same.

How the file was made (the defaults below): NH3 relaxed with GFN2-xTB (tblite, BFGS,
fmax 1e-3 eV/A); Langevin MD with GFN2-xTB forces at 300, 600, 1000, 1500, 2000 and
3000 K (0.5 fs steps, friction 0.02 / fs, 400 steps of equilibration, then a frame every
25 steps, 110 frames per temperature); plus 140 random distortions of the relaxed
molecule (Gaussian displacements with a standard deviation drawn uniformly in
0.02-0.15 A per structure). A trajectory whose SCF fails is restarted from the relaxed
molecule with new velocities (the script prints how often). Every frame is labelled by a fresh GFN2-xTB single point
(energy eV, forces eV/A; keys ``energy`` / ``forces``); frames whose SCF fails are
skipped. ``config_type`` is ``md_<T>K`` or ``distorted``. No isolated-atom file: the
protocol uses least-squares reference energies (``e0s: average``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS
from tqdm import tqdm

TEMPERATURES = (300, 600, 1000, 1500, 2000, 3000)


def xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def labelled(atoms: Atoms, info: dict) -> Atoms | None:
    a = atoms.copy()
    a.set_constraint()  # labels are the raw xTB forces, not those of the MD's centre-of-mass constraint
    a.calc = xtb()
    try:
        energy, forces = float(a.get_potential_energy()), a.get_forces().copy()
    except Exception as exc:  # an SCF that does not converge
        warnings.warn(f"skipped a frame: {exc}", stacklevel=2)
        return None
    out = Atoms(a.numbers, a.positions)
    out.info.update(info)
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="blip/bench/data/ammonia_gfn2.xyz")
    p.add_argument("--frames", type=int, default=110, help="MD frames per temperature")
    p.add_argument("--every", type=int, default=25, help="MD steps between frames")
    p.add_argument("--distorted", type=int, default=140)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--molecule", default="NH3", help="a name of ase.build.molecule (default NH3)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)

    eq = molecule(args.molecule)
    eq.calc = xtb()
    BFGS(eq, logfile=None).run(fmax=1e-3)
    frames = []
    for t in TEMPERATURES:
        restarts, dyn = 0, None
        bar = tqdm(total=args.frames, desc=f"MD {t} K")
        while bar.n < args.frames:
            if dyn is None:  # (re)start from the relaxed molecule
                a = eq.copy()
                a.calc = xtb()
                a.set_constraint(FixCom())
                MaxwellBoltzmannDistribution(a, temperature_K=t, rng=rng)
                dyn = Langevin(a, 0.5 * units.fs, temperature_K=t, friction=0.02 / units.fs, fixcm=False,
                               rng=rng)
                try:
                    dyn.run(400)
                except Exception:
                    dyn, restarts = None, restarts + 1
                    continue
            try:
                dyn.run(args.every)
            except Exception:  # SCF failure (e.g. a dissociating molecule): restart the trajectory
                dyn, restarts = None, restarts + 1
                continue
            frame = labelled(a, {"config_type": f"md_{t}K", "temperature": float(t)})
            if frame is not None:
                frames.append(frame)
                bar.update()
        bar.close()
        if restarts:
            print(f"{t} K: {restarts} trajectory restart(s) after SCF failures")
    for _ in tqdm(range(args.distorted), desc="distortions"):
        a = eq.copy()
        a.positions += rng.normal(scale=rng.uniform(0.02, 0.15), size=a.positions.shape)
        frame = labelled(a, {"config_type": "distorted"})
        if frame is not None:
            frames.append(frame)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, frames, format="extxyz")
    print(f"wrote {len(frames)} structures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
