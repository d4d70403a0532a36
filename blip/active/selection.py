"""Scores of predicted uncertainty and diversity rules that rank the pool for labelling."""

from __future__ import annotations

import numpy as np

SCORES = {
    "max_force_std": "max over atoms of the per-atom force std norm, eV/A",
    "mean_force_std": "mean over atoms of the per-atom force std norm, eV/A",
    "energy_std_per_atom": "energy std / number of atoms, eV/atom",
}


def uncertainty_scores(pred: dict, score: str, n_atoms) -> np.ndarray:
    """Score (N,) per structure from a ``BlipModel.predict`` output; larger = less certain."""
    if score == "energy_std_per_atom":
        return np.asarray(pred["energy_std"], dtype=float) / np.asarray(n_atoms, dtype=float)
    norms = [np.linalg.norm(f, axis=1) for f in pred["forces_std"]]  # per-atom std vector norms, eV/A
    reduce = np.max if score == "max_force_std" else np.mean
    return np.array([float(reduce(n)) for n in norms])


def pair_distance_descriptor(atoms, elements: list[int], cutoff: float, bins: int = 24) -> np.ndarray:
    """Per-element-pair histogram of interatomic distances (Gaussian-smeared, per atom).

    A rotation-, translation- and permutation-invariant fingerprint of a structure's
    geometry, (n_pairs * bins,); distances up to ``cutoff`` (Angstrom) from vesin.
    """
    from ..data import build_graph

    g = build_graph(atoms, cutoff)
    i, j = g["edge_index"]
    r = g["positions"][j] - g["positions"][i] + g["shifts"]
    d = np.linalg.norm(r, axis=1)
    slot = {z: k for k, z in enumerate(elements)}
    ne = len(elements)
    zi = np.array([slot[int(z)] for z in g["numbers"][i]], dtype=int)
    zj = np.array([slot[int(z)] for z in g["numbers"][j]], dtype=int)
    lo, hi = np.minimum(zi, zj), np.maximum(zi, zj)
    pair = lo * ne + hi
    grid = np.linspace(0.5, cutoff, bins)
    width = grid[1] - grid[0]
    weights = np.exp(-0.5 * ((d[:, None] - grid[None]) / width) ** 2) * 0.5 * (np.cos(np.pi * d / cutoff) + 1)[:, None]
    out = np.zeros((ne * ne, bins))
    np.add.at(out, pair, weights)
    return out.ravel() / max(len(atoms), 1)


def _pairwise(x: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0.0))


def rank_greedy(scores: np.ndarray, descriptors: np.ndarray, n_select: int, threshold: float) -> list[int]:
    """Ranking (positions into ``scores``): highest scores first, skipping near-duplicates.

    A candidate is deferred if its descriptor lies within ``threshold`` x the median
    pairwise descriptor distance of an already-picked one; deferred ones follow the picks.
    """
    order = list(np.argsort(-scores, kind="stable"))
    dist = _pairwise(descriptors)
    off = dist[np.triu_indices(len(dist), 1)]
    tau = threshold * float(np.median(off)) if off.size else 0.0
    picked, deferred = [], []
    for c in order:
        if len(picked) < n_select and all(dist[c, p] >= tau for p in picked):
            picked.append(c)
        else:
            deferred.append(c)
    return picked + deferred


def rank_fps(scores: np.ndarray, descriptors: np.ndarray) -> list[int]:
    """Farthest-point order starting from the highest score (ties broken by score)."""
    first = int(np.argmax(scores))
    dist = _pairwise(descriptors)
    chosen = [first]
    mind = dist[first].copy()
    mind[first] = -1.0
    while len(chosen) < len(scores):
        best = max((k for k in range(len(scores)) if mind[k] >= 0), key=lambda k: (mind[k], scores[k]))
        chosen.append(best)
        mind = np.minimum(mind, dist[best])
        mind[chosen] = -1.0
    return chosen
