"""``blip md``: molecular dynamics with the BLIP calculator and an uncertainty watch.

The dynamics are driven by the noise-free MAP forces (the plain model's cost, a smooth
potential, so NVE conserves energy). Every ``every`` steps the same structure is also
evaluated with K samples, giving the energy std (eV) and the max per-atom force std:
``max_i sqrt(sum_c std_ic**2)`` (eV/A), the norm of atom i's vector of per-component
standard deviations. Above ``max_force_std`` the run stops (or, with ``flag_only``, only
marks the frame); the offending frame is always written. Adaptive checks: once the latest
check is above ``adaptive`` x ``max_force_std``, every step is checked until it falls back,
so sparse checks cost little in familiar territory and still stop a run promptly.

Trajectory frames (extxyz) carry ``energy`` and ``forces`` (MAP, eV and eV/A) and the info
keys ``step``, ``time_fs``, ``temperature_K``, ``kinetic_energy``, ``total_energy`` (eV),
``energy_std`` (eV), ``max_force_std`` (eV/A), both standard deviations measured at step
``std_step`` (the latest check), and ``flagged``. Momenta are stored as well, and for periodic
cells the cell, ``volume_A3`` and the MAP ``stress`` (eV/A^3, ASE's Voigt convention).

Ensembles: ``nvt`` (Langevin), ``nve`` (velocity Verlet) and ``npt``: ASE's
Martyna-Tobias-Klein barostat with Nose-Hoover chains (``MTKNPT``, a fully flexible cell;
``isotropic`` scales the cell uniformly), at ``pressure_GPa``; periodic cells only.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator

from .calculator import BlipCalculator, max_atom_force_std
from .errors import BlipError, ConfigError


class MDFault(BlipError):
    """The dynamics broke down (NaN energy or forces, exploding temperature)."""


ENSEMBLES = ("nvt", "nve", "npt")
#: K of a watch check unless given. 8 samples rank and flag as 16 do (the same stop steps in
#: docs/results/cost/md_watch.md; recalibrated force NLL 0.02-0.08 nats worse in docs/results/samples)
#: at about half the cost: a check of acetylacetone costs 4.3 plain MD steps against 8.1 (PaiNN;
#: MACE 3.6 against 7.6), benchmarks/md_watch_cost.py.
WATCH_SAMPLES = 8


@dataclass
class MDSettings:
    """Settings of one run. Times in fs, temperatures in K, force std in eV/A."""

    steps: int = 1000
    temperature_K: float = 300.0
    timestep_fs: float = 0.5
    ensemble: str = "nvt"  # "nvt" (Langevin), "nve" (velocity Verlet) or "npt" (MTK barostat)
    friction_per_fs: float = 0.01  # Langevin friction, 1/fs
    pressure_GPa: float = 0.0  # npt: external pressure
    tdamp_fs: float | None = None  # npt: thermostat time scale (default 100 timesteps)
    pdamp_fs: float | None = None  # npt: barostat time scale (default 1000 timesteps)
    isotropic: bool = False  # npt: scale the cell uniformly (else fully flexible)
    max_force_std: float | None = None  # threshold on the max per-atom force std, eV/A
    every: int = 20  # uncertainty check interval (steps); between checks MAP only
    adaptive: float | None = 0.5  # check every step while the last check is above this x max_force_std
    log_every: int | None = None  # frame interval (default: every)
    flag_only: bool = False  # mark uncertain frames instead of stopping
    samples: int | None = None  # K of the checks (default: WATCH_SAMPLES, at most the model's uq.samples)
    seed: int = 0  # velocities, Langevin noise and model noise
    max_temperature_K: float | None = None  # fault above this (default 10 T + 1000 K)
    init_velocities: bool = True  # Maxwell-Boltzmann at temperature_K (else keep momenta)
    dtype: str | None = None  # None: the model's; "float64" for precise energies

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError("md: --steps must be >= 0")
        if self.timestep_fs <= 0:
            raise ConfigError("md: --timestep must be > 0 fs")
        if self.temperature_K < 0:
            raise ConfigError("md: --temperature must be >= 0 K")
        if self.ensemble not in ENSEMBLES:
            raise ConfigError(f"md: --ensemble must be one of {', '.join(ENSEMBLES)}")
        if any(t is not None and t <= 0 for t in (self.tdamp_fs, self.pdamp_fs)):
            raise ConfigError("md: --tdamp and --pdamp must be > 0 fs")
        if self.ensemble == "nvt" and self.friction_per_fs <= 0:
            raise ConfigError("md: --friction must be > 0 (1/fs) for nvt")
        if self.every < 1 or (self.log_every is not None and self.log_every < 1):
            raise ConfigError("md: --every and --log-every must be >= 1")
        if self.max_force_std is not None and self.max_force_std <= 0:
            raise ConfigError("md: --max-force-std must be > 0 eV/A")
        if self.adaptive is not None and not 0 <= self.adaptive <= 1:
            raise ConfigError("md: --adaptive must be between 0 (off) and 1")

    @property
    def temperature_limit(self) -> float:
        if self.max_temperature_K is not None:
            return float(self.max_temperature_K)
        return 10.0 * self.temperature_K + 1000.0


@dataclass
class MDResult:
    """status: "completed", "uncertain" (stopped by the watch) or "fault"."""

    status: str
    steps_done: int
    frames: list = field(default_factory=list)  # written frames (only if keep_frames)
    n_frames: int = 0
    n_flagged: int = 0
    max_force_std_seen: float = 0.0  # eV/A, over all checks
    message: str = ""


class _Trajectory:
    """Frames appended to a temporary file, renamed to ``path`` when closed."""

    def __init__(self, path: str | Path | None, keep: bool):
        self.path, self.keep, self.frames, self.count = (Path(path) if path else None), keep, [], 0
        self._handle = self._tmp = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
            self._handle = os.fdopen(fd, "w")

    def write(self, frame) -> None:
        if self._handle is not None:
            import ase.io

            ase.io.write(self._handle, frame, format="extxyz")
            self._handle.flush()
        if self.keep:
            self.frames.append(frame)
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            os.replace(self._tmp, self.path)


def _dynamics(atoms, s: MDSettings):
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    if s.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=s.timestep_fs * units.fs)
    if s.ensemble == "npt":
        from ase.md.nose_hoover_chain import IsotropicMTKNPT, MTKNPT

        barostat = IsotropicMTKNPT if s.isotropic else MTKNPT
        return barostat(atoms, timestep=s.timestep_fs * units.fs, temperature_K=s.temperature_K,
                        pressure_au=s.pressure_GPa * units.GPa,
                        tdamp=(s.tdamp_fs or 100 * s.timestep_fs) * units.fs,
                        pdamp=(s.pdamp_fs or 1000 * s.timestep_fs) * units.fs)
    return Langevin(atoms, timestep=s.timestep_fs * units.fs, temperature_K=s.temperature_K,
                    friction=s.friction_per_fs / units.fs, fixcm=False,
                    rng=np.random.default_rng(s.seed + 1))


def _init_velocities(atoms, s: MDSettings) -> None:
    from ase.md import velocitydistribution as vd

    if not s.init_velocities:
        return
    if s.temperature_K <= 0 or len(atoms) < 2:  # one atom: no motion relative to its centre of mass
        atoms.set_momenta(np.zeros((len(atoms), 3)))
        return
    rng = np.random.default_rng(s.seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29
        vd.thermalize_momenta(atoms, s.temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=s.temperature_K, rng=rng)
    vd.Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        vd.ZeroRotation(atoms)


class _State:
    """What a frame needs: copies of positions, momenta, MAP energy/forces and the watch."""

    def __init__(self, atoms, step, dt_fs, energy, forces, check):
        self.step, self.time_fs = step, step * dt_fs
        self.positions, self.momenta = atoms.get_positions(), atoms.get_momenta()
        self.cell = atoms.cell.array.copy()
        self.stress = atoms.get_stress() if atoms.pbc.any() else None
        self.energy, self.forces = float(energy), np.array(forces, dtype=float)
        self.kinetic = float(atoms.get_kinetic_energy())
        self.temperature = float(atoms.get_temperature())
        self.check = dict(check)
        self.written = False

    def frame(self, template, flagged=False, note=None):
        f = template.copy()
        f.info = {}
        f.set_cell(self.cell)
        f.set_positions(self.positions)
        f.set_momenta(self.momenta)
        extra = {} if self.stress is None else {"stress": self.stress}
        f.calc = SinglePointCalculator(f, energy=self.energy, forces=self.forces, **extra)
        if self.stress is not None:
            f.info["volume_A3"] = float(abs(np.linalg.det(self.cell)))
        f.info.update(step=self.step, time_fs=self.time_fs, temperature_K=self.temperature,
                      kinetic_energy=self.kinetic, total_energy=self.energy + self.kinetic,
                      energy_std=self.check["energy_std"], max_force_std=self.check["max_force_std"],
                      std_step=self.check["std_step"], flagged=bool(flagged))
        if note:
            f.info["note"] = note
        return f


def run_md(model, atoms, settings: MDSettings, trajectory=None, progress: bool = False,
           keep_frames: bool = False, source: str = "structure") -> MDResult:
    """Run dynamics from ``atoms`` (not modified) with ``model`` (BlipModel or path).

    Writes frames to ``trajectory`` (extxyz, renamed into place when the run ends) every
    ``log_every`` steps, plus flagged frames and the last one. Raises DataError before
    step 0 for an element the model does not know, MDFault (after saving the last good
    frame) for a NaN energy/force or a temperature above ``temperature_limit``.
    """
    from tqdm.auto import tqdm

    s = settings
    s.validate()
    dyn_calc = BlipCalculator(model, samples=s.samples, seed=s.seed, mode="map", dtype=s.dtype)
    dyn_calc.check_atoms(atoms, source)  # before step 0, before any file is opened
    if s.ensemble == "npt" and not np.all(atoms.pbc):
        raise ConfigError(f"md: {source}: --ensemble npt needs a cell periodic in all three directions")
    samples = s.samples if s.samples is not None else min(WATCH_SAMPLES, dyn_calc.model.default_samples)
    atoms = atoms.copy()
    atoms.info = {}
    atoms.calc = dyn_calc
    _init_velocities(atoms, s)
    dyn = _dynamics(atoms, s)
    log_every = s.log_every or s.every
    template = atoms.copy()
    result = MDResult(status="completed", steps_done=0)
    check = {"energy_std": float("nan"), "max_force_std": float("nan"), "std_step": -1}
    last_good = None
    traj = _Trajectory(trajectory, keep_frames)
    bar = tqdm(total=s.steps, desc="md", unit="step", disable=not progress)
    try:
        for _ in dyn.irun(s.steps):
            step = dyn.nsteps
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            temperature = atoms.get_temperature()
            problem = _fault(energy, forces, atoms.get_positions(), temperature, s.temperature_limit)
            if problem:
                _stop(result, traj, last_good, template, step, problem, source, trajectory)
            if step % s.every == 0 or _close_to_threshold(check, s):
                # the step's MAP energy and forces are the centre of the spread: no second MAP pass
                r = dyn_calc.model.predict([atoms], samples=samples, seed=s.seed, stress=False, source=source,
                                           map_values={"energy": [energy], "forces": [forces]})
                check = {"energy_std": float(r["energy_std"][0]),
                         "max_force_std": max_atom_force_std(r["forces_std"][0]), "std_step": step}
                if not (np.isfinite(check["energy_std"]) and np.isfinite(check["max_force_std"])):
                    _stop(result, traj, last_good, template, step, "sampled uncertainty is NaN/inf", source, trajectory)
                result.max_force_std_seen = max(result.max_force_std_seen, check["max_force_std"])
            flagged = (s.max_force_std is not None and check["std_step"] == step
                       and check["max_force_std"] > s.max_force_std)
            state = _State(atoms, step, s.timestep_fs, energy, forces, check)
            if flagged:
                result.n_flagged += 1
            if flagged or step % log_every == 0 or step == s.steps:
                traj.write(state.frame(template, flagged=flagged))
                state.written = True
            last_good = state
            result.steps_done = step
            if step:
                bar.update(1)
            bar.set_postfix(T=f"{temperature:.0f}K", max_F_std=f"{check['max_force_std']:.3g}", refresh=False)
            if flagged and not s.flag_only:
                result.status = "uncertain"
                result.message = (f"stopped at step {step}: max per-atom force std {check['max_force_std']:.4g} eV/A "
                                  f"> {s.max_force_std:.4g} eV/A (offending frame saved)")
                break
    finally:
        bar.close()
        traj.close()
        result.frames, result.n_frames = traj.frames, traj.count
    if result.status == "completed":
        result.message = f"completed {result.steps_done} steps"
        if s.max_force_std is not None:
            result.message += f"; {result.n_flagged} frame(s) above {s.max_force_std:.4g} eV/A"
    return result


def _close_to_threshold(check: dict, s: MDSettings) -> bool:
    """Whether the latest check is above ``adaptive`` x ``max_force_std`` (then check every step)."""
    if s.max_force_std is None or not s.adaptive:
        return False
    return check["max_force_std"] >= s.adaptive * s.max_force_std  # False while NaN (no check yet)


def _fault(energy, forces, positions, temperature, limit) -> str | None:
    if not np.isfinite(energy):
        return f"energy is {energy}"
    if not np.all(np.isfinite(forces)) or not np.all(np.isfinite(positions)):
        return "forces or positions are NaN/inf"
    if not np.isfinite(temperature) or temperature > limit:
        return f"temperature {temperature:.4g} K exceeds {limit:.4g} K (exploding dynamics)"
    return None


def _stop(result, traj, last_good, template, step, problem, source, trajectory):
    """Save the last good frame (if not yet written) and raise MDFault carrying ``result``."""
    if last_good is not None and not last_good.written:
        traj.write(last_good.frame(template, note=f"last good frame before fault at step {step}: {problem}"))
    where = f"last good frame (step {last_good.step}) saved" if last_good is not None else "no good frame"
    if trajectory:
        where += f" in {trajectory}"
    result.status = "fault"
    result.message = f"md: {source}: step {step}: {problem}; run stopped, {where}"
    fault = MDFault(result.message)
    fault.result = result  # its frames are filled in when the trajectory closes
    raise fault


# -- command line ----------------------------------------------------------------------
def cmd_md(args) -> int:
    from .data import read_structures
    from .io import load

    settings = MDSettings(
        steps=args.steps, temperature_K=args.temperature, timestep_fs=args.timestep, ensemble=args.ensemble,
        friction_per_fs=args.friction, pressure_GPa=args.pressure, tdamp_fs=args.tdamp, pdamp_fs=args.pdamp,
        isotropic=args.isotropic, max_force_std=args.max_force_std, every=args.every, adaptive=args.adaptive or None,
        log_every=args.log_every, flag_only=args.flag_only, samples=args.samples, seed=args.seed,
        max_temperature_K=args.max_temperature, init_velocities=not args.keep_velocities, dtype=args.dtype,
    )
    settings.validate()
    atoms = read_structures(args.structure, index=args.index)[0]
    model = load(args.model, device=args.device)
    result = run_md(model, atoms, settings, trajectory=args.output, progress=not args.quiet,
                    source=f"{args.structure}[{args.index}]")
    print(f"blip md: {result.message}; {result.n_frames} frame(s) -> {args.output}; "
          f"max force std seen {result.max_force_std_seen:.4g} eV/A", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    from .cli import nonnegative_int

    p = subparsers.add_parser("md", help="molecular dynamics with an uncertainty watch -> extxyz trajectory")
    p.add_argument("model", help="model file (model.pt)")
    p.add_argument("structure", help="starting structure (any ASE-readable file)")
    p.add_argument("-o", "--output", required=True, help="trajectory (extxyz)")
    p.add_argument("--index", default="0", help="which structure of the file (ASE index, default 0)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities; Langevin target)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--ensemble", choices=ENSEMBLES, default="nvt",
                   help="Langevin (nvt), velocity Verlet (nve) or MTK barostat with Nose-Hoover chains (npt)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--pressure", type=float, default=0.0, help="npt: external pressure, GPa")
    p.add_argument("--tdamp", type=float, default=None, help="npt: thermostat time scale, fs (default 100 timesteps)")
    p.add_argument("--pdamp", type=float, default=None, help="npt: barostat time scale, fs (default 1000 timesteps)")
    p.add_argument("--isotropic", action="store_true", help="npt: scale the cell uniformly (default: flexible cell)")
    p.add_argument("--max-force-std", type=float, default=None,
                   help="stop when the max per-atom force std (norm of the atom's std vector) exceeds this, eV/A")
    p.add_argument("--every", type=int, default=20, help="uncertainty check every M steps (MAP only in between)")
    p.add_argument("--adaptive", type=float, default=0.5,
                   help="with --max-force-std: check every step while the last check is above this fraction "
                        "of the threshold (0: only every M steps)")
    p.add_argument("--log-every", type=int, default=None, help="write a frame every L steps (default: --every)")
    p.add_argument("--flag-only", action="store_true", help="mark uncertain frames (flagged=T) instead of stopping")
    p.add_argument("--max-temperature", type=float, default=None,
                   help="stop as a fault above this temperature, K (default 10 T + 1000)")
    p.add_argument("--keep-velocities", action="store_true",
                   help="use the momenta in the file instead of Maxwell-Boltzmann")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="precision of the model during MD (default: the model's own)")
    p.add_argument("--samples", type=nonnegative_int, default=None,
                   help=f"K of each check (default: {WATCH_SAMPLES}, at most the model's uq.samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of velocities, Langevin noise and model noise")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_md)
