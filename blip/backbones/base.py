"""The small protocol every backbone adapter implements, and helpers they share."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class DatasetSummary:
    """What a backbone needs to know about the training data; stored in model files.

    elements: atomic numbers seen in training; e0s: eV per isolated atom;
    energy_shift: mean (E - sum E0) per atom, eV; force_scale: RMS force component, eV/A;
    avg_num_neighbors: mean neighbours per atom within the cutoff; periodic: every training
    structure read for the neighbour statistics (the first 200) is periodic along all three axes.
    """

    elements: list[int]
    e0s: dict[int, float] = field(default_factory=dict)
    energy_shift: float = 0.0
    force_scale: float = 1.0
    avg_num_neighbors: float = 10.0
    periodic: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["e0s"] = {int(k): float(v) for k, v in self.e0s.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetSummary":
        d = dict(d)
        d["e0s"] = {int(k): float(v) for k, v in d.get("e0s", {}).items()}
        return cls(**d)


class Backbone(nn.Module):
    """A message-passing potential that BLIP can wrap.

    Subclasses set ``cutoff`` (Angstrom) and ``elements`` and implement
    ``noisy_layers``, ``domain_feature_dims``, ``domain_features`` and ``energy``.
    """

    cutoff: float
    elements: list[int]
    atom_domain: str = "node"  # the domain with one row per atom, in the order of the positions

    def noisy_layers(self) -> dict[str, str]:
        """Regex over module names -> domain of the rows that layer acts on."""
        raise NotImplementedError

    def extra_noisy_factories(self) -> dict:
        """Extra module type -> noisy factory for layers that are not ``nn.Linear``."""
        return {}

    def domain_feature_dims(self) -> dict[str, int]:
        """Domain -> width of the invariant features fed to the inference net."""
        raise NotImplementedError

    def domain_features(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Domain -> (invariant features (rows, d), rows per graph (G,))."""
        raise NotImplementedError

    def domain_row_ids(self, batch: dict, domains) -> dict[str, torch.Tensor]:
        """Domain -> identity of every row within its structure, (rows, m) long, for ``domains``.

        Sampling noise is a hash of it (see :mod:`blip.bayes.noise`), so a row keeps its draws
        when other rows come or go. Default: ``node`` rows are atoms (index in the structure),
        ``edge`` rows are directed edges ``(i, j, cell shift)``. A domain left out is keyed by
        its rows' positions within the structure, which is reproducible but shifts when rows
        are inserted before them. Only the requested domains are computed (sampled passes).
        """
        ids = {}
        if "node" in domains:
            ids["node"] = local_atom_index(batch)[:, None]
        if "edge" in domains:
            ids["edge"] = edge_ids(batch, batch["edge_index"][0], batch["edge_index"][1], batch["unit_shifts"])
        return ids

    def domain_group_counts(self) -> dict[str, int]:
        """Domain -> number of row groups with their own feature statistics (default: one)."""
        return {}

    def domain_groups(self, batch: dict) -> dict[str, torch.Tensor]:
        """Domain -> group of every row (rows,) long, in ``range(domain_group_counts()[domain])``.

        Domains left out have a single group. Species for atoms and species pairs for edges
        keep the feature statistics of, e.g., H apart from those of C.
        """
        return {}

    def energy(self, batch: dict) -> torch.Tensor:
        """Total energy per graph (G,), eV, float64 (the network's part in the model dtype, the
        isolated-atom energies added in float64); differentiable w.r.t. batch["positions"]."""
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """Hook to add backbone-specific inputs to a batch before the forward pass."""
        return batch

    def shared_terms(self, batch: dict) -> dict | None:
        """Noise-free per-edge terms of ``batch`` to compute once for all its noise replicas.

        Returns extra batch entries (or None: nothing shared) that :meth:`energy` of a
        :func:`blip.data.replicate` copy of ``batch`` uses instead of recomputing them for
        each replica; each entry holds values and their derivatives in the edge length, so
        every replica's forces stay the exact gradient of its own energy.
        """
        return None


