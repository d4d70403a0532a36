"""TorchScript modules of :mod:`blip.export`: a trained BLIP potential as a metatomic model.

Built from the trained layers (their parameters, not copies of the maths): the noise comes
from the same counter-based functions (:mod:`blip.bayes.noise`), the noisy layers from
:func:`blip.bayes.layers.noisy_linear`, the rates from the trained rate heads and feature
densities through :func:`blip.bayes.inference.rate_inputs` / ``clamp_rate``, and PaiNN's
message and update steps from :mod:`blip.backbones.painn`. Importing this module needs
``metatomic-torch``.
"""

# no `from __future__ import annotations`: metatomic checks the forward annotations as objects
from typing import Dict, List, Optional, Tuple

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, NeighborListOptions, System
from torch import nn
from torch.nn import functional as F

from .backbones.base import isolation_switch
from .backbones.painn import cosine_cutoff, message_step, sine_rbf, update_inputs, update_step
from .bayes.inference import clamp_rate, log_feature_distance, rate_inputs
from .bayes.irreps import channel_factors
from .bayes.layers import NoisyLinear, NoisyVectorLinear, draw_channels, noisy_linear, vector_channel_norms
from .bayes.noise import counter_normal, counter_uniform, row_keys, stream_word


# -- rates -------------------------------------------------------------------------------
class LearnedRate(nn.Module):
    """BLIP's rate of one noisy MLP: its trained rate head and feature density (``InferenceNet.rate``).

    forward(base, features, groups, novelty): rates (rows,); on the backbone's per-atom domain
    (``atom_domain``) it also appends the rows' log feature distance (rows,) to ``novelty``, as
    ``BayesianPotential.forward(novelty=True)`` collects them."""

    def __init__(self, inference, domain: str, slot: int, in_features: int, atom_domain: str):
        super().__init__()
        self.head = inference.heads[domain][str(slot)]
        self.wants_features = bool(inference.wants_features)
        if self.wants_features:
            self.density = inference.densities[domain][str(slot)]
        else:  # never used; present so that TorchScript compiles the other branch
            from .bayes.density import FeatureDensity

            self.density = FeatureDensity(1, in_features)
        self.use_hidden, self.distance = bool(inference.use_hidden), bool(inference.distance)
        self.metric, self.offset = str(inference.metric), float(inference.offset)
        self.p_min, self.p_max = float(inference.p_min), float(inference.p_max)
        self.records_novelty = self.wants_features and domain == atom_domain

    def forward(self, base: torch.Tensor, features: torch.Tensor, groups: torch.Tensor,
                novelty: List[torch.Tensor]) -> torch.Tensor:
        if not self.wants_features:
            return clamp_rate(self.head(base, None), self.p_min, self.p_max)
        z = self.density.standardise(features, groups)
        if self.records_novelty:
            novelty.append(log_feature_distance(z.detach()))
        m: Optional[torch.Tensor] = None
        if self.distance:
            m = self.density.distances(features, groups, z, self.metric)
        inputs, u = rate_inputs(z, base, self.use_hidden, self.distance, m, self.offset)
        return clamp_rate(self.head(inputs, u), self.p_min, self.p_max)


