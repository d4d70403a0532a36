"""MACE (Batatia et al. 2022) from the ``mace-torch`` package as a BLIP backbone.

The model is mace-torch's own ``ScaleShiftMACE`` (first interaction
``RealAgnosticInteractionBlock``, then ``RealAgnosticResidualInteractionBlock``, as
``mace_run_train --model MACE`` builds it); this module only adapts inputs and outputs.

Noise (irreps-safe, see :mod:`blip.bayes.irreps`):

* message functions: ``interactions.N.linear_up`` for N >= 1 (node features before they
  are sent, node rows; interaction 0's acts on the species embedding alone, so its noise
  could not depend on the structure and it stays deterministic) and ``interactions.N.linear``
  (aggregated messages, node rows), Gaussian dropout on irreps channels;
* update functions: ``products.N.linear`` (node rows), Gaussian dropout on irreps channels;
* deterministic: embedding, skip connections, symmetric contractions, readouts, and the
  radial MLPs that make the tensor-product weights (``interactions.N.conv_tp_weights``)
  unless ``edge_noise`` is set (then edge rows, local reparameterisation): noise on a function
  of distances alone adds spread that does not grow away from the training data.

Edge convention: our ``edge_index = [i, j]`` with ``r_ij = pos[j] - pos[i] + shifts`` is
MACE's ``[sender, receiver]`` with ``vectors = pos[receiver] - pos[sender] + shifts``, so
edges pass through unchanged. Energies in eV: E0s from ``summary.e0s`` (MACE's atomic
energies), interaction energy per atom scaled by ``summary.force_scale`` (RMS force,
eV/A) and shifted by ``summary.energy_shift`` (eV per atom), MACE's rms-forces scaling.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
import torch

# mace must be imported before e3nn: it sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, without
# which e3nn 0.4.4 cannot load its own constants under torch >= 2.6. Imported quietly
# (mace prints a cuequivariance notice to stdout, e3nn warns about that variable), and
# the variable is restored afterwards so torch.load keeps its safe default in this process.
_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_previous_env = os.environ.get(_WEIGHTS_ONLY_ENV)
with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import mace.modules  # noqa: I001
    from e3nn import o3
from ._upstream import e3nn_dense_layer_type  # noqa: E402  (after mace, which e3nn needs first)

E3nnDenseLayer = e3nn_dense_layer_type()  # the layer type of e3nn's FullyConnectedNet
if _previous_env is None:
    os.environ.pop(_WEIGHTS_ONLY_ENV, None)
else:
    os.environ[_WEIGHTS_ONLY_ENV] = _previous_env

from ..bayes.irreps import NoisyFCLayer, NoisyIrrepsLinear
from ..config import register_backbone_defaults
from ..errors import ConfigError
from .base import Backbone, DatasetSummary, SpeciesDomains, SpeciesMap, edge_vectors, isolation_switch

DEFAULTS = {
    "hidden_irreps": None,  # e.g. "32x0e + 32x1o"; None: built from num_channels and max_L
    "num_channels": 32,
    "max_L": 1,
    "correlation": 3,
    "num_interactions": 2,
    "num_radial": 8,
    "max_ell": 3,
    "radial_mlp": [32, 32],
    "mlp_irreps": "16x0e",
    "edge_noise": False,  # noise on the radial MLPs too (edge rows)
    "isolated_atom_limit": True,  # lone atoms carry their E0 (base.isolation_switch)
    "species_shift": True,  # a learned, noise-free energy per species on every atom's learned energy
}

POLYNOMIAL_CUTOFF_P = 5  # mace-torch's default envelope exponent


class MaceBackbone(SpeciesDomains, Backbone):
    """A mace-torch ``ScaleShiftMACE`` (``self.model``) behind the BLIP adapter protocol.

    Domains: ``node`` (atoms; features: one-hot species) and ``edge`` (directed edges;
    features: MACE's radial embedding of the length, then one-hot species of both ends).
    """

    def __init__(self, summary: DatasetSummary, cutoff: float = 5.0, hidden_irreps: str = "32x0e + 32x1o",
                 correlation: int = 3, num_interactions: int = 2, num_radial: int = 8, max_ell: int = 3,
                 radial_mlp: list[int] = (32, 32), mlp_irreps: str = "16x0e", edge_noise: bool = False,
                 isolated_atom_limit: bool = True, species_shift: bool = True):
        super().__init__()
        self.edge_noise, self.isolated_atom_limit = bool(edge_noise), bool(isolated_atom_limit)
        self.cutoff, self.elements = float(cutoff), sorted(int(z) for z in summary.elements)
        self.num_radial = int(num_radial)
        self.edge_radial_features = self.num_radial  # edge rows' radial embedding (with edge_noise)
        self.species = SpeciesMap(self.elements)
        atomic_energies = np.array([float(summary.e0s.get(z, 0.0)) for z in self.elements])
        self.model = mace.modules.ScaleShiftMACE(
            r_max=self.cutoff,
            num_bessel=self.num_radial,
            num_polynomial_cutoff=POLYNOMIAL_CUTOFF_P,
            max_ell=int(max_ell),
            interaction_cls=mace.modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=mace.modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=int(num_interactions),
            num_elements=len(self.elements),
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps(mlp_irreps),
            atomic_energies=atomic_energies,
            avg_num_neighbors=float(summary.avg_num_neighbors),
            atomic_numbers=self.elements,
            correlation=int(correlation),
            gate=torch.nn.functional.silu,
            radial_MLP=[int(h) for h in radial_mlp],
            atomic_inter_scale=float(summary.force_scale),
            atomic_inter_shift=float(summary.energy_shift),
        )
        # MACE's readouts have no bias, so a constant per species goes through the (noisy) weights, where
        # its spread grows with its size: without this, BLIP-MACE's energies came out 15-43 meV off on its
        # own ammonia training structures. A noise-free parameter carries it (eV per atom, starts at 0).
        self.species_shift = torch.nn.Parameter(torch.zeros(len(self.elements))) if species_shift else None

    # -- BLIP protocol --------------------------------------------------------------
    def noisy_layers(self) -> dict[str, str]:
        layers = {
            r"model\.interactions\.[1-9]\d*\.linear_up": "node",  # interaction 0's acts on species embeddings
            r"model\.interactions\.\d+\.linear": "node",
            r"model\.products\.\d+\.linear": "node",
        }
        if self.edge_noise:
            layers[r"model\.interactions\.\d+\.conv_tp_weights\.layer\d+"] = "edge"
        return layers

    def extra_noisy_factories(self) -> dict:
        return {o3.Linear: NoisyIrrepsLinear, E3nnDenseLayer: NoisyFCLayer}

    def domain_features(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        dtype = batch["positions"].dtype
        onehot = self.species.one_hot(batch["numbers"], dtype)
        lengths = torch.linalg.norm(edge_vectors(batch), dim=1, keepdim=True)
        radial, _ = self.model.radial_embedding(lengths, onehot, batch["edge_index"], self.model.atomic_numbers)
        i, j = batch["edge_index"]
        edge = torch.cat([radial, onehot[i], onehot[j]], dim=1)
        return {"node": (onehot, batch["n_atoms"]), "edge": (edge, batch["n_edges"])}

    def energy(self, batch: dict) -> torch.Tensor:
        """Total energy per graph (G,), eV, float64: MACE's interaction energy plus, with
        ``species_shift``, the learned shift of each atom's species (with ``isolated_atom_limit``,
        each atom's part times :func:`~blip.backbones.base.isolation_switch`), plus the E0s of its
        atomic-energies block summed in float64; MACE computes no forces here."""
        out = self.model(self.mace_inputs(batch), training=False, compute_force=False)
        e0 = self.model.atomic_energies_fn.atomic_energies.reshape(-1, self.species.n)[0].double()
        n_graphs = batch["n_atoms"].shape[0]
        species = self.species.index(batch["numbers"])
        atom_e0 = e0[species]
        reference = torch.zeros(n_graphs, dtype=torch.float64, device=e0.device).index_add(0, batch["batch"], atom_e0)
        if not self.isolated_atom_limit:
            energy = out["interaction_energy"].double() + reference
            if self.species_shift is None:
                return energy
            return energy.index_add(0, batch["batch"], self.species_shift[species].double())
        # node_energy = E0 + interaction part, both as float64 from the model dtype: the difference is exact
        interaction = out["node_energy"] - atom_e0
        if self.species_shift is not None:
            interaction = interaction + self.species_shift[species].double()
        lengths = torch.linalg.norm(edge_vectors(batch), dim=1)
        switch = isolation_switch(lengths, batch["edge_index"][1], atom_e0.shape[0], self.cutoff)
        return reference + torch.zeros_like(reference).index_add(0, batch["batch"], interaction * switch.double())

    # -- inputs ---------------------------------------------------------------------
    def mace_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """mace-torch's input dict for our batch (no ``unit_shifts``: not needed without stress)."""
        positions = batch["positions"]
        if not positions.requires_grad:
            positions = positions.detach()  # MACE sets requires_grad on its input; keep the caller's tensor as is
        n_atoms = batch["n_atoms"]
        ptr = torch.cat([n_atoms.new_zeros(1), torch.cumsum(n_atoms, dim=0)])
        return {
            "positions": positions,
            "node_attrs": self.species.one_hot(batch["numbers"], positions.dtype),
            "edge_index": batch["edge_index"],
            "shifts": batch["shifts"],
            "batch": batch["batch"],
            "ptr": ptr,
            "cell": batch["cell"],
        }


# -- config ------------------------------------------------------------------------------
def _irreps(cfg: dict, key: str) -> o3.Irreps:
    try:
        return o3.Irreps(str(cfg[key]))
    except Exception as exc:  # e3nn raises ValueError / AssertionError on bad strings
        raise ConfigError(f"model.{key}: invalid irreps '{cfg[key]}' ({exc or type(exc).__name__})") from None


def _positive_int(cfg: dict, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def hidden_irreps_of(cfg: dict) -> o3.Irreps:
    """``model.hidden_irreps``, or ``num_channels`` x (0e + 1o + 2e + ...) up to ``max_L``."""
    if cfg["hidden_irreps"] is None:
        channels, max_l = _positive_int(cfg, "num_channels"), _positive_int(cfg, "max_L", 0)
        return o3.Irreps(" + ".join(f"{channels}x{o3.Irrep(l, (-1) ** l)}" for l in range(max_l + 1)))
    if (cfg["num_channels"], cfg["max_L"]) != (DEFAULTS["num_channels"], DEFAULTS["max_L"]):
        raise ConfigError("model.hidden_irreps: set either hidden_irreps or num_channels/max_L, not both")
    irreps = _irreps(cfg, "hidden_irreps")
    if irreps.count(o3.Irrep("0e")) == 0:
        raise ConfigError(f"model.hidden_irreps: '{cfg['hidden_irreps']}' has no scalar (0e) channels")
    if len({mul for mul, _ in irreps}) != 1:
        raise ConfigError(f"model.hidden_irreps: '{cfg['hidden_irreps']}' must have the same number of "
                          "channels for every irrep (as mace-torch requires)")
    return irreps


def _flag(cfg: dict, key: str) -> bool:
    if not isinstance(cfg[key], bool):
        raise ConfigError(f"model.{key}: expected true or false, got {cfg[key]!r}")
    return cfg[key]


def settings_of(cfg: dict) -> dict:
    """Validated constructor arguments from the resolved ``model`` section; ConfigError names the key."""
    mlp = _irreps(cfg, "mlp_irreps")
    if any(ir.l != 0 for _, ir in mlp) or mlp.dim == 0:
        raise ConfigError(f"model.mlp_irreps: '{cfg['mlp_irreps']}' must be scalars, e.g. 16x0e")
    radial = cfg["radial_mlp"]
    if not isinstance(radial, (list, tuple)) or not radial or not all(
            isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in radial):
        raise ConfigError(f"model.radial_mlp: expected a list of positive integers, got {radial!r}")
    return {
        "hidden_irreps": str(hidden_irreps_of(cfg)),
        "correlation": _positive_int(cfg, "correlation"),
        "num_interactions": _positive_int(cfg, "num_interactions"),
        "num_radial": _positive_int(cfg, "num_radial"),
        "max_ell": _positive_int(cfg, "max_ell"),
        "radial_mlp": list(radial),
        "mlp_irreps": str(mlp),
        "edge_noise": _flag(cfg, "edge_noise"),
        # model files written before the key existed: off, as they were trained
        "isolated_atom_limit": _flag(cfg, "isolated_atom_limit") if "isolated_atom_limit" in cfg else False,
        "species_shift": _flag(cfg, "species_shift") if "species_shift" in cfg else False,
    }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build e3nn/MACE constants (Clebsch-Gordan, U matrices) directly in the model's dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(cfg: dict, summary: DatasetSummary) -> MaceBackbone:
    """Build from the resolved ``model`` config section (cutoff = MACE's r_max, Angstrom)."""
    settings = settings_of(cfg)
    dtype = torch.float64 if cfg.get("dtype") == "float64" else torch.float32
    with _default_dtype(dtype), warnings.catch_warnings():
        # e3nn compiles its layers with TorchScript, which warns once per layer under torch 2.13
        warnings.filterwarnings("ignore", message=r"The TorchScript type system", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
        return MaceBackbone(summary, cutoff=float(cfg["cutoff"]), **settings)


# MACE's energy spreads: the widening with the feature distance fitted on the validation split (b >= 0,
# true), not PaiNN's fixed 0.2. Since MACE's weights train on the noise-free pass its energies are
# accurate in distribution and their calibrated spreads small; far out (3000 K ammonia, six seeds) the
# fitted widening takes the energy NLL from 0.24 to -1.81 (3.88 / 4.74 on two seeds to -1.09 / -1.61),
# in distribution unchanged; on silicon bulk / vacancies / surfaces 2.65 / 2.29 / 13.7 to 1.75 / 2.26 /
# 11.0 (docs/results/energy-split, "fitted energy widening"). A fixed 0.2 cost 0.1 nats in distribution.
register_backbone_defaults("mace", DEFAULTS, check=settings_of,  # checked when a config is resolved
                           uq={"energy_novelty_widening": True})
