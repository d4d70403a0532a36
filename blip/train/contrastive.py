"""Noise-contrastive prior: unlabelled, perturbed copies of training structures.

Each copy is rattled (Gaussian displacements of every atom), homogeneously compressed /
stretched (every interatomic distance scaled; for periodic cells the cell too) or, with
``remove`` set, stripped of some of its atoms (each moved hundreds of Angstrom away from
everything else, so that its pairs fall outside every cutoff: the atoms left behind lose
neighbours, as at a vacancy, a surface or a broken bond, and the moved ones are isolated).
The copies carry no labels: they enter the loss only through the KL of their noise rates
towards a high-noise prior, so the inference net learns small rates on familiar environments
and large ones elsewhere (Hafner et al. 2018, "Noise Contrastive Priors").

Copies keep the neighbour graph of the original (a prepared batch is perturbed in place
of building new graphs): pairs that leave the cutoff contribute nothing, pairs that would
enter it are missing, which makes a copy only more unfamiliar. That keeps the contrastive
pass at the cost of one forward pass, also for backbones with expensive graphs (CHGNet).
"""

from __future__ import annotations

import numpy as np
import torch


REMOVED_DISTANCE = 500.0  # Angstrom: removed atoms are moved multiples of this apart (beyond any cutoff)


def perturbation(rng: np.random.Generator, rattle: tuple[float, float], strain: tuple[float, float],
                 remove: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """(rattle standard deviation in A, distance factor, fraction of atoms removed) of one copy.

    Without ``remove`` half of the copies are rattled with sigma drawn from ``rattle`` and half
    scaled by ``1 + s`` or ``1 / (1 + s)`` with ``s`` drawn from ``strain``; with ``remove`` a
    third each, and the last third loses a fraction of its atoms drawn from ``remove``."""
    if remove is not None:
        kind = rng.random()
        if kind < 1.0 / 3.0:
            return 0.0, 1.0, float(rng.uniform(*remove))
        if kind < 2.0 / 3.0:
            return float(rng.uniform(*rattle)), 1.0, 0.0
    elif rng.random() < 0.5:
        return float(rng.uniform(*rattle)), 1.0, 0.0
    s = 1.0 + float(rng.uniform(*strain))
    return 0.0, s if rng.random() < 0.5 else 1.0 / s, 0.0


def perturbation_draws(rng: np.random.Generator, n_atoms, rattle: tuple[float, float],
                       strain: tuple[float, float], remove: tuple[float, float] | None = None) -> tuple:
    """The draws of :func:`perturbed_batch` for graphs of ``n_atoms`` atoms: (params per graph,
    standard normals (sum(n_atoms), 3), and with ``remove`` uniforms (sum(n_atoms),) that pick the
    removed atoms). A data-parallel step draws them for the global batch on every rank (same
    generator state) and hands each rank the rows of its own graphs (:func:`draws_of_graphs`)."""
    params = [perturbation(rng, rattle, strain, remove) for _ in range(len(n_atoms))]
    draws = (params, rng.standard_normal((int(np.sum(n_atoms)), 3)))
    if remove is not None:
        draws += (rng.random(int(np.sum(n_atoms))),)
    return draws


def draws_of_graphs(draws: tuple, n_atoms, graphs) -> tuple:
    """The part of :func:`perturbation_draws`'s ``draws`` (for graphs of ``n_atoms`` atoms) that
    belongs to the graphs at positions ``graphs``, in that order."""
    start = np.concatenate([[0], np.cumsum(n_atoms)])
    rows = [slice(start[g], start[g + 1]) for g in graphs]
    return ([draws[0][g] for g in graphs],) + tuple(np.concatenate([d[r] for r in rows]) for d in draws[1:])


def perturbed_batch(batch: dict, rng: np.random.Generator | None, rattle: tuple[float, float],
                    strain: tuple[float, float], draws: tuple | None = None,
                    remove: tuple[float, float] | None = None) -> dict:
    """A copy of a (prepared) batch with perturbed positions, cells and periodic shifts; no labels.

    ``draws``: precomputed draws of this batch's graphs (see :func:`perturbation_draws`);
    without them they are drawn from ``rng``. A removed atom keeps its place in the graph and is
    moved ``REMOVED_DISTANCE`` x k along x, k = 1, 2, ... counting the removed atoms of the batch,
    so it is far from every other atom and every periodic image of the structure it left."""
    n_graphs = batch["n_atoms"].shape[0]
    pos = batch["positions"].detach()
    if draws is None:
        draws = perturbation_draws(rng, batch["n_atoms"].cpu().numpy(), rattle, strain, remove)
    params, normals = draws[0], draws[1]
    sigma = pos.new_tensor([p[0] for p in params])[batch["batch"]]
    factor = pos.new_tensor([p[1] for p in params])
    noise = torch.from_numpy(np.asarray(normals)).to(pos)
    periodic = batch["pbc"].any(dim=1)
    counts = batch["n_atoms"].to(pos.dtype)
    centre = torch.zeros((n_graphs, 3), dtype=pos.dtype, device=pos.device).index_add(0, batch["batch"], pos)
    centre = torch.where(periodic[:, None], torch.zeros_like(centre), centre / counts[:, None])
    f_atom = factor[batch["batch"]][:, None]
    c_atom = centre[batch["batch"]]
    out = {k: v for k, v in batch.items() if k not in ("energy", "forces", "stress")}
    out["positions"] = c_atom + f_atom * (pos - c_atom) + sigma[:, None] * noise
    if len(draws) > 2 and any(p[2] > 0 for p in params):
        fraction = pos.new_tensor([p[2] for p in params])[batch["batch"]]
        removed = (torch.from_numpy(np.asarray(draws[2])).to(pos) < fraction).to(pos.dtype)
        out["positions"][:, 0] += REMOVED_DISTANCE * torch.cumsum(removed, 0) * removed  # k-th removed: k x 500 A
    out["cell"] = batch["cell"] * factor[:, None, None]
    if "shifts" in batch and batch["shifts"].numel():
        edge_graph = batch["batch"][batch["edge_index"][0]]
        out["shifts"] = batch["shifts"] * factor[edge_graph][:, None]
    out.pop("_chgnet_geometry", None)
    return out