class FixedRate(nn.Module):
    """MC dropout's fixed rate ``p`` of every row."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, base: torch.Tensor, features: torch.Tensor, groups: torch.Tensor,
                novelty: List[torch.Tensor]) -> torch.Tensor:
        return torch.full((features.shape[0],), self.p, dtype=features.dtype, device=features.device)


# -- layers ------------------------------------------------------------------------------
class Affine(nn.Module):
    """The weight and bias of one (noisy or plain) trained linear layer, and its noise stream."""

    def __init__(self, layer: nn.Module, stream: int):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.in_features, self.out_features = int(layer.in_features), int(layer.out_features)
        self.stream = int(stream)


class NoisyStack(nn.Module):
    """A trained MLP (Linear, SiLU, Linear, ...) or a single linear layer, with BLIP noise on
    every layer when sampled (one rate per row shared by its layers, as in ``NoiseContext``).

    forward(h, keys, base, groups, novelty): ``keys`` (rows,) int32 counter keys, or None for the
    noise-free pass; ``base``/``groups``: the domain's base features and row groups (rates);
    ``novelty``: collects feature distances (:class:`LearnedRate`).
    """

    def __init__(self, layers: List[nn.Module], noisy: bool, kind: str, rate: nn.Module):
        super().__init__()
        streams = [stream_word(m.domain, m.slot) if noisy else 0 for m in layers]
        self.layers = nn.ModuleList(Affine(m, s) for m, s in zip(layers, streams))
        self.noisy, self.kind = bool(noisy), str(kind)
        self.rate = rate

    def forward(self, h: torch.Tensor, keys: Optional[torch.Tensor], base: torch.Tensor,
                groups: torch.Tensor, novelty: List[torch.Tensor]) -> torch.Tensor:
        sampled = self.noisy and keys is not None
        p = self.rate(base, h, groups, novelty) if sampled else h.new_zeros(0)
        k = 0
        for layer in self.layers:
            if k > 0:
                h = F.silu(h)
            if sampled and keys is not None:
                channels = draw_channels(self.kind, layer.in_features, layer.out_features)
                if self.kind == "bernoulli":
                    draws = counter_uniform(keys, layer.stream, channels, h.dtype)
                else:
                    draws = counter_normal(keys, layer.stream, channels, h.dtype)
                h = noisy_linear(h, layer.weight, layer.bias, p, draws, self.kind)
            else:
                h = F.linear(h, layer.weight, layer.bias)
            k += 1
        return h


def noisy_stack(module: nn.Module, potential) -> NoisyStack:
    """A :class:`NoisyStack` of a trained ``nn.Sequential`` (Linear, SiLU, Linear, ...) or linear layer."""
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    linears, acts = layers[0::2], layers[1::2]
    if not all(isinstance(m, (nn.Linear, NoisyLinear)) for m in linears) or not all(
            isinstance(m, nn.SiLU) for m in acts) or len(layers) % 2 == 0:
        raise NotImplementedError(f"export supports MLPs of Linear and SiLU layers, not {module}")
    noisy = [isinstance(m, NoisyLinear) for m in linears]
    if any(noisy) and not all(noisy):
        raise NotImplementedError(f"export supports MLPs whose layers are all noisy or all noise-free, not {module}")
    if not all(noisy):
        return NoisyStack(linears, False, "gaussian", FixedRate(0.0))
    first = linears[0]
    if potential.method == "blip":
        rate = LearnedRate(potential.inference, first.domain, first.rate_slot, first.in_features,
                           potential.backbone.atom_domain)
        kind = potential.noise_kind
    else:
        rate, kind = FixedRate(potential.dropout_p), "bernoulli"
    if any(m.rate_slot != first.rate_slot for m in linears):
        raise NotImplementedError(f"export expects the noisy layers of one MLP to share one rate ({module})")
    return NoisyStack(linears, True, kind, rate)


class VectorMixing(nn.Module):
    """PaiNN's trained vector mixing U and V of one block, (rows, 3, F) -> two (rows, 3, F), with
    BLIP's channel noise (:class:`~blip.bayes.layers.NoisyVectorLinear`: one rate for both, each
    its own draws) when they are noisy and sampled."""

    def __init__(self, u: nn.Module, v: nn.Module, potential):
        super().__init__()
        self.weight_u, self.weight_v = u.weight, v.weight
        self.in_features = int(u.in_features)
        self.noisy = isinstance(u, NoisyVectorLinear)
        self.stream_u = stream_word(u.domain, u.slot) if self.noisy else 0
        self.stream_v = stream_word(v.domain, v.slot) if self.noisy else 0
        if not self.noisy:
            self.rate, self.kind = FixedRate(0.0), "gaussian"
        elif potential.method == "blip":
            self.rate = LearnedRate(potential.inference, u.domain, u.rate_slot, u.in_features,
                                    potential.backbone.atom_domain)
            self.kind = potential.noise_kind
        else:
            self.rate, self.kind = FixedRate(potential.dropout_p), "bernoulli"

    def _factors(self, keys: torch.Tensor, stream: int, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "bernoulli":
            draws = counter_uniform(keys, stream, self.in_features, dtype)
        else:
            draws = counter_normal(keys, stream, self.in_features, dtype)
        return channel_factors(p, draws, self.kind)[:, None, :]

    def forward(self, vec: torch.Tensor, keys: Optional[torch.Tensor], base: torch.Tensor,
                groups: torch.Tensor, novelty: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.noisy or keys is None:
            return F.linear(vec, self.weight_u), F.linear(vec, self.weight_v)
        p = self.rate(base, vector_channel_norms(vec), groups, novelty)[:, None]
        return (F.linear(vec * self._factors(keys, self.stream_u, p, vec.dtype), self.weight_u),
                F.linear(vec * self._factors(keys, self.stream_v, p, vec.dtype), self.weight_v))


# -- K noise replicas of one system -------------------------------------------------------
def replica_graph(pairs: torch.Tensor, shifts: torch.Tensor, n: int, copies: int, seed: int, sampled: bool,
                  noisy_nodes: bool, noisy_edges: bool,
                  shared: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Edge index (2, K E) of K replica-major copies of one system (as :func:`blip.data.replicate`
    lays them out) and the counter keys of their node (K N,) and edge (K E,) rows: replica k,
    structure 0, rows keyed by atom index and (i, j, cell shift) as in ``BayesianPotential``, or
    all by identity 0 with ``shared`` (draws shared per structure, ``uq.noise_draws: structure``);
    None where that domain is noise-free or ``sampled`` is False."""
    device = pairs.device
    i, j = pairs[:, 0], pairs[:, 1]
    offsets = torch.arange(copies, device=device)
    first_atom = (offsets * n)[:, None]
    edge_index = torch.stack([(i[None, :] + first_atom).reshape(-1), (j[None, :] + first_atom).reshape(-1)])
    node_keys: Optional[torch.Tensor] = None
    edge_keys: Optional[torch.Tensor] = None
    if sampled:
        structure = torch.zeros_like(offsets)
        if noisy_nodes:
            local = torch.arange(n, device=device).repeat(copies)[:, None]
            if shared:
                local = torch.zeros_like(local)
            node_keys = row_keys(seed, offsets, structure, torch.full_like(offsets, n), local)
        if noisy_edges:
            ids = torch.cat([pairs.to(torch.long), shifts.to(torch.long)], dim=1).repeat(copies, 1)
            if shared:
                ids = torch.zeros_like(ids[:, :1])
            edge_keys = row_keys(seed, offsets, structure, torch.full_like(offsets, pairs.shape[0]), ids)
    return edge_index, node_keys, edge_keys


