"""TorchScript modules of :mod:`blip.export` for the MACE backbone (mace-torch ``ScaleShiftMACE``).

:class:`MaceEnergy` runs the trained mace-torch submodules (embeddings, tensor products,
symmetric contractions, readouts, scale/shift), each compiled as mace-torch compiles its
models (``e3nn.util.jit.compile``), in the order of ``ScaleShiftMACE.forward`` and of its
interaction and product blocks. BLIP's noisy layers are replaced by scriptable versions that
take explicit per-row counter keys and compute their rates from the trained rate heads and
feature densities (:class:`blip._export_torchscript.LearnedRate`): the same maths as
:mod:`blip.bayes.irreps` (``channel_factors``, ``noisy_fc_preactivation``,
``invariant_summary``) and the same draws (:mod:`blip.bayes.noise`). Importing this module
needs ``metatomic-torch`` and ``mace-torch``.
"""

# no `from __future__ import annotations`: TorchScript reads the annotations as objects
import copy
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .backbones.base import isolation_switch
from .backbones.mace import MaceBackbone  # noqa: F401  (imports mace before e3nn, see there)
from ._export_torchscript import FixedRate, LearnedRate, replica_graph
from .bayes.irreps import (NoisyFCLayer, NoisyIrrepsLinear, channel_factors, invariant_summary, noisy_fc_preactivation,
                           scalar_path_noise)
from .bayes.noise import counter_normal, counter_uniform, stream_word

from e3nn.util import jit as e3nn_jit  # noqa: E402  (after mace)
from mace.tools.scatter import scatter_sum  # noqa: E402

SUPPORTED_INTERACTIONS = ("RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock")


