"""Noise-contrastive prior: unlabelled, perturbed copies of training structures.

Each copy is either rattled (Gaussian displacements of every atom) or homogeneously
compressed / stretched (every interatomic distance scaled; for periodic cells the cell
too). The copies carry no labels: they enter the loss only through the KL of their noise
rates towards a high-noise prior, so the inference net learns small rates on familiar
environments and large ones elsewhere (Hafner et al. 2018, "Noise Contrastive Priors").

Copies keep the neighbour graph of the original (a prepared batch is perturbed in place
of building new graphs): pairs that leave the cutoff contribute nothing, pairs that would
enter it are missing, which makes a copy only more unfamiliar. That keeps the contrastive
pass at the cost of one forward pass, also for backbones with expensive graphs (CHGNet).
"""

from __future__ import annotations

import numpy as np
import torch


def perturbation(rng: np.random.Generator, rattle: tuple[float, float],
                 strain: tuple[float, float]) -> tuple[float, float]:
    """(rattle standard deviation in A, distance factor) of one copy: half of the copies are
    rattled with sigma drawn from ``rattle``, half scaled by ``1 + s`` or ``1 / (1 + s)`` with
    ``s`` drawn from ``strain``."""
    if rng.random() < 0.5:
        return float(rng.uniform(*rattle)), 1.0
    s = 1.0 + float(rng.uniform(*strain))
    return 0.0, s if rng.random() < 0.5 else 1.0 / s


def perturbation_draws(rng: np.random.Generator, n_atoms, rattle: tuple[float, float],
                       strain: tuple[float, float]) -> tuple[list, np.ndarray]:
    """The draws of :func:`perturbed_batch` for graphs of ``n_atoms`` atoms: (params per graph,
    standard normals (sum(n_atoms), 3)). A data-parallel step draws them for the global batch on
    every rank (same generator state) and hands each rank the rows of its own graphs."""
    params = [perturbation(rng, rattle, strain) for _ in range(len(n_atoms))]
    return params, rng.standard_normal((int(np.sum(n_atoms)), 3))


def perturbed_batch(batch: dict, rng: np.random.Generator | None, rattle: tuple[float, float],
                    strain: tuple[float, float], draws: tuple[list, np.ndarray] | None = None) -> dict:
    """A copy of a (prepared) batch with perturbed positions, cells and periodic shifts; no labels.

    ``draws``: precomputed (params, normals) of this batch's graphs (see :func:`perturbation_draws`);
    without them they are drawn from ``rng``."""
    n_graphs = batch["n_atoms"].shape[0]
    pos = batch["positions"].detach()
    if draws is None:
        draws = perturbation_draws(rng, batch["n_atoms"].cpu().numpy(), rattle, strain)
    params, normals = draws
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
    out["cell"] = batch["cell"] * factor[:, None, None]
    if "shifts" in batch and batch["shifts"].numel():
        edge_graph = batch["batch"][batch["edge_index"][0]]
        out["shifts"] = batch["shifts"] * factor[edge_graph][:, None]
    out.pop("_chgnet_geometry", None)
    return out
