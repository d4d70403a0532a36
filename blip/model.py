"""BayesianPotential: a backbone with BLIP noise (or a baseline's), energies and forces."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone, apply_strain, cell_volumes
from .bayes import InferenceNet, NoiseContext, NoiseState, wrap
from .bayes.density import GroupSplit
from .bayes.noise import positions_in_graph, row_keys
from .bayes.wrap import rate_slots

METHODS = ("blip", "deterministic", "mc_dropout", "ensemble")
RATE_INPUTS = ("hidden", "species")  # what the inference net sees beside the base features
#: uq.weight_noise -> noise kind: independent weight noise (local reparameterisation), or noise
#: shared by the outputs of each input channel (Gaussian dropout of the layer's input)
WEIGHT_NOISE = {"independent": "gaussian", "per_input": "gaussian_inputs"}
#: uq.noise_draws: a fixed-seed sample's random numbers shared by all rows of a structure (one perturbed
#: network per sample) or drawn for every row (node, edge) independently
NOISE_DRAWS = ("structure", "row")


class BayesianPotential(nn.Module):
    """One network: a backbone whose selected layers are noisy.

    method "blip": rates from the inference net, multiplicative Gaussian noise, KL to the prior.
    method "mc_dropout": fixed Bernoulli dropout rate ``dropout_p`` on the same layers.
    method "deterministic" (and ensemble members): no noise layers at all.
    """

    #: uq config keys this class reads (see blip/config.py for what they mean)
    SETTINGS = ("prior_p", "p_min", "p_max", "p_init", "inference_hidden", "dropout_p", "rate_inputs", "distance",
                "distance_mean_one", "distance_shrinkage", "distance_metric", "distance_offset", "distance_slope",
                "detach_rate_inputs", "weight_noise", "noise_draws")

    def __init__(self, backbone: Backbone, method: str = "blip", **uq):
        """``uq``: settings of the ``uq`` config section (``SETTINGS``); missing ones take the defaults.
        ``distance_metric: auto`` and ``weight_noise: auto`` need the training data (``blip.build``); here,
        without them, they are "euclidean" and "per_input"; ``distance_slope: auto`` (by backbone in
        ``blip.build``) is 1."""
        super().__init__()
        from .config import DEFAULTS

        unknown = set(uq) - set(self.SETTINGS)
        if unknown:
            raise ValueError(f"unknown uq setting(s) {', '.join(sorted(unknown))}")
        u = {k: DEFAULTS["uq"][k] for k in self.SETTINGS} | uq
        if u["distance_metric"] == "auto":
            u["distance_metric"] = "euclidean"
        if u["weight_noise"] == "auto":
            u["weight_noise"] = "per_input"
        if u["distance_slope"] == "auto":
            u["distance_slope"] = 1.0
        if method not in METHODS:
            raise ValueError(f"unknown uq.method {method!r}; choose from {', '.join(METHODS)}")
        if u["rate_inputs"] not in RATE_INPUTS:
            raise ValueError(f"unknown uq.rate_inputs {u['rate_inputs']!r}; choose from {', '.join(RATE_INPUTS)}")
        if u["weight_noise"] not in WEIGHT_NOISE:
            raise ValueError(f"unknown uq.weight_noise {u['weight_noise']!r}; choose from {', '.join(WEIGHT_NOISE)}")
        if u["noise_draws"] not in NOISE_DRAWS:
            raise ValueError(f"unknown uq.noise_draws {u['noise_draws']!r}; choose from {', '.join(NOISE_DRAWS)}")
        self.backbone, self.method = backbone, method
        self.noise_kind = WEIGHT_NOISE[u["weight_noise"]]
        self.shared_draws = method == "blip" and u["noise_draws"] == "structure"
        self.prior_p, self.dropout_p = float(u["prior_p"]), float(u["dropout_p"])
        self.noise_state = NoiseState()
        self.layers: dict[str, list[str]] = {}
        self.inference = None
        if method in ("blip", "mc_dropout"):
            self.layers = wrap(backbone, backbone.noisy_layers(), self.noise_state,
                               backbone.extra_noisy_factories())
        if method == "blip":
            layer_dims = {}  # domain -> {rate slot: width of its input features}
            for d, shared in rate_slots(backbone, self.layers).items():
                layer_dims[d] = {slot: backbone.get_submodule(self.layers[d][slot]).rate_features_dim
                                 for slot in sorted(set(shared.values()))}
            self.inference = InferenceNet(
                backbone.domain_feature_dims(), layer_dims, backbone.domain_group_counts(),
                int(u["inference_hidden"]), float(u["p_min"]), float(u["p_max"]), float(u["p_init"]),
                use_hidden=u["rate_inputs"] == "hidden", distance=bool(u["distance"]),
                detach=bool(u["detach_rate_inputs"]), distance_mean_one=bool(u["distance_mean_one"]),
                shrinkage=float(u["distance_shrinkage"]), metric=u["distance_metric"],
                offset=float(u["distance_offset"]), slope=float(u["distance_slope"]))

    @property
    def wants_novelty(self) -> bool:
        """Whether sampled passes can give each atom's feature distance (BLIP with feature-based rates
        and noise on the backbone's per-atom domain, ``Backbone.atom_domain``)."""
        return (self.method == "blip" and self.inference is not None and self.inference.wants_features
                and self.backbone.atom_domain in self.layers)

    @property
    def stochastic(self) -> bool:
        return self.method in ("blip", "mc_dropout")

    def _context(self, batch: dict, seed: int | None, update: bool, training: bool = False,
                 novelty: list | None = None) -> NoiseContext:
        """Noise context of one pass; ``seed``: reproducible counter-based draws (None: global RNG);
        ``update``: feature statistics follow this batch; ``training``: a training step (rate
        inputs may enter detached, ``uq.detach_rate_inputs``); ``novelty``: a list that collects the
        rows' log feature distances (:meth:`InferenceNet.rate`)."""
        feats = self.backbone.domain_features(batch)
        keys, row_structure = (None, None) if seed is None else self._noise_keys(batch, feats, seed, training)
        active = None
        if "noise_free" in batch:  # graphs of the noise-free pass sharing this one: no noise on their rows
            takes_noise = (~batch["noise_free"]).to(batch["positions"].dtype)
            active = {d: torch.repeat_interleave(takes_noise, c, output_size=f.shape[0])[:, None]  # no device sync
                      for d, (f, c) in feats.items()}
        if self.method == "blip":
            base = {d: f for d, (f, _) in feats.items()}
            groups = {}  # rows sorted by group once per domain, for all its layers' densities
            if self.inference.wants_features:
                n_groups = self.backbone.domain_group_counts()
                groups = {d: GroupSplit.of(g, n_groups.get(d, 1))
                          for d, g in self.backbone.domain_groups(batch).items()}
            inference = self.inference

            memo: list = []  # the last layer's rate inputs: a gated MLP's gate reuses its core's

            def provider(domain, slot, rows, features):
                return inference.rate(domain, slot, base[domain], features, groups.get(domain), update, training,
                                      memo=memo, novelty=novelty)

            return NoiseContext(provider, keys, self.noise_kind, wants_features=inference.wants_features, active=active,
                                row_structure=row_structure)
        p = self.dropout_p
        dtype = batch["positions"].dtype

        def fixed(domain, slot, rows, features):
            return torch.full((rows,), p, dtype=dtype, device=batch["positions"].device)

        return NoiseContext(fixed, keys, "bernoulli", active=active)

    def _noise_keys(self, batch: dict, feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    seed: int, training: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(domain -> counter keys, domain -> structure of every row or None).

        ``feats``: domain -> (features (rows, d), rows per graph (G,)) (``Backbone.domain_features``).
        Keys from (seed, replica, structure, row identity): one per row (rows,); with shared draws
        (``uq.noise_draws: structure``, sampling outside training steps) one per structure (G,),
        that of row identity 0, with each row's structure (rows,) so that its rows take the same
        numbers (:class:`NoiseContext`). Training steps draw per row: the local reparameterisation's
        gradients vary less, and trained so, the models' defects and far-out molecules scored better."""
        replica = batch.get("replica", torch.zeros_like(batch["structure_index"]))
        counts = {d: c for d, (_, c) in feats.items()}
        if self.shared_draws and not training:
            one = torch.ones_like(batch["structure_index"])
            keys = row_keys(seed, replica, batch["structure_index"], one, torch.zeros_like(one)[:, None])
            graph = torch.arange(one.shape[0], device=one.device)
            return ({d: keys for d in self.layers},
                    {d: torch.repeat_interleave(graph, counts[d], output_size=feats[d][0].shape[0])
                     for d in self.layers})
        ids = self.backbone.domain_row_ids(batch, self.layers)
        return {d: row_keys(seed, replica, batch["structure_index"], counts[d],
                            ids[d] if d in ids else positions_in_graph(counts[d])[:, None])
                for d in self.layers}, None

    def forward(self, batch: dict, sample: bool = False, seed: int | None = None,
                forces: bool = True, training: bool = False, stress: bool = False,
                novelty: bool = False) -> dict[str, torch.Tensor]:
        """Energies (G,) eV and forces (N, 3) eV/A of one pass; ``rates`` (the noise rates of every
        noisy layer, for the KL) when sampling BLIP.

        sample: draw noise (a Monte-Carlo sample); False gives the noise-free MAP pass. Graphs
        flagged in ``batch["noise_free"]`` (G,) bool take no noise in a sampled pass either: their
        outputs are those of the MAP pass (up to float rounding), at the cost of one more replica.
        seed: with ``batch["replica"]`` and ``batch["structure_index"]``, makes the noise of each
        (replica, structure) block reproducible; None draws from torch's global generator.
        training: a training step: keep the graph for a loss on the forces (create_graph), and
        let BLIP's feature statistics follow the batches (moving average).
        stress: also ``stress`` (G, 3, 3) eV/A^3, the derivative of the energy with respect to a
        symmetric strain of cell and positions over the cell volume (ASE's sign convention);
        rows of graphs without a periodic cell of non-zero volume are NaN.
        novelty: also ``novelty`` (N,), each atom's mean over the noisy per-atom layers of the log squared
        Mahalanobis distance of the layer's input features from the training statistics (a sampled
        BLIP pass whose rate heads see features; no gradient).
        """
        batch = self.backbone.prepare(dict(batch))
        positions = batch["positions"]
        if (forces or stress) and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
            batch["positions"] = positions
        strain = apply_strain(batch) if stress else None
        out: dict[str, torch.Tensor] = {}
        ctx = None
        distances: list | None = [] if novelty and self.wants_novelty else None
        if sample and self.stochastic:
            ctx = self._context(batch, seed, update=training, training=training, novelty=distances)
        with self.noise_state.use(ctx):
            energy = self.backbone.energy(batch)
        out["energy"] = energy
        node = [nu for domain, nu in distances or [] if domain == self.backbone.atom_domain]
        if node:
            out["novelty"] = torch.stack(node, dim=1).mean(dim=1)
        if ctx is not None and self.method == "blip":
            out["rates"] = dict(ctx.used)  # the KL is the caller's (training), not every sampled pass's
        wrt = ([positions] if forces else []) + ([strain] if stress else [])
        if wrt:
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=training)
            if forces:
                out["forces"] = -grads[0]
            if stress:
                out["stress"] = grads[-1] / cell_volumes(batch)[:, None, None]
        return out

    def rates(self, batch: dict, seed: int | None = None, transform=None) -> dict[tuple[str, int], torch.Tensor]:
        """Rates p (rows,) of every noisy layer in one sampled pass, without forces.

        The backbone runs without gradients; the rates keep theirs (into the inference net), so a
        loss on them (the noise-contrastive KL) trains the inference net only. Feature statistics
        are not updated. ``transform(batch) -> batch`` runs after the backbone's ``prepare``
        (e.g. perturbed positions on the original graph, see :mod:`blip.train.contrastive`).
        """
        batch = self.backbone.prepare(dict(batch))
        if transform is not None:
            batch = transform(batch)
        ctx = self._context(batch, seed, update=False)
        with torch.no_grad(), self.noise_state.use(ctx):
            self.backbone.energy(batch)
        return dict(ctx.used)

    @torch.no_grad()
    def fit_feature_statistics(self, batches, seed: int = 0) -> None:
        """Exact feature statistics of the inference net from sampled passes over ``batches``."""
        if self.inference is None or not self.inference.wants_features:
            return
        densities = self.inference.densities_list()
        for d in densities:
            d.begin_fit()
        try:
            for batch in batches:
                batch = self.backbone.prepare(dict(batch))
                ctx = self._context(batch, seed, update=True)
                with self.noise_state.use(ctx):
                    self.backbone.energy(batch)
        finally:
            for d in densities:
                d.end_fit()
