"""Read structures and their reference labels, with one-line errors.

Units: positions in Angstrom, energies in eV per structure, forces in eV/Angstrom.
Every problem with an input file raises :class:`blip.errors.DataError` naming
the file and, where it applies, the structure index (0-based position in the file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ase
import ase.io
import numpy as np
from ase.calculators.calculator import all_properties
from ase.data import chemical_symbols
from ase.io.formats import UnknownFileTypeError

from blip.errors import DataError

__all__ = [
    "Structure",
    "read_structures",
    "get_energy",
    "get_forces",
    "read_labelled",
    "check_elements",
]


@dataclass
class Structure:
    """One structure with its reference labels.

    ``energy`` in eV (float64) or None; ``forces`` (n_atoms, 3) float64 in eV/A
    or None; ``index`` is the structure's position in ``source`` (a file path);
    ``stress`` (3, 3) float64 eV/A^3 (ASE's sign convention) of a periodic structure, or None.
    """

    atoms: ase.Atoms
    energy: float | None
    forces: np.ndarray | None
    index: int
    source: str
    stress: np.ndarray | None = None


def _is_blank(path) -> bool:
    """True if the file holds only whitespace (stops at the first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _short(exc: BaseException, limit: int = 120) -> str:
    """First line of an exception message, trimmed to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    text = text.removeprefix("ase.io.extxyz: ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_indices(index, n: int) -> list[int]:
    """Positions in the file of the ``n`` structures ASE returned for ``index``.

    Exact for non-negative integers and slices with non-negative start and
    positive step (the usual cases); otherwise the position in the returned list.
    """
    if isinstance(index, str):
        try:
            index = int(index) if ":" not in index else slice(
                *(int(p) if p.strip() else None for p in index.split(":"))
            )
        except ValueError:
            return list(range(n))
    if isinstance(index, (int, np.integer)) and index >= 0:
        return [int(index)]
    if isinstance(index, slice):
        start, step = index.start or 0, index.step or 1
        if start >= 0 and step > 0:
            return [start + k * step for k in range(n)]
    return list(range(n))


def all_periodic(structures) -> bool:
    """Whether there are structures and every one is periodic along all three cell axes (crystals)."""
    structures = list(structures)
    return bool(structures) and all(bool(np.all(a.pbc)) for a in structures)


def read_structures(path, index=":") -> list[ase.Atoms]:
    """Read structures with ``ase.io.read(path, index)`` and check them.

    Returns a list even for a single integer ``index``. Raises DataError for a
    missing, unreadable or empty file, a structure without atoms, and
    non-finite positions or cell.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if os.path.isdir(path):
        raise DataError(path, "is a directory, not a structure file")
    try:
        if _is_blank(path):
            raise DataError(path, "no structures (file is empty)")
        result = ase.io.read(path, index=index)
    except DataError:
        raise
    except StopIteration:
        raise DataError(path, f"no structure at index {index!r}") from None
    except UnknownFileTypeError as exc:
        raise DataError(
            path, f"not a structure file ASE can read: unknown format ({_short(exc)})"
        ) from None
    except UnicodeDecodeError:
        raise DataError(path, "not a structure file ASE can read: binary or non-UTF-8 content") from None
    except PermissionError:
        raise DataError(path, "permission denied") from None
    except Exception as exc:  # ASE raises many types for malformed files
        raise DataError(path, f"not a structure file ASE can read: {_short(exc)}") from None

    structures = [result] if isinstance(result, ase.Atoms) else list(result)
    if not structures:
        raise DataError(path, f"no structures (index {index!r})" if index != ":" else "no structures")
    for i, atoms in zip(_file_indices(index, len(structures)), structures):
        if len(atoms) == 0:
            raise DataError(path, "structure has zero atoms", i)
        if not np.all(np.isfinite(atoms.positions)):
            raise DataError(path, "positions contain NaN or inf", i)
        if not np.all(np.isfinite(atoms.cell.array)):
            raise DataError(path, "cell contains NaN or inf", i)
    return structures


def _lookup(atoms: ase.Atoms, key: str):
    """Value stored under ``key`` in info, arrays or (standard names) calc.results."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    # ASE's extxyz reader moves standard property names (energy, forces,
    # free_energy, stress, ...) out of info/arrays into a SinglePointCalculator.
    calc = atoms.calc
    if key in all_properties and calc is not None and key in getattr(calc, "results", {}):
        return calc.results[key]
    return None


def get_energy(atoms: ase.Atoms, key: str = "energy") -> float | None:
    """Reference energy (eV, float) stored under ``key``, or None if absent.

    Raises ValueError if the stored value is not a single number.
    """
    value = _lookup(atoms, key)
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"energy key {key!r} is not a number: {value!r}") from None
    if arr.size != 1:
        raise ValueError(f"energy key {key!r} is not a single number (shape {arr.shape})")
    return float(arr.reshape(()))


def get_forces(atoms: ase.Atoms, key: str = "forces") -> np.ndarray | None:
    """Reference forces (eV/A, float64 array, a copy) stored under ``key``, or None.

    Raises ValueError if the stored value is not numeric. The shape is not checked.
    """
    value = _lookup(atoms, key)
    if value is None:
        return None
    try:
        return np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"forces key {key!r} is not numeric") from None


#: ASE's Voigt order xx, yy, zz, yz, xz, xy as (row, column) indices of the 3x3 tensor
VOIGT_INDEX = (np.array([0, 1, 2, 1, 0, 0]), np.array([0, 1, 2, 2, 2, 1]))


def full_to_voigt(stress: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 6) in ASE's Voigt order."""
    return stress[..., VOIGT_INDEX[0], VOIGT_INDEX[1]]


def voigt_to_full(voigt: np.ndarray) -> np.ndarray:
    """(..., 6) in ASE's Voigt order -> the symmetric (..., 3, 3)."""
    voigt = np.asarray(voigt, dtype=np.float64)
    full = np.empty(voigt.shape[:-1] + (3, 3))
    full[..., VOIGT_INDEX[0], VOIGT_INDEX[1]] = voigt
    full[..., VOIGT_INDEX[1], VOIGT_INDEX[0]] = voigt
    return full


def get_stress(atoms: ase.Atoms, key: str = "stress") -> np.ndarray | None:
    """Reference stress (3, 3) float64 eV/A^3 stored under ``key`` (Voigt 6-vector, in ASE's
    order xx, yy, zz, yz, xz, xy, or a 3x3 / 9-vector), or None.

    Raises ValueError if the stored value is not numeric or has another size.
    """
    value = _lookup(atoms, key)
    if value is None:
        return None
    try:
        arr = np.array(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"stress key {key!r} is not numeric") from None
    if arr.size == 6:
        return voigt_to_full(arr)
    if arr.size == 9:
        return arr.reshape(3, 3)
    raise ValueError(f"stress key {key!r} has {arr.size} values, expected 6 (Voigt) or 9 (3x3)")


def _available_keys(atoms: ase.Atoms) -> str:
    keys = list(atoms.info)
    keys += [k for k in atoms.arrays if k not in ("numbers", "positions")]
    if atoms.calc is not None:
        keys += [k for k in getattr(atoms.calc, "results", {}) if k not in keys]
    return ", ".join(sorted(keys)) or "none"


def read_labelled(
    path,
    energy_key: str = "energy",
    forces_key: str = "forces",
    require_energy: bool = True,
    require_forces: bool = True,
    stress_key: str | None = "stress",
) -> list[Structure]:
    """Read all structures of ``path`` with energy (eV) and forces (eV/A), and the stress
    (eV/A^3) of periodic structures where ``stress_key`` holds one (never required).

    A label that is missing is None unless required (then DataError). A label
    that is present must be finite, and forces must have shape (n_atoms, 3).
    """
    source = os.fspath(path)
    return [_labelled(atoms, i, source, energy_key, forces_key, require_energy, require_forces, stress_key)
            for i, atoms in enumerate(read_structures(source, ":"))]


def iter_labelled(path, energy_key: str = "energy", forces_key: str = "forces", require_energy: bool = True,
                  require_forces: bool = True, stress_key: str | None = "stress"):
    """:func:`read_labelled` one structure at a time (``ase.io.iread``): files larger than memory."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise DataError(source, "file not found" if not os.path.exists(source) else "is a directory, not a structure file")
    if _is_blank(source):
        raise DataError(source, "no structures (file is empty)")
    i = -1
    try:
        for i, atoms in enumerate(ase.io.iread(source, index=":")):
            if len(atoms) == 0:
                raise DataError(source, "structure has zero atoms", i)
            if not np.all(np.isfinite(atoms.positions)) or not np.all(np.isfinite(atoms.cell.array)):
                raise DataError(source, "positions or cell contain NaN or inf", i)
            yield _labelled(atoms, i, source, energy_key, forces_key, require_energy, require_forces, stress_key)
    except DataError:
        raise
    except Exception as exc:  # ASE raises many types for malformed files
        raise DataError(source, f"not a structure file ASE can read: {_short(exc)}", i + 1) from None


def _labelled(atoms, i, source, energy_key, forces_key, require_energy, require_forces,
              stress_key=None) -> Structure:
    """One structure with its checked labels (see :func:`read_labelled`)."""
    try:
        energy = get_energy(atoms, energy_key)
        forces = get_forces(atoms, forces_key)
        stress = get_stress(atoms, stress_key) if stress_key and atoms.pbc.any() else None
    except ValueError as exc:
        raise DataError(source, str(exc), i) from None
    if energy is None and require_energy:
        raise DataError(
            source,
            f"no energy key {energy_key!r} (keys available: {_available_keys(atoms)})",
            i,
        )
    if forces is None and require_forces:
        raise DataError(
            source,
            f"no forces key {forces_key!r} (keys available: {_available_keys(atoms)})",
            i,
        )
    if energy is not None and not np.isfinite(energy):
        raise DataError(source, f"energy {energy_key!r} is {energy}", i)
    if forces is not None:
        if forces.shape != (len(atoms), 3):
            raise DataError(
                source,
                f"forces {forces_key!r} have shape {forces.shape}, expected ({len(atoms)}, 3)",
                i,
            )
        if not np.all(np.isfinite(forces)):
            raise DataError(source, f"forces {forces_key!r} contain NaN or inf", i)
    if stress is not None and not np.all(np.isfinite(stress)):
        raise DataError(source, f"stress {stress_key!r} contains NaN or inf", i)
    return Structure(atoms=atoms, energy=energy, forces=forces, index=i, source=source, stress=stress)


def check_elements(structures, known: set[int], path) -> None:
    """Raise DataError if a structure contains an element outside ``known``.

    ``structures`` holds :class:`Structure` or ``ase.Atoms`` objects; the error
    names the first offending structure and its unknown chemical symbols.
    """
    known = {int(z) for z in known}
    for pos, item in enumerate(structures):
        atoms = item.atoms if isinstance(item, Structure) else item
        index = item.index if isinstance(item, Structure) else pos
        unknown = sorted(set(np.unique(atoms.numbers).tolist()) - known)
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            model = ", ".join(chemical_symbols[z] for z in sorted(known)) or "none"
            raise DataError(
                os.fspath(path),
                f"element(s) {names} not seen in training (model elements: {model})",
                index,
            )
