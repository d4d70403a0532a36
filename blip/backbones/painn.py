"""PaiNN (Schuett et al. 2021), compact, as the BLIP paper's backbone.

Noise goes on the update MLPs (node rows); with ``message_noise`` also on the message MLPs
``phi`` (evaluated per atom, as in the original, so node rows; off by default: their noise
ranked the errors worse, and without it the recalibrated NLL was lower on 16 of 21
benchmark figures, docs/results/energy-split); with ``vector_noise`` on the vector-mixing
matrices U and V (Gaussian dropout of whole vector channels, exactly equivariant; off by
default: better forces in and near the training distribution, but worse energies along
bond-breaking paths, 20 % dearer to sample, and some samples run away far out); the
radial ``filter`` stays deterministic unless ``edge_noise`` is set (noise on a function of
distances alone adds spread that does not grow away from the training data).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from ..bayes.layers import VectorLinear
from ..config import register_backbone_defaults
from .base import (Backbone, DatasetSummary, SpeciesDomains, SpeciesMap, edge_vectors, isolation_switch,
                   shared_per_edge)

DEFAULTS = {"features": 64, "interactions": 3, "radial": 20, "edge_noise": False,
            "isolated_atom_limit": True,  # lone atoms carry their E0 (base.isolation_switch)
            "vector_noise": False,  # noise on U and V too (vector channels)
            "message_noise": False}  # noise on the message MLPs phi too (interactions >= 1)
register_backbone_defaults("painn", DEFAULTS)


def sine_rbf(d: torch.Tensor, n: int, cutoff: float) -> torch.Tensor:
    """sin(k pi d / rc) / d for k = 1..n, (E,) -> (E, n)."""
    k = torch.arange(1, n + 1, dtype=d.dtype, device=d.device)
    return torch.sin(k * math.pi * d[:, None] / cutoff) / d[:, None]


def cosine_cutoff(d: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(pi d / rc) + 1) inside the cutoff, 0 outside; (E,)."""
    return 0.5 * (torch.cos(math.pi * d / cutoff) + 1.0) * (d < cutoff).to(d.dtype)


