"""``blip relax``: geometry (and cell) optimisation with the noise-free model, and the uncertainty
of the structure it ends in.

The optimiser (ASE's FIRE, BFGS or LBFGS) follows the MAP forces (and, with ``cell``, the MAP
stress through ASE's ``FrechetCellFilter`` at ``pressure_GPa``). Every ``every`` steps and at
the end the structure is evaluated with K samples; above ``max_force_std`` (eV/A, the max
per-atom norm of the force std, as in ``blip md``) the relaxation stops with status
"uncertain": the structure has left the region where the model can be trusted.

The result's ``atoms`` carries ``energy``, ``forces`` (and ``stress``) of the MAP model and
the info keys ``energy_std`` (eV), ``max_force_std`` (eV/A), ``fmax`` (eV/A), ``steps``,
``converged``, ``status`` and, for periodic cells, ``stress_std`` (6,) eV/A^3.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator

from .calculator import BlipCalculator, max_atom_force_std
from .errors import ConfigError

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")


@dataclass
class RelaxSettings:
    """fmax in eV/A (on the filtered degrees of freedom with ``cell``), pressure in GPa."""

    fmax: float = 0.05
    steps: int = 500
    optimizer: str = "FIRE"
    cell: bool = False
    pressure_GPa: float = 0.0
    max_force_std: float | None = None
    every: int = 10
    samples: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.fmax <= 0 or self.steps < 0 or self.every < 1:
            raise ConfigError("relax: --fmax must be > 0, --steps >= 0 and --every >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"relax: --optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.max_force_std is not None and self.max_force_std <= 0:
            raise ConfigError("relax: --max-force-std must be > 0 eV/A")


@dataclass
class RelaxResult:
    """status: "converged", "not converged" (step limit) or "uncertain" (stopped by the watch)."""

    atoms: object
    status: str
    steps: int
    energy_std: float
    max_force_std: float


def _uncertainty(watch: BlipCalculator, atoms) -> dict:
    atoms = atoms.copy()
    atoms.calc = watch
    atoms.get_forces()
    r = watch.results
    out = {"energy_std": float(r["energy_std"]), "max_force_std": max_atom_force_std(r["forces_std"])}
    if "stress_std" in r:
        out["stress_std"] = np.asarray(r["stress_std"], dtype=float)
    return out


def relax(model, atoms, settings: RelaxSettings, trajectory=None, source: str = "structure") -> RelaxResult:
    """Relax a copy of ``atoms`` with ``model`` (BlipModel or path); see the module docstring."""
    import ase.optimize
    from ase.filters import FrechetCellFilter

    s = settings
    s.validate()
    calc = BlipCalculator(model, samples=s.samples, seed=s.seed, mode="map")
    calc.check_atoms(atoms, source)
    if s.cell and not np.all(atoms.pbc):
        raise ConfigError(f"relax: {source}: --cell needs a cell periodic in all three directions")
    watch = BlipCalculator(calc.model, samples=s.samples, seed=s.seed, mode="sample")
    atoms = atoms.copy()
    atoms.info = {}
    atoms.calc = calc
    target = FrechetCellFilter(atoms, scalar_pressure=s.pressure_GPa * units.GPa) if s.cell else atoms
    opt = getattr(ase.optimize, s.optimizer)(target, logfile=None, trajectory=trajectory)
    status, check = "not converged", None
    for converged in opt.irun(fmax=s.fmax, steps=s.steps):  # yields whether fmax is reached
        status = "converged" if converged else "not converged"
        if s.max_force_std is not None and opt.nsteps % s.every == 0:
            check = _uncertainty(watch, atoms)
            if check["max_force_std"] > s.max_force_std:
                status = "uncertain"
                break
    if check is None or status != "uncertain":
        check = _uncertainty(watch, atoms)
    final = atoms.copy()
    labels = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if np.any(atoms.pbc):
        labels["stress"] = atoms.get_stress()
    final.calc = SinglePointCalculator(final, **labels)
    fmax = float(np.linalg.norm(target.get_forces(), axis=1).max()) if len(atoms) else 0.0
    final.info.update(check, fmax=fmax, steps=opt.nsteps, converged=status == "converged", status=status)
    return RelaxResult(final, status, opt.nsteps, check["energy_std"], check["max_force_std"])


# -- command line ----------------------------------------------------------------------
def cmd_relax(args) -> int:
    import ase.io

    from ._files import atomic_path
    from .data import read_structures
    from .io import load

    settings = RelaxSettings(fmax=args.fmax, steps=args.steps, optimizer=args.optimizer, cell=args.cell,
                             pressure_GPa=args.pressure, max_force_std=args.max_force_std, every=args.every,
                             samples=args.samples, seed=args.seed)
    settings.validate()
    atoms = read_structures(args.structure, index=args.index)[0]
    model = load(args.model, device=args.device)
    result = relax(model, atoms, settings, trajectory=args.trajectory, source=f"{args.structure}[{args.index}]")
    with atomic_path(args.output, suffix=".xyz") as tmp:
        ase.io.write(tmp, result.atoms, format="extxyz")
    print(f"blip relax: {result.status} after {result.steps} steps; energy {result.atoms.get_potential_energy():.6f} "
          f"+- {result.energy_std:.4g} eV, max force std {result.max_force_std:.4g} eV/A -> {args.output}",
          file=sys.stderr)
    return 0 if result.status != "uncertain" else 4


def register(subparsers) -> None:
    from .cli import nonnegative_int

    p = subparsers.add_parser("relax", help="geometry / cell optimisation with the uncertainty of the result")
    p.add_argument("model", help="model file (model.pt)")
    p.add_argument("structure", help="starting structure (any ASE-readable file)")
    p.add_argument("-o", "--output", required=True, help="relaxed structure (extxyz)")
    p.add_argument("--index", default="0", help="which structure of the file (ASE index, default 0)")
    p.add_argument("--fmax", type=float, default=0.05, help="convergence: max force, eV/A")
    p.add_argument("--steps", type=int, default=500, help="most optimiser steps")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="FIRE")
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter; periodic cells)")
    p.add_argument("--pressure", type=float, default=0.0, help="with --cell: external pressure, GPa")
    p.add_argument("--max-force-std", type=float, default=None,
                   help="stop (exit status 4) when the max per-atom force std exceeds this, eV/A")
    p.add_argument("--every", type=int, default=10, help="uncertainty check every N steps (with --max-force-std)")
    p.add_argument("--trajectory", default=None, help="ASE trajectory file of the optimisation (.traj)")
    p.add_argument("--samples", type=nonnegative_int, default=None, help="K of the checks (default: uq.samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_relax)