class SpeciesMap(nn.Module):
    """Atomic number -> index in ``elements`` (-1 for unknown), and per-element references."""

    def __init__(self, elements: list[int], e0s: dict[int, float] | None = None):
        super().__init__()
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(sorted(elements))] = torch.arange(len(elements))
        self.register_buffer("index_of", table)
        e0 = torch.zeros(119, dtype=torch.get_default_dtype())
        for z, value in (e0s or {}).items():
            e0[int(z)] = float(value)
        self.register_buffer("e0", e0)
        self.n = len(elements)

    def index(self, numbers: torch.Tensor) -> torch.Tensor:
        return self.index_of[numbers]

    def one_hot(self, numbers: torch.Tensor, dtype) -> torch.Tensor:
        return nn.functional.one_hot(self.index(numbers), self.n).to(dtype)

    def reference_energy(self, numbers: torch.Tensor, batch: torch.Tensor, n_graphs: int) -> torch.Tensor:
        """Sum of isolated-atom energies per graph (G,), eV, summed in float64."""
        out = torch.zeros(n_graphs, dtype=torch.float64, device=numbers.device)
        return out.index_add(0, batch, self.e0.double()[numbers])


def species_groups(species: SpeciesMap, batch: dict) -> dict[str, torch.Tensor]:
    """Groups of the ``node`` (species) and ``edge`` (ordered species pair) domains."""
    z = species.index(batch["numbers"])
    i, j = batch["edge_index"]
    return {"node": z, "edge": z[i] * species.n + z[j]}


class SpeciesDomains:
    """Domain hooks of a backbone whose ``node`` rows are atoms grouped by species and whose
    ``edge`` rows are directed edges grouped by ordered species pair, with edge features of
    ``edge_radial_features`` radial values and both ends' one-hot species (mix in before
    :class:`Backbone`; needs ``self.species``, a :class:`SpeciesMap`)."""

    species: SpeciesMap
    edge_radial_features: int

    def domain_group_counts(self) -> dict[str, int]:
        return {"node": self.species.n, "edge": self.species.n ** 2}

    def domain_groups(self, batch: dict) -> dict[str, torch.Tensor]:
        return species_groups(self.species, batch)

    def domain_feature_dims(self) -> dict[str, int]:
        n = self.species.n
        return {"node": n, "edge": self.edge_radial_features + 2 * n}


class _SharedPerEdge(torch.autograd.Function):
    """Values of a function of each edge's length, computed once for E edges and repeated for
    K replicas, with the gradient of each replica's own lengths: d value / d length is given."""

    @staticmethod
    def forward(ctx, lengths, values, derivative):
        ctx.copies = lengths.shape[0] // values.shape[0] if values.shape[0] else 1  # no edges: nothing to repeat
        ctx.save_for_backward(derivative)
        return values.repeat(ctx.copies, 1)

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        grad_lengths = (grad.reshape(ctx.copies, *derivative.shape) * derivative).sum(-1).reshape(-1)
        return grad_lengths, None, None


def shared_per_edge(lengths: torch.Tensor, values: torch.Tensor, derivative: torch.Tensor) -> torch.Tensor:
    """``f(lengths)`` (K E, n) from ``values = f(l)`` and ``derivative = f'(l)`` (E, n) of one copy.

    ``lengths`` (K E,) are the edge lengths of K identical copies (replica-major, as
    :func:`blip.data.replicate` lays them out); gradients flow to each copy's own lengths,
    exactly (first derivatives; not for a loss on forces). Raises if the sizes do not fit.
    """
    if values.shape != derivative.shape or lengths.shape[0] % max(values.shape[0], 1):
        raise ValueError(f"shared per-edge terms for {values.shape[0]} edges do not fit {lengths.shape[0]} edges")
    return _SharedPerEdge.apply(lengths, values, derivative)


