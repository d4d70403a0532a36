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
    if stress_weight > 0 and "stress" in out and "stress" in batch:
        labelled = torch.isfinite(batch["stress"]).all(dim=(1, 2)) & torch.isfinite(out["stress"]).all(dim=(1, 2))
        if labelled.any():
            loss = loss + stress_weight * penalty(out["stress"][labelled], batch["stress"][labelled].to(loss.dtype))
    return loss
