"""CHGNet (Deng et al. 2023) from the ``chgnet`` package, for BLIP fine-tuning.

The pretrained model (default "0.3.0"; its weights ship in the ``chgnet`` wheel, nothing
is downloaded) is wrapped as it is: its graphs come from its own ``graph_converter`` and
its per-element reference energies (``composition_model``, an ``AtomRef``) are kept, so
the pretrained energy scale is kept and BLIP's E0s are not used.

CHGNet builds, per structure, an *atom graph* (directed pairs within 6 A, each pair also
one *undirected bond*) and a *bond graph* whose nodes are the bonds shorter than 3 A and
whose edges are *angles* (two bonds sharing a centre atom). Its noisy layers act on four
kinds of rows, so BLIP sees four noise domains:

* ``atom``      -- atoms: ``atom_conv_layers.N.mlp_out`` (the atom update).
* ``atom_edge`` -- directed atom-graph pairs: ``atom_conv_layers.N.twoBody_atom``
  (gated message MLP, ``mlp_core`` and ``mlp_gate``).
* ``bond``      -- undirected atom-graph bonds (all within 6 A): ``bond_conv_layers.N.mlp_out``.
* ``angle``     -- angles (bond pairs): ``bond_conv_layers.N.twoBody_bond`` (bond messages)
  and ``angle_layers.N.twoBody_bond`` (angle update).

By default (``model.noise_domains: [atom, bond]``) only the update MLPs of atoms and bonds
are noisy: noise on the pair and angle MLPs as well (all four domains, the setting of model
files written before the key existed) made a BLIP fine-tuning step 3.0x as expensive as a
plain one instead of 1.2x, and its K = 16 prediction 60-66x the MAP pass instead of 19x, with a worse recalibrated force NLL on held-out surfaces (0.24 against -0.41 over 3
seeds of ``blip bench finetune-si``; docs/results/finetune-si). The readout MLP, embeddings
and basis expansions stay deterministic. Rows are put in a canonical order per structure
(pairs sorted by centre, neighbour, image), so a noise sample does not depend on pymatgen's
neighbour-list order.

Positions enter differentiably: ``prepare`` builds (and caches, per structure content) the
graph topology; ``energy`` recomputes bond vectors from ``batch["positions"]`` and runs
CHGNet's own basis expansions and message passing (``CHGNet._compute``, through
``blip/backbones/_upstream.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import register_backbone_defaults
from ..errors import ConfigError, DataError
from ._upstream import chgnet_compute
from .base import Backbone, DatasetSummary, SpeciesMap, edge_ids, local_atom_index
from .painn import cosine_cutoff, sine_rbf

DEFAULTS = {
    "cutoff": 6.0,           # Angstrom; must equal the pretrained atom-graph cutoff
    "pretrained": True,      # False: untrained CHGNet of the same architecture
    "model_name": "0.3.0",   # a name chgnet.model.CHGNet.load knows
    "feature_radial": 8,     # radial functions in the inference-net features
    "noise_domains": ["atom", "bond"],  # the MLPs with BLIP noise: atom, atom_edge, bond, angle
}
NOISE_DOMAINS = ("atom", "atom_edge", "bond", "angle")  # every domain (model files without the key)


def _check(model: dict) -> None:
    domains = model.get("noise_domains")
    if not isinstance(domains, (list, tuple)) or not domains or any(d not in NOISE_DOMAINS for d in domains):
        raise ConfigError(f"model.noise_domains must be a non-empty list of {', '.join(NOISE_DOMAINS)}; "
                          f"got {domains!r}")


register_backbone_defaults("chgnet", DEFAULTS, check=_check)

NEIGHBOUR_DENSITY_SCALE = 10.0  # divides the per-atom radial neighbour density (a feature)
CACHE_SIZE = 1024               # structures whose graph topology is kept (~0.1 MB each at 64 Si atoms)


def load_chgnet(model_name: str, pretrained: bool, cutoff: float) -> nn.Module:
    """The pretrained CHGNet ``model_name`` on CPU, or an untrained copy of its architecture.

    The untrained model uses ``cutoff`` (Angstrom) for its atom graph and keeps the fitted
    ``AtomRef`` reference energies. CHGNet's print-outs are silenced.
    """
    from chgnet.model import CHGNet

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            model = CHGNet.load(model_name=model_name, use_device="cpu", verbose=False)
        except ValueError as exc:
            raise ConfigError(f"model.model_name: {exc}") from None
        if not pretrained:
            args = {k: v for k, v in model.model_args.items() if k != "version"}
            args["atom_graph_cutoff"] = cutoff
            model = CHGNet(**args)
    return model


# -- graph topology of one structure ------------------------------------------------
@dataclass
class Topology:
    """CHGNet's graphs of one structure in canonical order (local indices, int32 to save memory).

    atom_graph (Ed, 2): directed pairs [centre, neighbour]; image (Ed, 3): integer lattice
    image of the neighbour; d2u (Ed,): undirected bond of each pair; u2d (Eu,): one
    pair of each bond; bond_graph (A, 5): angles [centre atom, bond i, pair i, bond j, pair j].
    """

    atom_graph: torch.Tensor
    image: torch.Tensor
    d2u: torch.Tensor
    u2d: torch.Tensor
    bond_graph: torch.Tensor

    @property
    def rows(self) -> tuple[int, int, int]:
        """(directed pairs, undirected bonds, angles)."""
        return self.atom_graph.shape[0], self.u2d.shape[0], self.bond_graph.shape[0]


def canonical_topology(graph) -> Topology:
    """Reorder a ``chgnet.graph.CrystalGraph``: pairs by (centre, neighbour, image), bonds by
    their first pair, angles by (pair i, pair j). CHGNet's sums do not depend on the order."""
    ag = graph.atom_graph.numpy().astype(np.int64).reshape(-1, 2)
    image = graph.neighbor_image.numpy().reshape(-1, 3)
    d2u = graph.directed2undirected.numpy().astype(np.int64)
    n_und = graph.undirected2directed.numel()
    bg = graph.bond_graph.numpy().astype(np.int64).reshape(-1, 5)

    img = np.rint(image).astype(np.int64)
    order = np.lexsort((img[:, 2], img[:, 1], img[:, 0], ag[:, 1], ag[:, 0]))
    new_of_old = np.empty_like(order)
    new_of_old[order] = np.arange(order.size)
    first_pair = np.full(n_und, np.iinfo(np.int64).max)
    np.minimum.at(first_pair, d2u, new_of_old)
    bond_order = np.argsort(first_pair, kind="stable")
    bond_of_old = np.empty_like(bond_order)
    bond_of_old[bond_order] = np.arange(n_und)

    angles = np.stack([bg[:, 0], bond_of_old[bg[:, 1]], new_of_old[bg[:, 2]],
                       bond_of_old[bg[:, 3]], new_of_old[bg[:, 4]]], axis=1)
    angles = angles[np.lexsort((angles[:, 4], angles[:, 2]))]

    def small(a):
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    return Topology(atom_graph=small(ag[order]), image=small(img[order]), d2u=small(bond_of_old[d2u[order]]),
                    u2d=small(first_pair[bond_order]), bond_graph=small(angles))


