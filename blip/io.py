"""Model files: atomic save, validated load."""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from ._files import atomic_open
from .backbones.base import DatasetSummary
from .errors import CheckpointError

FORMAT = "blip-model"
FORMAT_VERSION = 2  # 2: noise rates from hidden features (inference heads per layer, feature statistics)


def atomic_torch_save(obj, path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    with atomic_open(path, mode="wb") as handle:
        torch.save(obj, handle)


def model_payload(model) -> dict:
    """Serialisable dict of a :class:`blip.predictor.BlipModel`."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "blip_version": __version__,
        "config": model.config,
        "summary": model.summary.to_dict(),
        "states": [{k: v.detach().cpu() for k, v in m.state_dict().items()} for m in model.members],
        "calibration": dict(model.calibration),
        "info": dict(model.info),
        "fitted_force_std": model.fitted_force_std,
    }


def save_model(model, path: str | Path) -> None:
    atomic_torch_save(model_payload(model), path)


def read_payload(path: str | Path) -> dict:
    """Load and check a model file; CheckpointError with the file name if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: corrupt or unreadable model file ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a BLIP model file (foreign checkpoint?)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer BLIP (format {payload['format_version']})")
    if payload.get("format_version", 0) < FORMAT_VERSION:
        if payload["config"]["uq"]["method"] == "blip":
            raise CheckpointError(f"{path}: a BLIP model written by BLIP {payload.get('blip_version', '0.1')} "
                                  f"(format {payload.get('format_version')}), whose inference net this version "
                                  "no longer builds; retrain it with this version")
    payload["config"] = _with_new_keys(payload["config"])  # keys added since the file was written: defaults
    return payload


#: (section, key) -> the value files written before the key existed were trained (and recalibrated)
#: with, where that differs from today's default
VALUES_BEFORE_KEY = {("uq", "distance_metric"): "mahalanobis", ("uq", "distance_offset"): 1.0,
                     ("uq", "noise_draws"): "row", ("uq", "force_std_floor"): 0.0,
                     ("uq", "weight_noise"): "per_input", ("uq", "distance_slope"): 1.0,
                     ("uq", "structure_floor"): False, ("model", "species_shift"): False}


def _with_new_keys(cfg: dict) -> dict:
    """An older file's config with the keys added since filled in: the value it was trained with
    (``VALUES_BEFORE_KEY``), else today's default for its backbone (fine-tuned: the fine-tuning one)."""
    from .config import DEFAULTS, deep_update, default_config

    model = cfg.get("model", {})
    merged = default_config(model.get("backbone", DEFAULTS["model"]["backbone"]), model.get("pretrained") is True)
    merged["model"].update(model)
    for (section, key), value in VALUES_BEFORE_KEY.items():
        if key not in cfg.get(section, {}) and key in merged[section]:  # not every backbone has every key
            merged[section][key] = value
    return deep_update(merged, cfg)


def load(path: str | Path, device: str = "cpu"):
    """Load a model file written by ``blip train`` or ``blip calibrate`` -> BlipModel."""
    from .build import build_potential
    from .predictor import BlipModel

    payload = read_payload(path)
    config = payload["config"]
    summary = DatasetSummary.from_dict(payload["summary"])
    members = []
    for state in payload["states"]:
        potential = build_potential(config, summary)
        try:
            potential.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0][:160]
            raise CheckpointError(f"{path}: weights do not fit the model in its config ({first})") from None
        members.append(potential)
    model = BlipModel(members, config, summary, payload.get("calibration"), payload.get("info"),
                      payload.get("fitted_force_std"))
    return model.to(device)