# TorchScript-compatible (blip.export compiles it): constants come in as default arguments.
def isolation_switch(lengths: torch.Tensor, centres: torch.Tensor, n_atoms: int, cutoff: float,
                     full_weight: float = 1.0) -> torch.Tensor:
    """Weight in [0, 1] of every atom's learned energy, (n_atoms,), from edge lengths (E,)
    Angstrom and the atom of each edge (E,) (a full neighbour list: every pair both ways).

    An atom's neighbours count by the cosine cutoff weight ``0.5 (cos(pi r / rc) + 1)`` (1 at
    r = 0, 0.5 at half the cutoff); once they sum to ``full_weight`` the switch is 1, and it falls
    to 0 for an atom without neighbours (C2 "smootherstep" of the sum in between; an atom of a
    diatomic molecule at 0.2 rc: 0.99). Multiplying the learned part of the atomic energies by it
    makes an isolated atom's energy exactly its isolated-atom energy E0, and a leaving atom's
    energy tend to it: otherwise a lone atom keeps the learned energy of an atom in the training
    structures (a few eV of binding energy).
    """
    inside = (lengths < cutoff).to(lengths.dtype)
    weights = 0.5 * (torch.cos(lengths * (math.pi / cutoff)) + 1.0) * inside
    total = torch.zeros(n_atoms, dtype=lengths.dtype, device=lengths.device).index_add(0, centres, weights)
    x = (total / full_weight).clamp(0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


def local_atom_index(batch: dict) -> torch.Tensor:
    """Index of every atom within its own structure, (N,) long."""
    n_atoms = batch["n_atoms"]
    start = torch.cumsum(n_atoms, 0) - n_atoms
    return torch.arange(batch["batch"].shape[0], device=n_atoms.device) - start[batch["batch"]]


def edge_ids(batch: dict, i: torch.Tensor, j: torch.Tensor, unit_shifts: torch.Tensor) -> torch.Tensor:
    """Identity of directed edges i -> j + cell shift within their structure, (E, 5) long:
    local index of i and j, and the integer cell shift (E, 3)."""
    local = local_atom_index(batch)
    return torch.cat([local[i][:, None], local[j][:, None], unit_shifts.to(torch.long)], dim=1)


def edge_vectors(batch: dict) -> torch.Tensor:
    """r_ij = pos[j] - pos[i] + shift for every edge, (E, 3) Angstrom."""
    i, j = batch["edge_index"]
    pos = batch["positions"]
    return pos[j] - pos[i] + batch["shifts"]


def apply_strain(batch: dict) -> torch.Tensor:
    """Strain the batch in place: positions, cell shifts and cells become ``x (1 + eps)`` with a
    symmetric ``eps``; returns the strain (G, 3, 3), zero, with gradients.

    The energy's gradient with respect to it, over the volume, is the stress: backbones see
    the strain through ``positions``, ``shifts`` and ``cell`` (whichever they use) alike.
    """
    pos = batch["positions"]
    strain = torch.zeros((batch["n_atoms"].shape[0], 3, 3), dtype=pos.dtype, device=pos.device, requires_grad=True)
    sym = 0.5 * (strain + strain.transpose(1, 2))
    edge_graph = batch["batch"][batch["edge_index"][0]]
    batch["positions"] = pos + torch.einsum("ni,nij->nj", pos, sym[batch["batch"]])
    batch["shifts"] = batch["shifts"] + torch.einsum("ei,eij->ej", batch["shifts"], sym[edge_graph])
    cell = batch["cell"].to(pos.dtype)
    batch["cell"] = cell + cell @ sym
    return strain


def cell_volumes(batch: dict) -> torch.Tensor:
    """Volume of every graph's cell (G,) A^3; NaN where no direction is periodic or the volume is zero."""
    cell = batch["cell"].detach()
    volume = torch.linalg.det(cell.double()).abs().to(cell.dtype)
    periodic = batch["pbc"].any(dim=1) & (volume > 1e-10)
    return torch.where(periodic, volume, torch.full_like(volume, float("nan")))