def _lattice_for(positions, cell, pbc, cutoff, index):
    """A 3x3 lattice pymatgen accepts: the cell, or a box around an open-boundary structure."""
    if not pbc.any():
        extent = positions.max(axis=0) - positions.min(axis=0)
        return np.diag(extent + 2.0 * cutoff + 1.0)
    if abs(np.linalg.det(cell)) < 1e-8:
        raise DataError("<batch>", "CHGNet needs a non-singular 3x3 cell for partly periodic structures", index)
    return cell


def build_topology(converter, numbers, positions, cell, pbc, index: int) -> Topology:
    """Run CHGNet's graph converter on one structure (Angstrom) -> :class:`Topology`."""
    from pymatgen.core import Lattice, Structure

    lattice = Lattice(_lattice_for(positions, cell, pbc, converter.atom_graph_cutoff, index),
                      pbc=tuple(bool(p) for p in pbc))
    structure = Structure(lattice, [int(z) for z in numbers], positions, coords_are_cartesian=True)
    try:
        graph = converter(structure, graph_id=str(index))
    except ValueError as exc:  # raised for atoms without neighbours
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError("<batch>", f"CHGNet cannot build its graph ({text})", index) from None
    return canonical_topology(graph)


class TopologyCache:
    """LRU cache: structure content (numbers, positions, cell, pbc) -> :class:`Topology`.

    Shared, not copied, by ``copy.deepcopy`` (EMA copies of a model), since a topology
    depends only on the structure.
    """

    def __init__(self, max_items: int = CACHE_SIZE):
        self.max_items = max_items
        self._items: OrderedDict[bytes, Topology] = OrderedDict()

    @staticmethod
    def key(numbers, positions, cell, pbc) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        for array in (numbers, positions, cell, pbc):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.digest()

    def get(self, key: bytes, build) -> Topology:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = build()
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __deepcopy__(self, memo):
        return self


