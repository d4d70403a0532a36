"""Build backbones and potentials from a resolved config."""

from __future__ import annotations

import importlib

import torch

from .backbones.base import Backbone, DatasetSummary
from .errors import ConfigError
from .model import BayesianPotential


def build_backbone(model_cfg: dict, summary: DatasetSummary) -> Backbone:
    """Backbone named by ``model.backbone``; its module provides ``build(cfg, summary)``."""
    name = model_cfg["backbone"]
    try:
        module = importlib.import_module(f"blip.backbones.{name}")
    except ModuleNotFoundError as exc:
        raise ConfigError(f"backbone '{name}' is not available ({exc})") from None
    return module.build(model_cfg, summary)


def distance_metric(cfg: dict, summary: DatasetSummary) -> str:
    """``uq.distance_metric`` with "auto" resolved from the training data: "nearest" for PaiNN trained
    on periodic crystals (``summary.periodic``), else "euclidean". A model file keeps "auto" and
    its summary, so loading it resolves the same way."""
    metric = cfg["uq"]["distance_metric"]
    if metric != "auto":
        return metric
    return "nearest" if summary.periodic and cfg["model"]["backbone"] == "painn" else "euclidean"


#: ``uq.contrastive.remove: auto`` for MACE trained on periodic structures: on held-out silicon
#: vacancies and surfaces the force NLL gained 0.15-0.24 and 0.27-1.52 nats on each of 3 seeds; on
#: a molecule (ammonia, 3000 K half) it lost 0.03-0.30, so molecules keep none (docs/results/si-defects)
MACE_CRYSTAL_REMOVAL = (0.05, 0.3)


def contrastive_removal(cfg: dict, summary: DatasetSummary) -> tuple[float, float] | None:
    """``uq.contrastive.remove`` as (low, high) or None, with "auto" resolved from the training data:
    ``MACE_CRYSTAL_REMOVAL`` for MACE trained on periodic structures (``summary.periodic``), else none."""
    span = cfg["uq"]["contrastive"]["remove"]
    if span == "auto":
        return MACE_CRYSTAL_REMOVAL if _mace_on_crystals(cfg, summary) else None
    return None if span is None else (float(span[0]), float(span[1]))


def weight_noise(cfg: dict, summary: DatasetSummary) -> str:
    """``uq.weight_noise`` with "auto" resolved from the training data: "independent" for MACE trained on
    periodic structures (``summary.periodic``: its 0e -> 0e weights then take independent noise), else
    "per_input". On held-out silicon surfaces the force NLL gained 0.15-1.09 nats on each of 6 seeds;
    on a molecule (ammonia, 3000 K half) it lost 0.00-0.15, so molecules keep "per_input"
    (docs/results/si-defects)."""
    kind = cfg["uq"]["weight_noise"]
    if kind != "auto":
        return kind
    return "independent" if _mace_on_crystals(cfg, summary) else "per_input"


def uses_structure_floor(cfg: dict, summary: DatasetSummary) -> bool:
    """``uq.structure_floor`` with "auto" resolved from the training data: on unless the model was trained
    on periodic crystals (``summary.periodic``). On molecules the floor gained in distribution on 37 of 39
    seed figures (docs/results/energy-split); on crystals, whose validation cells are bulk, it fitted
    nothing (PaiNN, 6 seeds) or traded surfaces for the bulk (MACE: surfaces worse on both seeds with a
    floor, by 0.02-0.09 nats; fine-tuned CHGNet: worse on 2 of 3; docs/results/si-defects)."""
    setting = cfg["uq"].get("structure_floor", False)
    return (not summary.periodic) if setting == "auto" else bool(setting)


