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


def model_features(model, atoms_list) -> np.ndarray:
    """Per-structure features of the model itself, (N, 2F): mean and max over atoms of the
    scalar features that enter the energy readout (first member, noise-free pass).

    Backbones without a ``readout`` module fall back to :func:`pair_distance_descriptor`.
    """
    import torch

    from ..data import build_graph, collate

    member = model.members[0]
    readout = getattr(member.backbone, "readout", None)
    if readout is None:
        elements = sorted(model.summary.elements)
        return np.stack([pair_distance_descriptor(a, elements, model.cutoff) for a in atoms_list])
    captured = []
    hook = readout.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    feats = []
    try:
        for start in range(0, len(atoms_list), 64):
            chunk = atoms_list[start:start + 64]
            graphs = [build_graph(a, model.cutoff, index=i) for i, a in enumerate(chunk)]
            batch = collate(graphs, dtype=model.dtype, device=model.device)
            captured.clear()
            with torch.no_grad():
                member(batch, sample=False, forces=False)
            s = captured[-1].double().cpu().numpy()
            owner = batch["batch"].cpu().numpy()
            for g in range(len(chunk)):
                rows = s[owner == g]
                feats.append(np.concatenate([rows.mean(0), rows.max(0)]))
    finally:
        hook.remove()
    return np.stack(feats)


def _pairwise(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    y = x if y is None else y
    sq_x, sq_y = (x * x).sum(1), (y * y).sum(1)
    return np.sqrt(np.maximum(sq_x[:, None] + sq_y[None] - 2 * x @ y.T, 0.0))


def duplicate_radius(reference: np.ndarray, fraction: float) -> float:
    """Data-driven near-duplicate radius: ``fraction`` x the median distance from each
    reference descriptor (e.g. the labelled set's) to its nearest other one; 0 with < 2 rows."""
    if len(reference) < 2 or fraction <= 0:
        return 0.0
    d = _pairwise(reference)
    np.fill_diagonal(d, np.inf)
    return float(fraction) * float(np.median(d.min(1)))


def rank_greedy(scores: np.ndarray, descriptors: np.ndarray, n_select: int, radius: float) -> list[int]:
    """Batch ranking (positions into ``scores``): highest scores first, skipping near-duplicates.

    A candidate is deferred if its descriptor lies within ``radius`` (distance <= radius, so
    exact duplicates always) of one already picked in this batch; deferred candidates follow
    the ``n_select`` picks in score order.
    """
    order = list(np.argsort(-scores, kind="stable"))
    dist = _pairwise(descriptors)
    picked, deferred = [], []
    for c in order:
        if len(picked) < n_select and all(dist[c, p] > radius for p in picked):
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


def _max_min_picks(weights: np.ndarray, descriptors: np.ndarray, reference: np.ndarray, n: int) -> list[int]:
    """``n`` positions, each maximising its weight times its descriptor distance to the nearest
    ``reference`` row or earlier pick (without reference rows the first pick is the largest weight)."""
    mind = _pairwise(descriptors, reference).min(1) if len(reference) else None
    chosen: list[int] = []
    for _ in range(min(n, len(weights))):
        value = weights if mind is None else np.where(mind >= 0, weights * mind, -np.inf)
        k = int(np.argmax(value))
        chosen.append(k)
        d = _pairwise(descriptors, descriptors[k:k + 1])[:, 0]
        mind = d if mind is None else np.minimum(mind, d)
        mind[chosen] = -1.0
    return chosen


def farthest_from(labelled: np.ndarray, candidates: np.ndarray, n: int) -> list[int]:
    """Farthest-point sampling of ``n`` candidates (positions) away from the labelled
    descriptors and from each other: each pick maximises its distance to the nearest
    labelled-or-picked structure (no uncertainty involved)."""
    return _max_min_picks(np.ones(len(candidates)), candidates, labelled, n)


def rank_weighted(scores: np.ndarray, descriptors: np.ndarray, reference: np.ndarray, n_select: int) -> list[int]:
    """Batch ranking (positions into ``scores``): each of the ``n_select`` picks maximises its score
    times its descriptor distance to the nearest labelled (``reference``) or already picked
    structure, so uncertain structures far from what is known come first; the rest follow in
    score order."""
    chosen = _max_min_picks(np.asarray(scores, dtype=float), descriptors, reference, n_select)
    picked = set(chosen)
    return chosen + [int(k) for k in np.argsort(-scores, kind="stable") if int(k) not in picked]