# -- the adapter ---------------------------------------------------------------------
class CHGNetBackbone(Backbone):
    """CHGNet as a BLIP backbone. Energy per structure (eV) = CHGNet's energy per atom x n_atoms,
    including its ``AtomRef`` reference energies; forces by autograd w.r.t. ``batch["positions"]``."""

    atom_domain = "atom"

    def __init__(self, chgnet: nn.Module, summary: DatasetSummary, feature_radial: int = 8,
                 model_name: str = "0.3.0", noise_domains=tuple(DEFAULTS["noise_domains"])):
        super().__init__()
        from chgnet.model.composition_model import AtomRef

        self.chgnet = chgnet
        self.model_name = model_name
        self.cutoff = float(chgnet.graph_converter.atom_graph_cutoff)
        self.bond_cutoff = float(chgnet.graph_converter.bond_graph_cutoff)
        self.max_z = int(chgnet.atom_embedding.embedding.num_embeddings)
        if chgnet.composition_model is not None and not isinstance(chgnet.composition_model, AtomRef):
            raise ConfigError("CHGNet backbone supports only an AtomRef composition model")
        bad = [int(z) for z in summary.elements if not 1 <= int(z) <= self.max_z]
        if bad:
            raise DataError("training data", f"element(s) with Z = {', '.join(map(str, bad))} are outside "
                            f"CHGNet {model_name}'s element set (Z = 1..{self.max_z})")
        self.elements = sorted(int(z) for z in summary.elements)
        self.species = SpeciesMap(self.elements)
        self.radial = int(feature_radial)
        self.noise_domains = tuple(noise_domains)
        self.cache = TopologyCache()

    # -- noise domains ------------------------------------------------------------
    def noisy_layers(self) -> dict[str, str]:
        """The MLPs of the domains in ``noise_domains``."""
        gated = r"mlp_(core|gate)\.layers\.\d+"
        every = {
            rf"chgnet\.atom_conv_layers\.\d+\.twoBody_atom\.{gated}": "atom_edge",
            r"chgnet\.atom_conv_layers\.\d+\.mlp_out\.layers\.\d+": "atom",
            rf"chgnet\.bond_conv_layers\.\d+\.twoBody_bond\.{gated}": "angle",
            r"chgnet\.bond_conv_layers\.\d+\.mlp_out\.layers\.\d+": "bond",
            rf"chgnet\.angle_layers\.\d+\.twoBody_bond\.{gated}": "angle",
        }
        return {pattern: domain for pattern, domain in every.items() if domain in self.noise_domains}

    def domain_group_counts(self) -> dict[str, int]:
        n = self.species.n
        return {"atom": n, "atom_edge": n * n, "bond": n * n, "angle": n}

    def domain_groups(self, batch: dict) -> dict[str, torch.Tensor]:
        """Species of atoms, ordered species pairs of directed pairs, unordered pairs of bonds,
        and the centre species of angles."""
        n = self.species.n
        z = self.species.index(batch["numbers"])
        ag, bg = batch["chgnet_atom_graph"], batch["chgnet_bond_graph"]
        bond = ag[batch["chgnet_u2d"]]
        zi, zj = z[bond[:, 0]], z[bond[:, 1]]
        return {"atom": z, "atom_edge": z[ag[:, 0]] * n + z[ag[:, 1]],
                "bond": torch.minimum(zi, zj) * n + torch.maximum(zi, zj), "angle": z[bg[:, 0]]}

    def domain_feature_dims(self) -> dict[str, int]:
        n, r = self.species.n, self.radial
        return {"atom": n + r, "atom_edge": r + 2 * n, "bond": r + n, "angle": 1 + 2 * r + n}

    def domain_features(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Invariant features per domain with rows per graph (G,).

        atom: species one-hot + radial neighbour density (sum over 6 A neighbours of the
        radial basis, / 10); atom_edge: radial basis of the pair distance + one-hot of centre
        and neighbour; bond: radial basis + summed one-hot of both atoms; angle: cos(theta),
        radial basis (3 A) of both bond lengths and the centre atom's one-hot.
        """
        geo = self._geometry(batch)
        d = geo["lengths"]
        ag, bg = batch["chgnet_atom_graph"], batch["chgnet_bond_graph"]
        onehot = self.species.one_hot(batch["numbers"], d.dtype)
        rbf = sine_rbf(d, self.radial, self.cutoff) * cosine_cutoff(d, self.cutoff)[:, None]
        density = torch.zeros((onehot.shape[0], self.radial), dtype=d.dtype, device=d.device)
        density = density.index_add(0, ag[:, 0], rbf) / NEIGHBOUR_DENSITY_SCALE
        u2d = batch["chgnet_u2d"]
        bond_pairs = ag[u2d]
        d_i, d_j = d[bg[:, 2]], d[bg[:, 4]]
        rbf_i = sine_rbf(d_i, self.radial, self.bond_cutoff) * cosine_cutoff(d_i, self.bond_cutoff)[:, None]
        rbf_j = sine_rbf(d_j, self.radial, self.bond_cutoff) * cosine_cutoff(d_j, self.bond_cutoff)[:, None]
        rows = batch["chgnet_rows"]
        return {
            "atom": (torch.cat([onehot, density], dim=1), batch["n_atoms"]),
            "atom_edge": (torch.cat([rbf, onehot[ag[:, 0]], onehot[ag[:, 1]]], dim=1), rows[:, 0]),
            "bond": (torch.cat([rbf[u2d], onehot[bond_pairs[:, 0]] + onehot[bond_pairs[:, 1]]], dim=1),
                     rows[:, 1]),
            "angle": (torch.cat([geo["cos_angle"][:, None], rbf_i, rbf_j, onehot[bg[:, 0]]], dim=1), rows[:, 2]),
        }

    def domain_row_ids(self, batch: dict, domains) -> dict[str, torch.Tensor]:
        """Identities of CHGNet's rows within their structure (see ``Backbone.domain_row_ids``):
        atoms by index; pairs by (centre, neighbour, image); a bond by its first pair; an angle
        by its centre atom and the (neighbour, image) of both of its pairs."""
        local = local_atom_index(batch)
        ids = {"atom": local[:, None]} if "atom" in domains else {}
        if not {"atom_edge", "bond", "angle"} & set(domains):
            return ids
        ag, bg = batch["chgnet_atom_graph"], batch["chgnet_bond_graph"]
        pair = edge_ids(batch, ag[:, 0], ag[:, 1], torch.round(batch["chgnet_image"]).long())
        ids.update({"atom_edge": pair, "bond": pair[batch["chgnet_u2d"]],
                    "angle": torch.cat([local[bg[:, 0]][:, None], pair[bg[:, 2]][:, 1:], pair[bg[:, 4]][:, 1:]], dim=1)})
        return {d: v for d, v in ids.items() if d in domains}

    # -- graphs ---------------------------------------------------------------------
    def prepare(self, batch: dict) -> dict:
        """Add CHGNet's graph indices (global, int64) to a batch; topologies come from the cache.

        Adds ``chgnet_atom_graph`` (Ed, 2), ``chgnet_image`` (Ed, 3), ``chgnet_edge_graph`` (Ed,),
        ``chgnet_d2u`` (Ed,), ``chgnet_u2d`` (Eu,), ``chgnet_bond_graph`` (A, 5) and
        ``chgnet_rows`` (G, 3): pairs, bonds and angles per graph.
        """
        numbers = batch["numbers"].cpu().numpy()
        if numbers.size and (numbers.min() < 1 or numbers.max() > self.max_z):
            z = int(numbers.max() if numbers.max() > self.max_z else numbers.min())
            raise DataError("<batch>", f"element Z = {z} is outside CHGNet {self.model_name}'s "
                            f"element set (Z = 1..{self.max_z})")
        positions = batch["positions"].detach().cpu().numpy()
        cells = batch["cell"].detach().cpu().numpy()
        pbcs = batch["pbc"].cpu().numpy()
        counts = batch["n_atoms"].tolist()
        index = batch["structure_index"].tolist()
        converter = self.chgnet.graph_converter
        tops, start = [], 0
        for g, n in enumerate(counts):
            z, pos, cell, pbc = numbers[start:start + n], positions[start:start + n], cells[g], pbcs[g]
            key = TopologyCache.key(z, pos, cell, pbc)
            tops.append(self.cache.get(key, lambda: build_topology(
                converter, z, pos.astype(np.float64), cell.astype(np.float64), pbc, index[g])))
            start += n
        batch.update(self._assemble(tops, counts, batch["positions"]))
        return batch

    @staticmethod
    def _assemble(tops: list[Topology], counts: list[int], like: torch.Tensor) -> dict:
        rows = torch.tensor([t.rows for t in tops], dtype=torch.long)
        atom_off = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        pair_off = (torch.cumsum(rows[:, 0], 0) - rows[:, 0]).tolist()
        bond_off = (torch.cumsum(rows[:, 1], 0) - rows[:, 1]).tolist()
        angle_shift = [torch.tensor([a, b, p, b, p]) for a, b, p in zip(atom_off, bond_off, pair_off)]
        device = like.device

        def stack(name, offsets):
            return torch.cat([getattr(t, name).long() + off for t, off in zip(tops, offsets)])

        out = {
            "chgnet_atom_graph": stack("atom_graph", atom_off),
            "chgnet_image": torch.cat([t.image for t in tops]).to(like.dtype),
            "chgnet_edge_graph": torch.repeat_interleave(torch.arange(len(tops)), rows[:, 0]),
            "chgnet_d2u": stack("d2u", bond_off),
            "chgnet_u2d": stack("u2d", pair_off),
            "chgnet_bond_graph": stack("bond_graph", angle_shift),
            "chgnet_rows": rows,
        }
        return {k: v.to(device) for k, v in out.items()}

    def _geometry(self, batch: dict) -> dict:
        """Bond bases, unit vectors, lengths (Angstrom) and angle bases from batch positions.

        Memoised in the batch for the current ``batch["positions"]`` tensor.
        """
        memo = batch.get("_chgnet_geometry")
        pos = batch["positions"]
        if memo is not None and memo[0] is pos:
            return memo[1]
        ag, bg = batch["chgnet_atom_graph"], batch["chgnet_bond_graph"]
        cell = batch["cell"].to(pos.dtype)
        shift = torch.einsum("ei,eij->ej", batch["chgnet_image"], cell[batch["chgnet_edge_graph"]])
        centre, neighbour = pos[ag[:, 0]], pos[ag[:, 1]]
        eye = torch.eye(3, dtype=pos.dtype, device=pos.device)
        bases_ag, bases_bg, unit = self.chgnet.bond_basis_expansion(
            center=centre, neighbor=neighbour, undirected2directed=batch["chgnet_u2d"], image=shift, lattice=eye)
        lengths = torch.linalg.norm(centre - neighbour - shift, dim=1)
        unit_i, unit_j = unit[bg[:, 2]], unit[bg[:, 4]]
        if bg.shape[0]:
            angle_bases = self.chgnet.angle_basis_expansion(unit_i, unit_j)
        else:
            angle_bases = pos.new_zeros((0,))
        geo = {"bases_ag": bases_ag, "bases_bg": bases_bg, "lengths": lengths, "angle_bases": angle_bases,
               "cos_angle": (unit_i * unit_j).sum(dim=1)}
        batch["_chgnet_geometry"] = (pos, geo)
        return geo

    # -- energy --------------------------------------------------------------------
    def reference_energy(self, batch: dict, dtype) -> torch.Tensor:
        """CHGNet's AtomRef energies summed per graph (G,), eV."""
        n_graphs = batch["n_atoms"].shape[0]
        out = torch.zeros(n_graphs, dtype=dtype, device=batch["numbers"].device)
        comp = self.chgnet.composition_model
        if comp is None:
            return out
        per_atom = comp.fc.weight[0].to(dtype)[batch["numbers"] - 1]
        return out.index_add(0, batch["batch"], per_atom)

    def energy(self, batch: dict) -> torch.Tensor:
        """Total energy per graph (G,), eV; differentiable w.r.t. ``batch["positions"]``."""
        from chgnet.model.model import BatchedGraph

        geo = self._geometry(batch)
        pos, bg = batch["positions"], batch["chgnet_bond_graph"]
        graph = BatchedGraph(
            atomic_numbers=batch["numbers"], bond_bases_ag=geo["bases_ag"], bond_bases_bg=geo["bases_bg"],
            angle_bases=geo["angle_bases"], batched_atom_graph=batch["chgnet_atom_graph"],
            batched_bond_graph=bg[:, [0, 1, 3]] if bg.shape[0] else bg.new_zeros((0,)),
            atom_owners=batch["batch"], directed2undirected=batch["chgnet_d2u"],
            atom_positions=[pos], strains=[], volumes=pos.new_zeros((0,)),
        )
        energy = chgnet_compute(self.chgnet, graph)["e"]
        if self.chgnet.is_intensive:
            energy = energy * batch["n_atoms"].to(energy.dtype)
        return energy.double() + self.reference_energy(batch, torch.float64)


def build(cfg: dict, summary: DatasetSummary) -> CHGNetBackbone:
    """Build from the resolved ``model`` config section (see ``DEFAULTS``)."""
    name, pretrained, cutoff = str(cfg["model_name"]), bool(cfg["pretrained"]), float(cfg["cutoff"])
    chgnet = load_chgnet(name, pretrained, cutoff)
    expected = float(chgnet.graph_converter.atom_graph_cutoff)
    if pretrained and abs(cutoff - expected) > 1e-9:
        raise ConfigError(f"model.cutoff is {cutoff:g} A but pretrained CHGNet {name} uses an atom-graph "
                          f"cutoff of {expected:g} A; set model.cutoff: {expected:g} (or leave it out)")
    if cutoff <= float(chgnet.graph_converter.bond_graph_cutoff):
        raise ConfigError(f"model.cutoff ({cutoff:g} A) must exceed CHGNet's bond-graph cutoff "
                          f"({chgnet.graph_converter.bond_graph_cutoff:g} A)")
    # model files written before noise_domains existed were trained with noise on every domain
    domains = cfg.get("noise_domains", NOISE_DOMAINS)
    return CHGNetBackbone(chgnet, summary, feature_radial=int(cfg["feature_radial"]), model_name=name,
                          noise_domains=domains)
