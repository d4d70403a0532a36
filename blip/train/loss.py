"""Data loss on energies (per atom) and forces; BLIP adds beta * KL."""

from __future__ import annotations

import torch
from torch.nn import functional as F

_PENALTY = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": lambda a, b: F.huber_loss(a, b, delta=0.01)}


def data_loss(out: dict, batch: dict, kind: str, energy_weight: float, forces_weight: float,
              stress_weight: float = 0.0) -> torch.Tensor:
    """``w_E * L(E/n) + w_F * L(F) + w_S * L(S)`` with L in {mse, l1, huber}; energies per atom
    (eV), forces eV/A, stress eV/A^3 over the structures whose stress label is finite."""
    penalty = _PENALTY[kind]
    n = batch["n_atoms"].to(out["energy"].dtype)
    loss_e = penalty(out["energy"] / n, batch["energy"] / n)
    loss_f = penalty(out["forces"], batch["forces"])
    loss = energy_weight * loss_e + forces_weight * loss_f
    if stress_weight > 0:
        sum_s, count = stress_loss_sum(out, batch, kind)
        if count:
            loss = loss + stress_weight * sum_s / count
    return loss


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


def stress_loss_sum(out: dict, batch: dict, kind: str) -> tuple[torch.Tensor, int]:
    """Sum of the penalties on the stress components (eV/A^3) of the structures with a finite
    stress label, and how many components that is (0, and a zero sum, when none has one)."""
    if "stress" not in out or "stress" not in batch:
        return out["energy"].new_zeros(()), 0
    labelled = torch.isfinite(batch["stress"]).all(dim=(1, 2)) & torch.isfinite(out["stress"]).all(dim=(1, 2))
    if not labelled.any():
        return out["stress"].new_zeros(()), 0
    pred, ref = out["stress"][labelled], batch["stress"][labelled].to(out["stress"].dtype)
    return _SUMMED[kind](pred, ref), int(pred.numel())