def _compiled(module: nn.Module) -> nn.Module:
    """A copy of a trained mace-torch / e3nn module, compiled as mace-torch compiles its models."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The TorchScript type system", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return e3nn_jit.compile(copy.deepcopy(module))


def _rate(potential, layer: nn.Module, in_features: int) -> Tuple[nn.Module, str]:
    """Rate module and noise kind of a noisy layer of ``potential`` (BLIP or MC dropout)."""
    if potential.method == "blip":
        rate = LearnedRate(potential.inference, layer.domain, layer.rate_slot, in_features,
                           potential.backbone.atom_domain)
        return rate, potential.noise_kind
    return FixedRate(potential.dropout_p), "bernoulli"


class IrrepsLinear(nn.Module):
    """A trained e3nn ``o3.Linear``, with the channel noise of :class:`NoisyIrrepsLinear` if it is one.

    forward(x, keys, base, groups, novelty): ``keys`` (rows,) int32 counter keys of the layer's
    domain, or None for the noise-free pass; ``base``/``groups``: the domain's base features and
    row groups for the rate; ``novelty`` collects feature distances (``LearnedRate``).
    """

    def __init__(self, layer: nn.Module, potential):
        super().__init__()
        self.noisy = isinstance(layer, NoisyIrrepsLinear)
        if self.noisy:
            inner = copy.deepcopy(layer._linear[0]).to(dtype=layer.weight.dtype, device=layer.weight.device)
            for name, param in layer.named_parameters(recurse=False):  # the trained values (and dtype)
                setattr(inner, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
            for name, buf in layer.named_buffers(recurse=False):
                if name in inner._buffers:
                    inner._buffers[name] = buf.clone()
            self.linear = _compiled(inner)
            self.register_buffer("channel_of", layer.channel_of.clone())
            self.register_buffer("even_scalar", layer.even_scalar.clone())
            self.channels, self.stream = int(layer.channels), stream_word(layer.domain, layer.slot)
            self.rate, self.kind = _rate(potential, layer, int(layer.channels))
            # independent noise on the 0e -> 0e path (kind "gaussian"): the layer with squared weights, cached
            self.path_weight = float(layer.scalar_path_weight) if self.kind == "gaussian" else 0.0
            self.squared = self.linear
            if self.path_weight > 0:
                squared = copy.deepcopy(inner)
                squared.weight = nn.Parameter(inner.weight.detach() ** 2, requires_grad=False)
                self.squared = _compiled(squared)
            self.register_buffer("scalar_in", layer.scalar_in.clone().to(layer.weight.dtype))
            self.register_buffer("scalar_out", layer.scalar_out.clone())
        else:
            self.linear = _compiled(layer)
            self.register_buffer("channel_of", torch.zeros(1, dtype=torch.long))
            self.register_buffer("even_scalar", torch.zeros(1, dtype=torch.bool))
            self.channels, self.stream = 1, 0
            self.rate, self.kind = FixedRate(0.0), "gaussian"
            self.path_weight, self.squared = 0.0, self.linear
            self.register_buffer("scalar_in", torch.zeros(1))
            self.register_buffer("scalar_out", torch.zeros(1, dtype=torch.long))

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor], base: torch.Tensor,
                groups: torch.Tensor, novelty: List[torch.Tensor]) -> torch.Tensor:
        if self.noisy and keys is not None:
            p = self.rate(base, invariant_summary(x, self.channel_of, self.even_scalar), groups, novelty)[:, None]
            if self.kind == "bernoulli":
                draws = counter_uniform(keys, self.stream, self.channels, x.dtype)
            elif self.path_weight > 0:  # as NoisyIrrepsLinear._independent_scalar_path
                draws = counter_normal(keys, self.stream, self.channels + self.scalar_out.numel(), x.dtype)
                vector = (~self.even_scalar).to(x.dtype)
                factors = channel_factors(p, draws[:, :self.channels] * vector, self.kind)
                out = self.linear(x * factors[:, self.channel_of])
                variance = self.squared(x * x * self.scalar_in.to(x.dtype))
                return scalar_path_noise(out, variance, p, draws[:, self.channels:], self.scalar_out, self.path_weight)
            else:
                draws = counter_normal(keys, self.stream, self.channels, x.dtype)
            x = x * channel_factors(p, draws, self.kind)[:, self.channel_of]
        return self.linear(x)


class DenseLayer(nn.Module):
    """One trained layer of an e3nn ``FullyConnectedNet`` (e3nn's weight normalisation), noisy or not."""

    def __init__(self, layer: nn.Module, stream: int):
        super().__init__()
        self.weight = layer.weight
        self.has_act = layer.act is not None
        self.act = layer.act if self.has_act else nn.Identity()
        self.h_in, self.h_out = int(layer.h_in), int(layer.h_out)
        self.var_in, self.var_out = float(layer.var_in), float(layer.var_out)
        self.stream = int(stream)

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor], p: torch.Tensor, kind: str) -> torch.Tensor:
        if self.has_act:
            w = self.weight / (self.h_in * self.var_in) ** 0.5
        else:
            w = self.weight / (self.h_in * self.var_in / self.var_out) ** 0.5
        if keys is not None:
            channels = self.h_out if kind == "gaussian" else self.h_in
            if kind == "bernoulli":
                draws = counter_uniform(keys, self.stream, channels, x.dtype)
            else:
                draws = counter_normal(keys, self.stream, channels, x.dtype)
            x = noisy_fc_preactivation(x, w, p, draws, kind)
        else:
            x = x @ w
        if self.has_act:
            return self.act(x) * self.var_out ** 0.5
        return x


class RadialMLP(nn.Module):
    """A trained ``conv_tp_weights`` (e3nn ``FullyConnectedNet``), with the edge noise of
    :class:`NoisyFCLayer` (one rate per row shared by its layers) when its layers are noisy."""

    def __init__(self, net: nn.Module, potential):
        super().__init__()
        layers = list(net)
        noisy = [isinstance(m, NoisyFCLayer) for m in layers]
        if any(noisy) and not all(noisy):
            raise NotImplementedError(f"export expects every layer of a radial MLP noisy or none ({net})")
        self.noisy = bool(noisy) and all(noisy)
        streams = [stream_word(m.domain, m.slot) if self.noisy else 0 for m in layers]
        self.layers = nn.ModuleList(DenseLayer(m, s) for m, s in zip(layers, streams))
        if self.noisy:
            first = layers[0]
            if any(m.rate_slot != first.rate_slot for m in layers):
                raise NotImplementedError(f"export expects the noisy layers of one MLP to share one rate ({net})")
            self.rate, self.kind = _rate(potential, first, int(first.h_in))
        else:
            self.rate, self.kind = FixedRate(0.0), "gaussian"

    def forward(self, x: torch.Tensor, keys: Optional[torch.Tensor], base: torch.Tensor,
                groups: torch.Tensor, novelty: List[torch.Tensor]) -> torch.Tensor:
        use: Optional[torch.Tensor] = keys if self.noisy else None
        p = self.rate(base, x, groups, novelty)[:, None] if use is not None else x.new_zeros(0)
        for layer in self.layers:
            x = layer(x, use, p, self.kind)
        return x


