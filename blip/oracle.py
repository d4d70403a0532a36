"""Labelling for active learning: hidden labels of a pool file, or a reference calculator.

An oracle turns an unlabelled ``ase.Atoms`` into a :class:`blip.data.Structure` with
energy (eV, per structure) and forces (n, 3) eV/A, or returns None if it cannot label it
(e.g. an SCF that does not converge); the caller then takes the next candidate.
"""

from __future__ import annotations

import warnings

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from ._files import atomic_open
from .data import Structure
from .errors import ConfigError

TBLITE_DEFAULTS = {"method": "GFN2-xTB", "accuracy": 1.0, "electronic_temperature": 300.0,
                   "max_iterations": 250}


def strip_labels(atoms, energy_key: str = "energy", forces_key: str = "forces"):
    """Copy of ``atoms`` without calculator or reference labels (what the model may see)."""
    a = atoms.copy()  # drops the (single-point) calculator that holds extxyz labels
    a.info.pop(energy_key, None)
    if forces_key not in ("positions", "numbers"):
        a.arrays.pop(forces_key, None)
    return a


class PoolLabels:
    """Oracle for benchmarking: the labels of a pool file, revealed only when asked for."""

    name = "pool"

    def __init__(self, structures: list[Structure]):
        self._hidden = {i: s for i, s in enumerate(structures)}

    def label(self, atoms, pool_index: int) -> Structure | None:
        s = self._hidden[pool_index]
        return Structure(atoms=atoms.copy(), energy=float(s.energy), forces=np.array(s.forces, dtype=float),
                         index=s.index, source=s.source)


class CalculatorOracle:
    """Oracle that runs an ASE calculator (energy in eV, forces in eV/A).

    ``make_calculator()`` builds a fresh calculator for every structure, so a label does not
    depend on which structure was labelled before (no reused SCF guess).
    """

    def __init__(self, make_calculator, name: str = "calculator"):
        self.make_calculator, self.name = make_calculator, name
        self.failures = 0

    def label(self, atoms, pool_index: int | None = None) -> Structure | None:
        a = atoms.copy()
        a.calc = self.make_calculator()
        try:
            energy = float(a.get_potential_energy())
            forces = np.array(a.get_forces(), dtype=float)
        except Exception as exc:  # reference codes raise many types (SCF not converged, ...)
            self.failures += 1
            warnings.warn(f"{self.name}: could not label structure {pool_index}: {str(exc).strip()[:120]}",
                          stacklevel=2)
            return None
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            self.failures += 1
            return None
        a.calc = None
        return Structure(atoms=a, energy=energy, forces=forces, index=-1 if pool_index is None else pool_index,
                         source=self.name)


def tblite_oracle(settings: dict | None = None) -> CalculatorOracle:
    """GFN2-xTB (or GFN1-xTB, IPEA1-xTB) from the ``tblite`` package; runs offline.

    ``settings`` keys: method, accuracy, electronic_temperature (K), max_iterations,
    and optionally charge and multiplicity.
    """
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise ConfigError("active_learning.oracle 'tblite' needs the tblite package (pip install tblite)") from None
    opts = {**TBLITE_DEFAULTS, **(settings or {})}
    unknown = set(opts) - set(TBLITE_DEFAULTS) - {"charge", "multiplicity"}
    if unknown:
        raise ConfigError(f"unknown key(s) in active_learning.tblite: {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(set(TBLITE_DEFAULTS) | {'charge', 'multiplicity'}))}")
    if opts["method"] not in ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB"):
        raise ConfigError("active_learning.tblite.method must be GFN2-xTB, GFN1-xTB or IPEA1-xTB")
    return CalculatorOracle(lambda: TBLite(verbosity=0, **opts), name=f"tblite {opts['method']}")


def write_labelled(path, structures: list[Structure], energy_key: str = "energy", forces_key: str = "forces",
                   info: list[dict] | None = None) -> None:
    """Write labelled structures as extxyz atomically (temporary file, then rename).

    Labels go under ``energy_key`` / ``forces_key`` (as calculator results when these are the
    standard names, which ASE's reader restores). ``info`` adds per-structure info keys.
    """
    frames = []
    for n, s in enumerate(structures):
        a = s.atoms.copy()
        a.calc = None
        standard = {}
        if energy_key == "energy":
            standard["energy"] = s.energy
        else:
            a.info[energy_key] = s.energy
        if forces_key == "forces":
            standard["forces"] = np.asarray(s.forces)
        else:
            a.arrays[forces_key] = np.asarray(s.forces)
        if standard:
            a.calc = SinglePointCalculator(a, **standard)
        if info:
            a.info.update(info[n])
        frames.append(a)
    write_extxyz_atomic(path, frames)


def write_extxyz_atomic(path, frames) -> None:
    """Write ``frames`` (list of Atoms) as extxyz via a temporary file and a rename."""
    import ase.io

    with atomic_open(path, suffix=".part") as handle:
        ase.io.write(handle, list(frames), format="extxyz")
