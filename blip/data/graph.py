"""Neighbour-list graph of one structure (numpy, float64, local atom indices).

Edges come from ``vesin`` (full list, no self pairs) and are sorted canonically
by (i, j, shift_a, shift_b, shift_c), so edge order does not depend on the
neighbour library. ``r_ij = positions[j] - positions[i] + shifts[e]`` (Angstrom).
"""

from __future__ import annotations

import ase
import numpy as np
import vesin

from blip.errors import DataError

__all__ = ["build_graph"]


MIN_DISTANCE = 0.01  # Angstrom: closer atoms (or periodic images) are an input error


def _neighbours(positions, cell, pbc, cutoff, where, index):
    """Vesin full neighbour list: i, j (E,) int64 and integer shifts S (E, 3) int64."""
    if pbc.any():
        periodic_rows = cell[pbc]
        sv = np.linalg.svd(periodic_rows, compute_uv=False)
        if sv.min() <= 1e-10 * max(1.0, sv.max()):
            raise DataError(
                where, "periodic cell vectors are zero or linearly dependent (zero volume)", index
            )
        # Non-periodic rows never enter a shift; zero them so a junk vector
        # there cannot make vesin's box singular.
        box = np.where(pbc[:, None], cell, 0.0)
    else:
        box = np.zeros((3, 3))
    try:
        i, j, S = vesin.NeighborList(cutoff=float(cutoff), full_list=True).compute(
            np.ascontiguousarray(positions, dtype=np.float64),
            np.ascontiguousarray(box, dtype=np.float64),
            [bool(p) for p in pbc],
            quantities="ijS",
        )
    except Exception as exc:  # vesin raises RuntimeError from C++
        raise DataError(where, f"neighbour list failed: {exc}", index) from None
    i, j, S = i.astype(np.int64), j.astype(np.int64), S.astype(np.int64)
    keep = (i != j) | S.any(axis=1)  # defensively drop self pairs
    return i[keep], j[keep], S[keep]


def build_graph(
    atoms: ase.Atoms,
    cutoff: float,
    index: int = 0,
    energy: float | None = None,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
    *,
    source: str = "<atoms>",
) -> dict[str, np.ndarray]:
    """Graph arrays of one structure within ``cutoff`` (Angstrom).

    Returns ``positions`` (n, 3) float64, ``numbers`` (n,) int64, ``edge_index``
    (2, E) int64 with local indices, ``shifts`` (E, 3) float64 Cartesian
    (``S @ cell``), ``unit_shifts`` (E, 3) int64 (``S``, which cell image j is taken from), and per-graph arrays with a leading axis of 1: ``cell``
    (1, 3, 3) (zeros if no direction is periodic), ``pbc`` (1, 3) bool,
    ``n_atoms``, ``n_edges``, ``structure_index`` (1,) int64, plus ``energy``
    (1,) eV, ``forces`` (n, 3) eV/A and ``stress`` (1, 3, 3) eV/A^3 when given (NaN entries
    mark a missing label in a batch that has some). ``source`` and ``index``
    name the structure in errors.
    """
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    positions = np.array(atoms.positions, dtype=np.float64)
    pbc = np.array(atoms.pbc, dtype=bool)
    cell = np.array(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    n = len(positions)

    i, j, S = _neighbours(positions, cell, pbc, cutoff, source, index)
    if len(i):
        lengths = np.linalg.norm(positions[j] - positions[i] + S @ cell, axis=1)
        e = int(np.argmin(lengths))
        if lengths[e] < MIN_DISTANCE:
            raise DataError(source, f"atoms {i[e]} and {j[e]} are {lengths[e]:.3g} A apart (overlapping atoms; "
                                    f"distances below {MIN_DISTANCE} A have no meaningful energy)", index)
    order = np.lexsort((S[:, 2], S[:, 1], S[:, 0], j, i))  # last key is primary
    i, j, S = i[order], j[order], S[order]

    graph = {
        "positions": positions,
        "numbers": np.array(atoms.numbers, dtype=np.int64),
        "edge_index": np.stack([i, j]).reshape(2, -1),
        "shifts": (S.astype(np.float64) @ cell).reshape(-1, 3),
        "unit_shifts": S.astype(np.int64).reshape(-1, 3),
        "cell": cell[None],
        "pbc": pbc[None],
        "n_atoms": np.array([n], dtype=np.int64),
        "n_edges": np.array([len(i)], dtype=np.int64),
        "structure_index": np.array([index], dtype=np.int64),
    }
    if energy is not None:
        graph["energy"] = np.array([energy], dtype=np.float64)
    if forces is not None:
        forces = np.asarray(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise DataError(source, f"forces have shape {forces.shape}, expected ({n}, 3)", index)
        graph["forces"] = forces.copy()
    if stress is not None:
        graph["stress"] = np.asarray(stress, dtype=np.float64).reshape(1, 3, 3).copy()
    return graph