# -- PaiNN -------------------------------------------------------------------------------
class PaiNNInteraction(nn.Module):
    def __init__(self, block: nn.Module, potential):
        super().__init__()
        self.filter = noisy_stack(block.message.filter, potential)
        self.phi = noisy_stack(block.message.phi, potential)
        self.UV = VectorMixing(block.update.U, block.update.V, potential)
        self.mlp = noisy_stack(block.update.mlp, potential)


class PaiNNEnergy(nn.Module):
    """A trained (BLIP) PaiNN's atomic energies for K copies of one system, noise-free or sampled.

    Same maths as :meth:`blip.backbones.painn.PaiNN.energy` on a batch of K replicas of one
    structure (structure index 0, replica k), with the noise of ``BayesianPotential``.
    """

    def __init__(self, potential):
        super().__init__()
        backbone = potential.backbone
        self.cutoff, self.radial = float(backbone.cutoff), int(backbone.radial)
        self.edge_noise = bool(backbone.edge_noise)
        self.isolated_atom_limit = bool(backbone.isolated_atom_limit)
        self.n_species = int(backbone.species.n)
        self.register_buffer("index_of", backbone.species.index_of.clone())
        self.register_buffer("e0", backbone.species.e0.double().clone())
        self.embedding = backbone.embedding
        self.interactions = nn.ModuleList(PaiNNInteraction(b, potential) for b in backbone.interactions)
        self.readout = backbone.readout
        self.register_buffer("scale", backbone.scale.clone())
        self.register_buffer("shift", backbone.shift.clone())
        self.stochastic = bool(potential.stochastic)
        self.noisy_nodes = "node" in potential.layers
        self.noisy_edges = "edge" in potential.layers
        self.shared_draws = bool(potential.shared_draws)

    def forward(self, types: torch.Tensor, vectors: torch.Tensor, pairs: torch.Tensor, shifts: torch.Tensor,
                copies: int, seed: int, sampled: bool, novelty: List[torch.Tensor]) -> torch.Tensor:
        """Atomic energies (copies, N), eV, float64 with the isolated-atom energies.

        types (N,) atomic numbers; vectors (E, 3) r_ij = pos[j] - pos[i] + shift; pairs (E, 2)
        [i, j]; shifts (E, 3) integer cell shifts. ``sampled``: copy k is noise replica k.
        ``novelty``: a sampled BLIP pass appends each per-atom rate's feature distances (copies N,).
        """
        n = types.shape[0]
        dtype, device = vectors.dtype, vectors.device
        z = self.index_of[types]
        i, j = pairs[:, 0], pairs[:, 1]
        d = torch.linalg.norm(vectors, dim=1)
        unit = vectors / d[:, None]
        rbf, fcut = sine_rbf(d, self.radial, self.cutoff), cosine_cutoff(d, self.cutoff)
        onehot = F.one_hot(z, self.n_species).to(dtype)
        edge_index, node_keys, edge_keys = replica_graph(pairs, shifts, n, copies, seed, sampled and self.stochastic,
                                                         self.noisy_nodes, self.noisy_edges, self.shared_draws)
        node_base = onehot.repeat(copies, 1)
        node_groups = z.repeat(copies)
        edge_base = torch.cat([rbf * fcut[:, None], onehot[i], onehot[j]], dim=1).repeat(copies, 1)
        edge_groups = (z[i] * self.n_species + z[j]).repeat(copies)
        rbf_all, fcut_all, unit_all = rbf.repeat(copies, 1), fcut.repeat(copies), unit.repeat(copies, 1)
        s = self.embedding(z).repeat(copies, 1)
        v = torch.zeros((s.shape[0], 3, s.shape[1]), dtype=s.dtype, device=s.device)
        for block in self.interactions:
            w = block.filter(rbf_all, edge_keys, edge_base, edge_groups, novelty) * fcut_all[:, None]
            phi = block.phi(s, node_keys, node_base, node_groups, novelty)
            s, v = message_step(phi, s, v, edge_index, w, unit_all)
            uv, vv = block.UV(v, node_keys, node_base, node_groups, novelty)
            a = block.mlp(update_inputs(s, uv, vv), node_keys, node_base, node_groups, novelty)
            s, v = update_step(a, s, v, uv, vv)
        atomic = (self.scale * self.readout(s).squeeze(-1) + self.shift).reshape(copies, n)
        if self.isolated_atom_limit:
            atomic = atomic * isolation_switch(d, i, n, self.cutoff)[None, :]
        return atomic.double() + self.e0[types][None, :]