class MaceInteraction(nn.Module):
    """``RealAgnosticInteractionBlock`` / ``RealAgnosticResidualInteractionBlock``.forward with BLIP noise."""

    def __init__(self, block: nn.Module, potential):
        super().__init__()
        name = type(block).__name__
        if name not in SUPPORTED_INTERACTIONS or hasattr(block, "conv_fusion"):
            raise NotImplementedError(f"export supports the MACE interactions {', '.join(SUPPORTED_INTERACTIONS)} "
                                      f"(without fused convolutions), not {name}")
        self.residual = name == "RealAgnosticResidualInteractionBlock"
        self.skip_tp = _compiled(block.skip_tp)
        self.linear_up = IrrepsLinear(block.linear_up, potential)
        self.radial = RadialMLP(block.conv_tp_weights, potential)
        self.conv_tp = _compiled(block.conv_tp)
        self.linear = IrrepsLinear(block.linear, potential)
        self.reshape = _compiled(block.reshape)
        self.avg_num_neighbors = float(block.avg_num_neighbors)

    def forward(self, node_attrs: torch.Tensor, node_feats: torch.Tensor, edge_attrs: torch.Tensor,
                edge_feats: torch.Tensor, edge_index: torch.Tensor, cutoff: Optional[torch.Tensor],
                node_keys: Optional[torch.Tensor], node_base: torch.Tensor, node_groups: torch.Tensor,
                edge_keys: Optional[torch.Tensor], edge_base: torch.Tensor, edge_groups: torch.Tensor,
                novelty: List[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        sc: Optional[torch.Tensor] = None
        if self.residual:
            sc = self.skip_tp(node_feats, node_attrs)
        node_feats = self.linear_up(node_feats, node_keys, node_base, node_groups, novelty)
        tp_weights = self.radial(edge_feats, edge_keys, edge_base, edge_groups, novelty)
        if cutoff is not None:
            tp_weights = tp_weights * cutoff
        mji = self.conv_tp(node_feats[edge_index[0]], edge_attrs, tp_weights)
        message = scatter_sum(src=mji, index=edge_index[1], dim=0, dim_size=node_feats.shape[0])
        message = self.linear(message, node_keys, node_base, node_groups, novelty) / self.avg_num_neighbors
        if not self.residual:
            message = self.skip_tp(message, node_attrs)
        return self.reshape(message), sc


class MaceProduct(nn.Module):
    """``EquivariantProductBasisBlock``.forward (e3nn path) with BLIP noise on its linear."""

    def __init__(self, block: nn.Module, potential):
        super().__init__()
        if getattr(block, "use_agnostic_product", False) or getattr(block, "cueq_config", None) is not None:
            raise NotImplementedError("export supports MACE product blocks without agnostic products or cuEquivariance")
        self.symmetric_contractions = _compiled(block.symmetric_contractions)
        self.linear = IrrepsLinear(block.linear, potential)
        self.use_sc = bool(block.use_sc)

    def forward(self, node_feats: torch.Tensor, sc: Optional[torch.Tensor], node_attrs: torch.Tensor,
                keys: Optional[torch.Tensor], base: torch.Tensor, groups: torch.Tensor,
                novelty: List[torch.Tensor]) -> torch.Tensor:
        node_feats = self.symmetric_contractions(node_feats, node_attrs)
        if self.use_sc and sc is not None:
            return self.linear(node_feats, keys, base, groups, novelty) + sc
        return self.linear(node_feats, keys, base, groups, novelty)


class MaceEnergy(nn.Module):
    """A trained (BLIP) MACE's atomic energies for K copies of one system, noise-free or sampled.

    Same maths as :meth:`blip.backbones.mace.MaceBackbone.energy` (``ScaleShiftMACE``) on a
    batch of K replicas of one structure (structure index 0, replica k), with the noise of
    ``BayesianPotential``; same interface as :class:`blip._export_torchscript.PaiNNEnergy`.
    """

    def __init__(self, potential):
        super().__init__()
        backbone = potential.backbone
        model = backbone.model
        for extra in ("pair_repulsion", "joint_embedding", "embedding_readout"):
            if hasattr(model, extra):
                raise NotImplementedError(f"export does not support MACE models with {extra}")
        if len(model.readouts) != len(model.interactions):
            raise NotImplementedError("export expects one MACE readout per interaction")
        self.n_species = int(backbone.species.n)
        self.cutoff, self.isolated_atom_limit = float(backbone.cutoff), bool(backbone.isolated_atom_limit)
        self.register_buffer("index_of", backbone.species.index_of.clone())
        e0 = model.atomic_energies_fn.atomic_energies.reshape(-1, self.n_species)[0]
        self.register_buffer("e0", e0.detach().double().clone())
        shift = backbone.species_shift
        self.register_buffer("species_shift", torch.zeros_like(self.e0) if shift is None else shift.detach().double().clone())
        self.register_buffer("atomic_numbers", model.atomic_numbers.clone())
        self.node_embedding = _compiled(model.node_embedding)
        self.spherical_harmonics = _compiled(model.spherical_harmonics)
        self.radial_embedding = _compiled(model.radial_embedding)
        self.interactions = nn.ModuleList(MaceInteraction(b, potential) for b in model.interactions)
        self.products = nn.ModuleList(MaceProduct(b, potential) for b in model.products)
        self.readouts = nn.ModuleList(_compiled(r) for r in model.readouts)
        self.scale_shift = _compiled(model.scale_shift)
        self.stochastic = bool(potential.stochastic)
        self.noisy_nodes = "node" in potential.layers
        self.noisy_edges = "edge" in potential.layers
        self.shared_draws = bool(potential.shared_draws)

    def forward(self, types: torch.Tensor, vectors: torch.Tensor, pairs: torch.Tensor, shifts: torch.Tensor,
                copies: int, seed: int, sampled: bool, novelty: List[torch.Tensor]) -> torch.Tensor:
        """Atomic energies (copies, N), eV, float64 with the isolated-atom energies.

        types (N,) atomic numbers; vectors (E, 3) r_ij = pos[j] - pos[i] + shift (MACE's
        sender i, receiver j); pairs (E, 2) [i, j]; shifts (E, 3) integer cell shifts.
        ``sampled``: copy k is noise replica k. ``novelty``: a sampled BLIP pass appends each
        per-atom rate's feature distances (copies N,).
        """
        n = types.shape[0]
        dtype, device = vectors.dtype, vectors.device
        z = self.index_of[types]
        i, j = pairs[:, 0], pairs[:, 1]
        onehot = F.one_hot(z, self.n_species).to(dtype)
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        edge_attrs = self.spherical_harmonics(vectors)
        edge_feats, cutoff = self.radial_embedding(lengths, onehot, pairs.t(), self.atomic_numbers)
        edge_index, node_keys, edge_keys = replica_graph(pairs, shifts, n, copies, seed, sampled and self.stochastic,
                                                         self.noisy_nodes, self.noisy_edges, self.shared_draws)
        node_attrs = onehot.repeat(copies, 1)
        node_groups = z.repeat(copies)
        edge_base = torch.cat([edge_feats, onehot[i], onehot[j]], dim=1).repeat(copies, 1)
        edge_groups = (z[i] * self.n_species + z[j]).repeat(copies)
        edge_attrs = edge_attrs.repeat(copies, 1)
        edge_feats = edge_feats.repeat(copies, 1)
        if cutoff is not None:
            cutoff = cutoff.repeat(copies, 1)
        heads = torch.zeros(n * copies, dtype=torch.long, device=device)
        rows = torch.arange(n * copies, device=device)

        node_feats = self.node_embedding(node_attrs)
        node_es_list = [torch.zeros(n * copies, dtype=dtype, device=device)]  # MACE's (zero) pair energy
        node_feats_list: List[torch.Tensor] = []
        for interaction, product in zip(self.interactions, self.products):
            node_feats, sc = interaction(node_attrs, node_feats, edge_attrs, edge_feats, edge_index, cutoff,
                                         node_keys, node_attrs, node_groups, edge_keys, edge_base, edge_groups,
                                         novelty)
            node_feats = product(node_feats, sc, node_attrs, node_keys, node_attrs, node_groups, novelty)
            node_feats_list.append(node_feats)
        k = 0
        for readout in self.readouts:
            node_es_list.append(readout(node_feats_list[k], heads)[rows, heads])
            k += 1
        node_inter_es = torch.sum(torch.stack(node_es_list, dim=0), dim=0)
        node_inter_es = self.scale_shift(node_inter_es, heads).reshape(copies, n).double() + self.species_shift[z][None, :]
        if self.isolated_atom_limit:
            node_inter_es = node_inter_es * isolation_switch(lengths.squeeze(-1), j, n, self.cutoff).double()[None, :]
        return node_inter_es + self.e0[z][None, :]