#: ``uq.distance_slope: auto`` by backbone: PaiNN's rate heads start twice as steep in the feature
#: distance (silicon surfaces better on 5 of 6 seeds, equal on the sixth; molecules a coin flip,
#: 15 of 29 means better, docs/results/energy-split); MACE keeps 1 (with 2: worse in distribution on 2 of 2 silicon seeds, ammonia far
#: out 0.05 nats worse over 3), CHGNet 1 (fine-tuned with 2: silicon vacancies worse on 3 of 3
#: seeds, docs/results/finetune-si) (docs/results/si-defects)
AUTO_DISTANCE_SLOPE = {"painn": 2.0}


def distance_slope(cfg: dict) -> float:
    """``uq.distance_slope`` with "auto" resolved by backbone (``AUTO_DISTANCE_SLOPE``, else 1)."""
    slope = cfg["uq"]["distance_slope"]
    if slope != "auto":
        return float(slope)
    return AUTO_DISTANCE_SLOPE.get(cfg["model"]["backbone"], 1.0)


#: ``uq.backbone_training: auto`` by backbone: MACE trains its weights on the noise-free pass (as the
#: plain model) and its rates on a sampled pass every ``uq.rate_every`` steps. On ammonia (6 seeds)
#: BLIP-MACE's force error in distribution went from 1.15x the plain MACE's to 1.00x, its force NLL
#: from -3.51 to -3.60 in distribution and -0.27 to -0.17 at 3000 K (energies there worse on 2 of 6
#: seeds); on silicon (3 seeds) better on every set (docs/results/energy-split, si-defects). PaiNN
#: and CHGNet keep the sampled (joint) training: PaiNN lost on every set with the split; CHGNet
#: fine-tuning with it was level in distribution and on vacancies and 0.06 nats worse on surfaces
#: (3 seeds, docs/results/finetune-si).
AUTO_BACKBONE_TRAINING = {"mace": "noise_free"}


def backbone_training(cfg: dict) -> str:
    """``uq.backbone_training`` with "auto" resolved by backbone (``AUTO_BACKBONE_TRAINING``, else "sampled")."""
    kind = cfg["uq"]["backbone_training"]
    if kind != "auto":
        return kind
    return AUTO_BACKBONE_TRAINING.get(cfg["model"]["backbone"], "sampled")


def _mace_on_crystals(cfg: dict, summary: DatasetSummary) -> bool:
    """Whether the model is a MACE trained on periodic structures only (the crystal defaults' case)."""
    return summary.periodic and cfg["model"]["backbone"] == "mace"


def auto_settings(cfg: dict, summary: DatasetSummary) -> dict[str, str]:
    """The uq settings left at "auto" in ``cfg`` -> what they resolve to for this training data (text)."""
    uq = cfg["uq"]
    removal = contrastive_removal(cfg, summary)
    resolved = {"distance_metric": (uq["distance_metric"], distance_metric(cfg, summary)),
                "weight_noise": (uq["weight_noise"], weight_noise(cfg, summary)),
                "distance_slope": (uq["distance_slope"], f"{distance_slope(cfg):g}"),
                "backbone_training": (uq["backbone_training"], backbone_training(cfg)),
                "contrastive.remove": (uq["contrastive"]["remove"], "none" if removal is None else str(list(removal))),
                "structure_floor": (uq.get("structure_floor"), "on" if uses_structure_floor(cfg, summary) else "off")}
    return {key: value for key, (given, value) in resolved.items() if given == "auto"}


def build_potential(cfg: dict, summary: DatasetSummary) -> BayesianPotential:
    """One network for ``cfg["uq"]["method"]`` (an ensemble member for "ensemble")."""
    uq = dict(cfg["uq"], distance_metric=distance_metric(cfg, summary), weight_noise=weight_noise(cfg, summary),
              distance_slope=distance_slope(cfg))
    method = "deterministic" if uq["method"] == "ensemble" else uq["method"]
    potential = BayesianPotential(build_backbone(cfg["model"], summary), method=method,
                                  **{k: uq[k] for k in BayesianPotential.SETTINGS})
    return potential.to(dtype_of(cfg))


def dtype_of(cfg: dict) -> torch.dtype:
    return torch.float64 if cfg["model"]["dtype"] == "float64" else torch.float32
