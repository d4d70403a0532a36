"""Make a small GFN1-xTB silicon set with stress labels, for checking stress uncertainties (offline).

    python benchmarks/make_si_stress_dataset.py -o si_stress_gfn1.xyz       # about 5 min on one core

The shared silicon data carry no stress, so this set exists to score stress error bars at all.
The recipe (defaults below): GFN1-xTB (tblite; GFN2-xTB's bulk silicon has no sensible
equation of state) on 8-atom cubic diamond cells at GFN1's own lattice constant (a parabola
through a scan of 5.60-5.80 A, about 5.70 A), electronic temperature 1000 K (at tblite's default
300 K the SCF of small vacancy cells does not converge; energies are then free energies, with
forces and stress their derivatives). Every structure gets a fresh single point with
energy (eV), forces (eV/A) and stress (eV/A^3, ASE's sign and Voigt order; keys ``energy``,
``forces``, ``stress``) and a ``config_type``:

* ``strained``: every strain component uniform in +-2 %, atoms rattled by a Gaussian whose
  standard deviation is uniform in 0-0.1 A (the training distribution);
* ``axial``: strain along the cube axes only (+-2 %), no rattle: forces and off-diagonal
  stresses are zero by symmetry (as in perfect crystal cells of real data sets);
* ``large_strain``: strain components in +-6 %, rattled as ``strained``;
* ``hot``: rattled by 0.15-0.3 A, strained as ``strained``;
* ``vacancy``: one atom removed, strained and rattled as ``strained``.

Structures whose SCF fails are skipped (the script prints how many).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from tqdm import tqdm

#: config_type -> (max strain component, rattle range in A, atoms removed)
KINDS = {"strained": (0.02, (0.0, 0.1), 0), "axial": (0.02, None, 0), "large_strain": (0.06, (0.0, 0.1), 0),
         "hot": (0.02, (0.15, 0.3), 0), "vacancy": (0.02, (0.0, 0.1), 1)}
#: K; tblite's default 300 K leaves the SCF of small vacancy cells unconverged
ELECTRONIC_TEMPERATURE = 1000.0
COUNTS = {"strained": 600, "axial": 100, "large_strain": 100, "hot": 100, "vacancy": 100}


def xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN1-xTB", verbosity=0, electronic_temperature=ELECTRONIC_TEMPERATURE, max_iterations=500)


def lattice_constant() -> float:
    """GFN1-xTB's cubic diamond lattice constant (A): vertex of a parabola through E(a)."""
    grid = np.linspace(5.60, 5.80, 5)
    energies = []
    for a in grid:
        cell = bulk("Si", "diamond", a=float(a), cubic=True)
        cell.calc = xtb()
        energies.append(cell.get_potential_energy())
    c2, c1, _ = np.polyfit(grid, energies, 2)
    return float(-c1 / (2 * c2))


def structure(a0: float, kind: str, rng: np.random.Generator) -> Atoms:
    """One unlabelled cell of ``kind`` (see :data:`KINDS`)."""
    max_strain, rattle, removed = KINDS[kind]
    atoms = bulk("Si", "diamond", a=a0, cubic=True)
    if kind == "axial":
        strain = np.diag(rng.uniform(-max_strain, max_strain, 3))
    else:
        upper = np.triu(rng.uniform(-max_strain, max_strain, (3, 3)))
        strain = upper + np.triu(upper, 1).T
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + strain), scale_atoms=True)
    if removed:
        del atoms[[int(i) for i in rng.choice(len(atoms), removed, replace=False)]]
    if rattle is not None:
        atoms.positions += rng.normal(scale=rng.uniform(*rattle), size=atoms.positions.shape)
    atoms.wrap()
    return atoms


def labelled(atoms: Atoms, kind: str) -> Atoms | None:
    a = atoms.copy()
    a.calc = xtb()
    try:
        energy, forces, stress = float(a.get_potential_energy()), a.get_forces().copy(), a.get_stress().copy()
    except Exception as exc:  # an SCF that does not converge
        warnings.warn(f"skipped a structure: {exc}", stacklevel=2)
        return None
    out = Atoms(a.numbers, a.positions, cell=a.cell, pbc=True)
    out.info["config_type"] = kind
    out.calc = SinglePointCalculator(out, energy=energy, forces=forces, stress=stress)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default="si_stress_gfn1.xyz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count (e.g. 0.1 for a quick set)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    a0 = lattice_constant()
    print(f"GFN1-xTB lattice constant {a0:.4f} A")
    frames, skipped = [], 0
    for kind, count in COUNTS.items():
        for _ in tqdm(range(max(1, round(count * args.scale))), desc=kind):
            frame = labelled(structure(a0, kind, rng), kind)
            if frame is None:
                skipped += 1
            else:
                frames.append(frame)
    if skipped:
        print(f"skipped {skipped} structure(s) whose SCF failed")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, frames, format="extxyz")
    print(f"wrote {len(frames)} structures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