def sine_rbf_and_derivative(d: torch.Tensor, n: int, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sine_rbf` and its derivative in d, both (E, n)."""
    a = torch.arange(1, n + 1, dtype=d.dtype, device=d.device) * (math.pi / cutoff)
    ad = a * d[:, None]
    sin, cos = torch.sin(ad), torch.cos(ad)
    return sin / d[:, None], (ad * cos - sin) / (d * d)[:, None]


def cosine_cutoff_and_derivative(d: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cosine_cutoff` and its derivative in d, both (E,)."""
    inside = (d < cutoff).to(d.dtype)
    x = math.pi * d / cutoff
    return 0.5 * (torch.cos(x) + 1.0) * inside, -0.5 * (math.pi / cutoff) * torch.sin(x) * inside


class Message(nn.Module):
    """Edge messages: phi(s)_j * W(r_ij), summed over neighbours j of i; W = filter(rbf) * fcut."""

    def __init__(self, features: int, radial: int):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 3 * features))
        self.filter = nn.Linear(radial, 3 * features)

    def forward(self, s, v, edge_index, w, unit):
        """``w``: this interaction's radial filter of every edge, (E, 3F)."""
        return message_step(self.phi(s), s, v, edge_index, w, unit)


# TorchScript-compatible (blip.export compiles them with the trained layers).
def message_step(phi_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor, edge_index: torch.Tensor,
                 w: torch.Tensor, unit: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scalar and vector features after the messages of ``phi_s = phi(s)`` (N, 3F) with radial
    filters ``w`` (E, 3F) and unit vectors ``unit`` (E, 3) of edges ``edge_index`` (2, E)."""
    i, j = edge_index[0], edge_index[1]
    x = phi_s[j] * w
    features = s.shape[1]
    x_vv, x_s, x_vs = x[:, :features], x[:, features:2 * features], x[:, 2 * features:]
    dv = x_vv[:, None, :] * v[j] + x_vs[:, None, :] * unit[:, :, None]
    s = s.index_add(0, i, x_s)
    v = v.index_add(0, i, dv)
    return s, v


def update_inputs(s: torch.Tensor, uv: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
    """Input of the update MLP (N, 2F): scalars and the norms of the V-mixed vectors ``vv`` (N, 3, F)."""
    vnorm = torch.sqrt((vv * vv).sum(dim=1) + 1e-8)
    return torch.cat([s, vnorm], dim=1)


def update_step(a: torch.Tensor, s: torch.Tensor, v: torch.Tensor, uv: torch.Tensor,
                vv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gated update of scalars s and vectors v from the update MLP's output ``a`` (N, 3F)."""
    features = s.shape[1]
    a_vv, a_sv, a_ss = a[:, :features], a[:, features:2 * features], a[:, 2 * features:]
    v = v + a_vv[:, None, :] * uv
    s = s + a_sv * (uv * vv).sum(dim=1) + a_ss
    return s, v


class Update(nn.Module):
    """Node update: gated mixing of scalar and vector channels."""

    def __init__(self, features: int):
        super().__init__()
        self.U = VectorLinear(features, features, bias=False)
        self.V = VectorLinear(features, features, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * features, features), nn.SiLU(), nn.Linear(features, 3 * features))

    def forward(self, s, v):
        uv, vv = self.U(v), self.V(v)
        return update_step(self.mlp(update_inputs(s, uv, vv)), s, v, uv, vv)


class Interaction(nn.Module):
    def __init__(self, features: int, radial: int):
        super().__init__()
        self.message = Message(features, radial)
        self.update = Update(features)


class PaiNN(SpeciesDomains, Backbone):
    """Energy = sum_i g_i (scale * readout(s_i) + shift) + sum_i E0(Z_i); eV. With
    ``isolated_atom_limit`` g_i is :func:`~blip.backbones.base.isolation_switch` (1 for an atom
    with neighbours, 0 for a lone one), else 1."""

    def __init__(self, summary: DatasetSummary, cutoff: float = 5.0, features: int = 64,
                 interactions: int = 3, radial: int = 20, edge_noise: bool = False,
                 isolated_atom_limit: bool = True, vector_noise: bool = False, message_noise: bool = False):
        super().__init__()
        self.edge_noise, self.isolated_atom_limit = bool(edge_noise), bool(isolated_atom_limit)
        self.vector_noise, self.message_noise = bool(vector_noise), bool(message_noise)
        self.cutoff, self.elements, self.radial = float(cutoff), sorted(summary.elements), radial
        self.edge_radial_features = radial  # edge rows' radial basis (with edge_noise)
        self.species = SpeciesMap(self.elements, summary.e0s)
        self.embedding = nn.Embedding(len(self.elements), features)
        self.interactions = nn.ModuleList(Interaction(features, radial) for _ in range(interactions))
        self.readout = nn.Sequential(nn.Linear(features, features // 2), nn.SiLU(), nn.Linear(features // 2, 1))
        self.register_buffer("scale", torch.tensor(float(summary.force_scale)))
        self.register_buffer("shift", torch.tensor(float(summary.energy_shift)))

    def noisy_layers(self) -> dict[str, str]:
        """The update MLPs (node rows); with ``message_noise`` also the message MLP phi of
        interactions >= 1 (interaction 0's acts on the species embedding alone, so its noise
        could not depend on the structure; node rows), with ``vector_noise`` the update's
        vector-mixing U and V (node rows), with ``edge_noise`` the radial filters (edge rows)."""
        layers = {r"interactions\.\d+\.update\.mlp\.\d+": "node"}
        if self.vector_noise:
            layers[r"interactions\.\d+\.update\.[UV]"] = "node"
        if self.message_noise and len(self.interactions) > 1:
            layers[r"interactions\.[1-9]\d*\.message\.phi\.\d+"] = "node"
        if self.edge_noise:
            layers[r"interactions\.\d+\.message\.filter"] = "edge"
        return layers

    def _radial(self, batch):
        r = edge_vectors(batch)
        d = torch.linalg.norm(r, dim=1)
        return r, d, sine_rbf(d, self.radial, self.cutoff), cosine_cutoff(d, self.cutoff)

    def domain_features(self, batch):
        """Node rows: species one-hot; edge rows (only with ``edge_noise``): radial basis and both species."""
        onehot = self.species.one_hot(batch["numbers"], batch["positions"].dtype)
        out = {"node": (onehot, batch["n_atoms"])}
        if self.edge_noise:
            _, _, rbf, fcut = self._radial(batch)
            i, j = batch["edge_index"]
            out["edge"] = (torch.cat([rbf * fcut[:, None], onehot[i], onehot[j]], dim=1), batch["n_edges"])
        return out

    def edge_filters(self, d: torch.Tensor) -> torch.Tensor:
        """Radial filters of every interaction, concatenated: (E,) Angstrom -> (E, interactions * 3F)."""
        rbf, fcut = sine_rbf(d, self.radial, self.cutoff), cosine_cutoff(d, self.cutoff)
        return torch.cat([block.message.filter(rbf) * fcut[:, None] for block in self.interactions], dim=1)

    def shared_terms(self, batch: dict) -> dict | None:
        """The radial filters of ``batch`` and their derivatives in the distance, computed once and
        shared by every noise replica of it (see ``Backbone.shared_terms``); None with ``edge_noise``."""
        if self.edge_noise:
            return None
        with torch.no_grad():
            d = torch.linalg.norm(edge_vectors(batch), dim=1)
            rbf, drbf = sine_rbf_and_derivative(d, self.radial, self.cutoff)
            fcut, dfcut = cosine_cutoff_and_derivative(d, self.cutoff)
            values, derivative = [], []
            for block in self.interactions:
                f = block.message.filter
                w = f(rbf)
                values.append(w * fcut[:, None])
                derivative.append(nn.functional.linear(drbf, f.weight) * fcut[:, None] + w * dfcut[:, None])
        return {"shared_edge_filters": (torch.cat(values, dim=1), torch.cat(derivative, dim=1))}

    def energy(self, batch):
        r = edge_vectors(batch)
        d = torch.linalg.norm(r, dim=1)
        unit = r / d[:, None]
        shared = batch.get("shared_edge_filters")
        w_all = self.edge_filters(d) if shared is None else shared_per_edge(d, *shared)
        s = self.embedding(self.species.index(batch["numbers"]))
        v = torch.zeros((s.shape[0], 3, s.shape[1]), dtype=s.dtype, device=s.device)
        for block, w in zip(self.interactions, torch.split(w_all, 3 * s.shape[1], dim=1)):
            s, v = block.message(s, v, batch["edge_index"], w, unit)
            s, v = block.update(s, v)
        atomic = self.scale * self.readout(s).squeeze(-1) + self.shift
        if self.isolated_atom_limit:
            atomic = atomic * isolation_switch(d, batch["edge_index"][0], s.shape[0], self.cutoff)
        n_graphs = batch["n_atoms"].shape[0]
        energy = torch.zeros(n_graphs, dtype=s.dtype, device=s.device).index_add(0, batch["batch"], atomic)
        return energy.double() + self.species.reference_energy(batch["numbers"], batch["batch"], n_graphs)


def build(cfg: dict, summary: DatasetSummary) -> PaiNN:
    """Build from the resolved ``model`` config section."""
    return PaiNN(summary, cutoff=cfg["cutoff"], features=cfg["features"],
                 interactions=cfg["interactions"], radial=cfg["radial"], edge_noise=bool(cfg["edge_noise"]),
                 isolated_atom_limit=bool(cfg.get("isolated_atom_limit", False)),  # files from before: off
                 vector_noise=bool(cfg.get("vector_noise", False)),
                 message_noise=bool(cfg.get("message_noise", True)))  # files from before: on
