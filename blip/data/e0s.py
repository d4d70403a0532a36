"""Per-element reference energies E0 (eV per atom), keyed by atomic number.

The model predicts ``E = sum_i E0[Z_i] + E_interaction``; E0s come from a
file of isolated atoms, a least-squares fit to the training energies, or zeros.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from blip.data.io import Structure, read_labelled
from blip.errors import DataError

__all__ = ["e0s_from_file", "e0s_least_squares", "resolve_e0s", "composition", "e0s_from_counts"]


def _atoms(item):
    return item.atoms if isinstance(item, Structure) else item


def _elements(structures) -> list[int]:
    return sorted({int(z) for s in structures for z in np.unique(_atoms(s).numbers)})


def e0s_from_file(path, energy_key: str = "energy") -> dict[int, float]:
    """E0 (eV) per atomic number from a file of single-atom structures.

    Raises DataError for a structure with more than one atom or two
    different energies for the same element.
    """
    source = os.fspath(path)
    e0s: dict[int, float] = {}
    first: dict[int, int] = {}
    for s in read_labelled(source, energy_key=energy_key, require_forces=False):
        if len(s.atoms) != 1:
            raise DataError(
                source, f"E0 file must hold single atoms, this structure has {len(s.atoms)}", s.index
            )
        z = int(s.atoms.numbers[0])
        if z in e0s and not np.isclose(e0s[z], s.energy, rtol=0.0, atol=1e-8):
            raise DataError(
                source,
                f"second E0 for {chemical_symbols[z]} ({s.energy} eV) differs from "
                f"structure {first[z]} ({e0s[z]} eV)",
                s.index,
            )
        e0s.setdefault(z, s.energy)
        first.setdefault(z, s.index)
    return e0s


def e0s_least_squares(structures) -> dict[int, float]:
    """Fit E0 (eV) by least squares of structure energies on element counts.

    ``structures``: list of :class:`Structure` with energies. Uses the
    minimal-norm solution, so rank-deficient data (e.g. one composition) works.
    """
    if not structures:
        raise ValueError("e0s_least_squares needs at least one structure")
    for s in structures:
        if s.energy is None:
            raise DataError(s.source, "no energy, needed to fit E0s", s.index)
    elements, counts = composition(structures)
    return e0s_from_counts(elements, counts, np.array([s.energy for s in structures], dtype=np.float64))


def composition(structures, elements: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(elements, counts (structures, elements) float64): how many atoms of each element."""
    elements = _elements(structures) if elements is None else list(elements)
    column = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(structures), len(elements)), dtype=np.float64)
    for row, s in enumerate(structures):
        zs, n = np.unique(_atoms(s).numbers, return_counts=True)
        counts[row, [column[int(z)] for z in zs]] = n
    return elements, counts


def e0s_from_counts(elements: list[int], counts: np.ndarray, energies: np.ndarray) -> dict[int, float]:
    """Least-squares (minimal-norm) E0s from element counts (structures, elements) and energies
    (structures,): the fit of :func:`e0s_least_squares`, from arrays a streamed data set keeps.
    Columns of elements that never occur are dropped."""
    keep = counts.sum(axis=0) > 0
    elements = [z for z, k in zip(elements, keep) if k]
    solution = np.linalg.lstsq(counts[:, keep], energies, rcond=None)[0]
    return {int(z): float(solution[k]) for k, z in enumerate(elements)}


def _from_mapping(spec: Mapping) -> dict[int, float]:
    out = {}
    for key, value in spec.items():
        z = atomic_numbers.get(key) if isinstance(key, str) else int(key)
        if z is None:
            raise DataError("E0s", f"unknown element {key!r}")
        out[z] = float(value)
    return out


def resolve_e0s(spec, structures, energy_key: str = "energy", *, elements=None, fit=None) -> dict[int, float]:
    """E0s (eV) for every element in ``structures``.

    ``spec``: a path to a file of isolated atoms, ``"average"`` (least-squares
    fit to ``structures``), None (zeros), or a mapping from atomic number or
    symbol to E0. Raises DataError if the file lacks an element present in
    ``structures``.

    ``elements`` and ``fit`` (a function returning the least-squares E0s) replace
    ``structures`` for streamed data sets.
    """
    elements = _elements(structures) if elements is None else list(elements)
    if spec is None:
        return {z: 0.0 for z in elements}
    if isinstance(spec, str) and spec == "average":
        return fit() if fit is not None else e0s_least_squares(structures)
    if isinstance(spec, Mapping):
        e0s, where = _from_mapping(spec), "E0s"
    else:
        where = os.fspath(spec)
        e0s = e0s_from_file(where, energy_key=energy_key)
    missing = [z for z in elements if z not in e0s]
    if missing:
        names = ", ".join(chemical_symbols[z] for z in missing)
        have = ", ".join(chemical_symbols[z] for z in sorted(e0s)) or "none"
        raise DataError(where, f"no E0 for element(s) {names} (E0s given for: {have})")
    return e0s