# -- the metatomic model -------------------------------------------------------------------
class BlipMetatomic(nn.Module):
    """metatomic ``ModelInterface`` of a BLIP model: ``energy`` and its spread over K samples.

    members: the networks, each a :class:`PaiNNEnergy` (or MACE's): one for BLIP, MC dropout or a
    deterministic model, several for a model of ``uq.networks`` sampled networks (a mixture), or an
    ensemble's members (``ensemble``). Network m draws ``samples[m]`` noise samples with seed
    ``seed + m`` and has its own calibration: ``calibration[m]`` c_m, and the energy widening
    ``energy_novelty[m]`` b_E, ``novelty_centre[m]``, ``energy_beyond[m]`` b2, ``novelty_limit[m]``
    (an ensemble: one entry, for all its members, whose K is their number).
    Network m's prediction mu_m is its noise-free (MAP) pass when ``predict_map``, else its sample
    mean (an ensemble's: the member mean); its samples are scaled about mu_m by c_m, further widened
    by ``exp(b_E (nu_max - centre) + b2 max(0, nu_max - limit))`` (nu_max the largest over the
    (selected) atoms of each atom's feature distance averaged over the noisy per-atom layers and
    the samples), and sigma_m is their root mean square deviation from mu_m: as
    ``BlipModel.predict`` gives them. ``energy`` is the mean mu of the mu_m, ``energy_uncertainty``
    ``f sqrt(mean_m sigma_m^2 + mean_m (mu_m - mu)^2)`` and ``energy_ensemble`` every network's
    samples moved to ``mu + f (sample - mu)``, in network order, f the ``mixture_factor``, or
    ``max(mixture_factor, 1)`` where nu_max averaged over the networks exceeds ``mixture_limit``
    (one network, factor 1: its own samples and sigma; :func:`blip.uq.mixture.mix` for several).
    Every system is its own structure (structure index 0).
    """

    def __init__(self, members: List[nn.Module], cutoff: float, samples: List[int], seed: int,
                 calibration: List[float], predict_map: bool, ensemble: bool, dtype: torch.dtype,
                 energy_novelty: List[float], novelty_centre: List[float],
                 energy_beyond: List[float], novelty_limit: List[float], mixture_factor: float = 1.0,
                 mixture_limit: float = float("inf")):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.samples, self.seed = [int(k) for k in samples], int(seed)
        self.calibration = [float(c) for c in calibration]
        self.energy_novelty = [float(b) for b in energy_novelty]
        self.novelty_centre = [float(c) for c in novelty_centre]
        self.energy_beyond = [float(b) for b in energy_beyond]
        self.novelty_limit = [float(c) for c in novelty_limit]
        self.mixture_factor, self.mixture_limit = float(mixture_factor), float(mixture_limit)
        self.predict_map, self.ensemble = bool(predict_map), bool(ensemble)
        self.dtype = dtype
        self.nl = NeighborListOptions(cutoff=float(cutoff), full_list=True, strict=True)

    @torch.jit.export
    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl]

    def _graph(self, system: System) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Edge vectors (E, 3), pairs (E, 2) [i, j] and integer cell shifts (E, 3) of ``system``."""
        nl = system.get_neighbor_list(self.nl)
        idx = nl.samples.values
        return nl.values.reshape(-1, 3), idx[:, 0:2].to(torch.long), idx[:, 2:5].to(torch.long)

    def _widening(self, per_atom: Optional[torch.Tensor], mask: torch.Tensor, m: int) -> torch.Tensor:
        """Network m's ``exp(b_E (nu_max - centre) + b2 max(0, nu_max - limit))`` (float64 scalar)
        from its atoms' distances (N,); 1 without a widening or distances."""
        one = torch.ones((), dtype=torch.float64, device=mask.device)
        b, b2 = self.energy_novelty[m], self.energy_beyond[m]
        if (b == 0.0 and b2 == 0.0) or per_atom is None or not bool(mask.any()):
            return one
        nu_max = per_atom[mask].max().double()
        beyond = torch.clamp(nu_max - self.novelty_limit[m], min=0.0)
        return torch.exp(b * (nu_max - self.novelty_centre[m]) + b2 * beyond)

    def _mixture_factor(self, distances: List[torch.Tensor], networks: int, mask: torch.Tensor) -> float:
        """``mixture_factor``, or ``max(mixture_factor, 1)`` where the (selected) atoms' largest
        distance, averaged over the networks, lies beyond ``mixture_limit``."""
        if len(distances) != networks or not bool(mask.any()):
            return self.mixture_factor
        nu_max = float(torch.stack(distances).mean(dim=0)[mask].max())
        return max(self.mixture_factor, 1.0) if nu_max > self.mixture_limit else self.mixture_factor

    def _networks(self, system: System, mask: torch.Tensor,
                  sampled: bool) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Each network's atomic prediction (N,) float64 and, when ``sampled``, its calibrated
        samples of the (selected atoms') energy (K_m,) and its atoms' feature distances (N,),
        averaged over the noisy per-atom layers and its samples, where it records them (else empty)."""
        vectors, pairs, shifts = self._graph(system)
        types = system.types
        maps: List[torch.Tensor] = []
        scaled: List[torch.Tensor] = []
        distances: List[torch.Tensor] = []
        if self.ensemble:  # the members' noise-free passes are the samples; their mean the prediction
            rows: List[torch.Tensor] = []
            for member in self.members:
                rows.append(member(types, vectors, pairs, shifts, 1, self.seed, False, []))
            atomic = torch.cat(rows, dim=0)  # (members, N)
            maps.append(atomic.mean(dim=0))
            if sampled:
                samples = atomic[:, mask].sum(dim=1)
                centre = maps[0][mask].sum()
                scaled.append(centre + self.calibration[0] * (samples - centre))
            return maps, scaled, distances
        m = 0
        for member in self.members:
            seed = self.seed + m
            atomic_samples = torch.zeros(0)
            widening = torch.ones((), dtype=torch.float64, device=mask.device)
            if sampled or not self.predict_map:
                novelty: List[torch.Tensor] = []
                atomic_samples = member(types, vectors, pairs, shifts, self.samples[m], seed, True, novelty)
                per_atom: Optional[torch.Tensor] = None
                if len(novelty) > 0:
                    per_atom = torch.stack(novelty, dim=1).mean(dim=1).reshape(self.samples[m], -1).mean(dim=0)
                    distances.append(per_atom)
                widening = self._widening(per_atom, mask, m)
            if self.predict_map:
                atomic_map = member(types, vectors, pairs, shifts, 1, seed, False, [])[0]
            else:
                atomic_map = atomic_samples.mean(dim=0)
            maps.append(atomic_map)
            if sampled:  # about the network's prediction: its MAP energy, else its sample mean
                samples = atomic_samples[:, mask].sum(dim=1)  # (K_m,)
                centre = atomic_map[mask].sum()
                scaled.append(centre + self.calibration[m] * widening * (samples - centre))
            m += 1
        return maps, scaled, distances

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        want_spread = "energy_uncertainty" in outputs or "energy_ensemble" in outputs
        if "energy_uncertainty" in outputs and outputs["energy_uncertainty"].sample_kind != "system":
            raise ValueError("BLIP's energy_uncertainty is per system, not per atom")
        if "energy_ensemble" in outputs and outputs["energy_ensemble"].sample_kind != "system":
            raise ValueError("BLIP's energy_ensemble is per system, not per atom")
        per_atom = "energy" in outputs and outputs["energy"].sample_kind == "atom"
        device = systems[0].positions.device if len(systems) > 0 else torch.device("cpu")

        energies: List[torch.Tensor] = []
        atom_values: List[torch.Tensor] = []
        atom_samples: List[torch.Tensor] = []
        spreads: List[torch.Tensor] = []
        ensembles: List[torch.Tensor] = []
        for s, system in enumerate(systems):
            n = system.types.shape[0]
            mask = torch.ones(n, dtype=torch.bool, device=device)
            if selected_atoms is not None:
                chosen = selected_atoms.values
                mask = torch.zeros(n, dtype=torch.bool, device=device)
                mask[chosen[chosen[:, 0] == s][:, 1].to(torch.long)] = True
            maps, scaled, distances = self._networks(system, mask, want_spread)
            atomic = torch.stack(maps).mean(dim=0)  # (N,): the networks' mean
            energy = atomic[mask].sum()
            energies.append(energy)
            if per_atom:
                atom_values.append(atomic[mask])
                index = torch.nonzero(mask).reshape(-1)
                atom_samples.append(torch.stack([torch.full_like(index, s), index], dim=1))
            if want_spread:
                variance = torch.zeros((), dtype=torch.float64, device=device)
                for atomic_map, own in zip(maps, scaled):
                    centre = atomic_map[mask].sum()
                    variance = variance + ((own - centre) ** 2).mean() + (centre - energy) ** 2
                factor = self._mixture_factor(distances, len(maps), mask)
                spreads.append(factor * torch.sqrt(variance / len(maps)))
                ensembles.append(energy + factor * (torch.cat(scaled) - energy))

        results: Dict[str, TensorMap] = {}
        key = Labels("_", torch.zeros((1, 1), dtype=torch.int32, device=device))
        system_labels = Labels("system", torch.arange(len(systems), dtype=torch.int32, device=device)[:, None])
        one = Labels("energy", torch.zeros((1, 1), dtype=torch.int32, device=device))
        no_components: List[Labels] = []
        if "energy" in outputs:
            if per_atom:
                block = TensorBlock(
                    values=torch.cat(atom_values).to(self.dtype)[:, None],
                    samples=Labels(["system", "atom"], torch.cat(atom_samples).to(torch.int32)),
                    components=no_components, properties=one)
            else:
                block = TensorBlock(values=torch.stack(energies).to(self.dtype)[:, None], samples=system_labels,
                                    components=no_components, properties=one)
            results["energy"] = TensorMap(key, [block])
        if "energy_uncertainty" in outputs:
            block = TensorBlock(values=torch.stack(spreads).to(self.dtype)[:, None], samples=system_labels,
                                components=no_components, properties=one)
            results["energy_uncertainty"] = TensorMap(key, [block])
        if "energy_ensemble" in outputs:
            k = ensembles[0].shape[0] if len(ensembles) > 0 else sum(self.samples)
            members = Labels("energy", torch.arange(k, dtype=torch.int32, device=device)[:, None])
            block = TensorBlock(values=torch.stack(ensembles).to(self.dtype), samples=system_labels,
                                components=no_components, properties=members)
            results["energy_ensemble"] = TensorMap(key, [block])
        return results
