"""Data loss on energies (per atom) and forces; BLIP adds beta * KL."""

from __future__ import annotations

import torch
from torch.nn import functional as F

_PENALTY = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": lambda a, b: F.huber_loss(a, b, delta=0.01)}


def data_loss(out: dict, batch: dict, kind: str, energy_weight: float, forces_weight: float) -> torch.Tensor:
    """``w_E * L(E/n) + w_F * L(F)`` with L in {mse, l1, huber}; energies per atom (eV), forces eV/A."""
    penalty = _PENALTY[kind]
    n = batch["n_atoms"].to(out["energy"].dtype)
    loss_e = penalty(out["energy"] / n, batch["energy"] / n)
    loss_f = penalty(out["forces"], batch["forces"])
    return energy_weight * loss_e + forces_weight * loss_f


_SUMMED = {"mse": lambda a, b: F.mse_loss(a, b, reduction="sum"), "l1": lambda a, b: F.l1_loss(a, b, reduction="sum"),
           "huber": lambda a, b: F.huber_loss(a, b, delta=0.01, reduction="sum")}


def data_loss_sums(out: dict, batch: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (not means) of the penalties on energies per atom (over graphs) and on force components.

    ``w_E * sum_E / G + w_F * sum_F / (3 N)`` with G graphs and N atoms of the *global* batch is
    :func:`data_loss` of that batch; a data-parallel step divides each rank's sums by the global
    counts so that the ranks' gradients add up to the gradient of the global batch."""
    penalty = _SUMMED[kind]
    n = batch["n_atoms"].to(out["energy"].dtype)
    return penalty(out["energy"] / n, batch["energy"] / n), penalty(out["forces"], batch["forces"])
