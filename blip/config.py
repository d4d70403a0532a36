"""Configuration: defaults, YAML loading, ``--set key=value`` overrides, validation."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import ConfigError

DEFAULTS: dict = {
    "data": {
        "train_file": None,
        "valid_file": None,
        "valid_fraction": 0.1,
        "calibration_file": None,     # structures for the recalibration (default: the validation split)
        "calibration_fraction": None,  # or hold out this fraction of train_file for it
        "test_files": {},
        "energy_key": "energy",
        "forces_key": "forces",
        "stress_key": "stress",       # stress labels (eV/A^3, ASE's convention) of periodic structures
        "e0s": "average",
        "max_train": None,
    },
    "model": {
        "backbone": "painn",
        "cutoff": 5.0,
        "pretrained": False,
        "dtype": "float32",
    },
    "uq": {
        "method": "blip",
        "samples": 16,               # K Monte-Carlo samples per prediction
        "networks": 1,               # blip / mc_dropout: networks trained from their own seeds, each calibrated,
                                     # predicted as their mixture (K split over them; blip.uq.mixture); 2: twice
                                     # the training, near out like a 3-member ensemble, far out like one
        "prior_p": 0.0003,           # dropout rate of the prior (KL target) on training data (0.001 before:
                                     # 3e-4 gives the rates more room below the contrastive prior's 0.5)
        "beta": 1.0,                 # weight of the KL
        "p_min": 1e-5,               # bounds of the predicted rates
        "p_max": 0.5,
        "p_init": 0.0003,            # rate of every row at the start of training
        "inference_hidden": 32,      # hidden width of each rate head
        "rate_inputs": "hidden",     # hidden: each MLP's own input features + species; species: base only
        "distance": True,            # rates rise with the distance of the features from the training ones
        "distance_metric": "auto",  # of that distance: euclidean (every direction alike, in units of the
                                    # mean feature variance), mahalanobis (the default before 2026-12-04),
                                    # both (each with its own slope), nearest (to the nearest of 512
                                    # stored training rows per species) or auto: nearest for PaiNN trained
                                    # on periodic crystals (better on two silicon sets, the same predict
                                    # time), euclidean otherwise (molecules: nearest
                                    # lost 0.3 nats on methanol for an ethanol model); euclidean before 2026-12-06
        "distance_mean_one": False,  # mahalanobis: divide it by its mean over the training rows (fine-tuning)
        "distance_shrinkage": 0.01,  # 0...1: the feature covariance shrunk towards its mean variance
        "distance_offset": 0.05,     # c > 0: rates grow like (c + distance)^slope, so a small c lets them
                                     # respond to distances below 1 (crystal defects); 1 before 2026-12-05
        "distance_slope": "auto",    # that slope at the start of training (learned; it stays near its
                                     # start); auto: 2 for PaiNN (silicon surfaces better on 5 of 6 seeds,
                                     # molecules a coin flip over 29 measured means), 1 for MACE (worse with 2 in
                                     # distribution on silicon, far out on ammonia) and CHGNet; 1 before 2026-12-06
        "detach_rate_inputs": True,  # training steps: features enter the rate heads detached
        "weight_noise": "auto",      # per_input: Gaussian dropout of layer inputs (noise shared over a
                                     # layer's outputs); independent: independent weight noise (local
                                     # reparameterisation; MACE: on its 0e -> 0e weights, the other irreps
                                     # per input); auto: independent for MACE trained on periodic structures
                                     # (silicon surfaces 0.5 nats better), per_input otherwise
                                     # (blip.build.weight_noise); per_input before 2026-12-06
        "noise_draws": "structure",  # a prediction sample's noise (BLIP): structure: the same draws for every
                                     # atom and edge of a structure, each scaled by its own rate (one perturbed
                                     # network; forces of symmetric atoms stay symmetric); row: independent per
                                     # row (how model files from before this key sample). Training steps
                                     # always draw per row
        "backbone_training": "auto",  # sampled: every step trains backbone and rates together on a sampled
                                     # pass (the paper's variational training); noise_free: the backbone's weights
                                     # train on the noise-free pass as the plain model's, the rate heads alone on a
                                     # sampled pass every `rate_every` steps (the noise then costs no accuracy;
                                     # training ~1.45x the plain model with rate_every 2); auto: noise_free for
                                     # MACE (its force error 1.15x -> 1.00x the plain model's, six ammonia seeds), sampled
                                     # otherwise (blip.build.backbone_training); sampled before 2026-12-08
        "rate_every": 2,             # backbone_training noise_free: one sampled step of the rate heads every N steps
        "predict_mean": "map",       # map: energies/forces of the noise-free pass; samples: sample mean
        "force_std": "auto",         # force spread per atom (its 3 components pooled) or per component; auto: recalibration picks
        "contrastive": {             # noise-contrastive prior on perturbed, unlabelled copies of batches
            "weight": 1.0,           # 0 switches it off
            "every": 2,              # one contrastive pass every N steps (weighted by N)
            "prior_p": 0.5,          # the rate their KL pulls towards
            "rattle": [0.05, 0.3],   # Gaussian displacement standard deviation, Angstrom (half of the copies)
            "strain": [0.1, 0.3],    # distances scaled by 1 + s or 1 / (1 + s) (the other half)
            "remove": "auto",        # [low, high]: a third of the copies lose this fraction of their atoms;
                                     # auto: [0.05, 0.3] for MACE trained on periodic structures (silicon
                                     # vacancies / surfaces 0.2 / 0.85 nats better), none otherwise
                                     # (blip.build.contrastive_removal); null before 2026-12-06
        },
        "dropout_p": 0.1,            # MC dropout baseline
        "ensemble_size": 5,
        "recalibrate": True,
        "novelty_widening": 0.1,     # b: recalibrated force spreads x exp(b (feature distance - its mean));
                                     # true: b fitted on the validation split; false: off
        "novelty_widening_fit": True,  # with a number b: fit b on the validation split too, b the floor
        "energy_novelty_widening": 0.2,  # the same for energy spreads, with each structure's largest distance
        "novelty_beyond": 0.2,       # b2: force spreads also x exp(b2 (distance - the largest on the validation
                                     # split)) beyond it, where no data set the widening; false: off
        "energy_novelty_beyond": 0.2,  # the same for energy spreads (largest distance per structure)
        "force_std_floor": 0.01,     # force spreads are sqrt((s sigma)^2 + f^2), f this fraction of the
                                     # validation split's force RMSE, in the recalibration's fit and after it:
                                     # components zero by symmetry (spread and error rounding noise) no longer
                                     # steer s and b; 0: none (before 2026-12-06)
        "structure_floor": "auto",   # force spreads also get, in quadrature, a floor c exp(b (m - m_0)) of each
                                     # structure, m the mean feature distance of its atoms (at most the validation
                                     # split's largest), c >= 0 and b >= 0 fitted on the validation split after the
                                     # factor (so it only widens): ranks whole structures as an ensemble does.
                                     # auto: on unless trained on periodic crystals (blip.build.uses_structure_floor:
                                     # molecules gain, crystals gain nothing or lose on surfaces); true before 2026-12-07 (later)
        "stress_std_floor": 0.0,     # the same for stress spreads (with stress labels on the validation split);
                                     # off: 0.01 gained nothing on a stress-labelled silicon set (0.01-0.03 nats
                                     # worse in distribution, docs/results/si-stress)
    },
    "training": {
        "epochs": 100,
        "batch_size": 8,
        "lr": 5e-3,
        "inference_lr": None,
        "weight_decay": 0.0,
        "scheduler": "cosine",
        "warmup_epochs": 0,
        "min_lr_ratio": 0.01,
        "loss": "mse",
        "energy_weight": 1.0,
        "forces_weight": 100.0,
        "stress_weight": 0.0,        # > 0: also fit stress labels (data.stress_key); MSE in (eV/A^3)^2, so ~1e3-1e4
        "ema_decay": 0.99,
        "patience": 30,
        "grad_clip": 10.0,
        "seed": 0,
        "max_minutes": None,
        "device": "cpu",
        "resume": False,
        "max_epochs": None,          # stop this run after so many epochs (schedule still spans `epochs`); --resume goes on
        "tensorboard": True,         # TensorBoard event files beside log.csv (off when tensorboard is not installed)
        "num_workers": 0,            # DataLoader worker processes building neighbour lists (0: in the main process)
    },
    "output_dir": "runs/blip",
}

# Defaults that replace those above when ``model.pretrained`` is true (fine-tuning): small noise
# that starts where the pretrained model is (p_init), small steps for the pretrained weights and
# larger ones for the new rate heads, and the Mahalanobis feature distance scaled to mean 1 on the
# training rows (pretrained features vary in few directions; the Euclidean distance scored 1 nat
# worse on held-out surfaces; the distance offset stays 1: 0.05 lost 0.03-0.05 nats on every
# silicon set there; the distance slope starts at 1: 2 lost 0.10-0.15 nats on vacancies on every
# seed), noise drawn per row (draws shared per structure lost 0.16 nats on vacancies and surface
# coverage 0.87 -> 0.83), no widening of the energy spreads (they lost 0.1-0.5 nats with it) and no
# floor per structure (3 seeds: in distribution 0.02 and vacancies 0.01 nats better, surfaces 0.02 worse,
# on two seeds by 0.03).
# Measured with ``blip bench finetune-si`` (docs/results/finetune-si). Keys a user sets win as usual.
FINETUNE_DEFAULTS = {
    "uq": {"prior_p": 0.01, "beta": 1e-3, "p_min": 1e-5, "p_max": 0.1, "p_init": 5e-5,
           "distance_mean_one": True, "distance_metric": "mahalanobis", "distance_offset": 1.0, "noise_draws": "row",
           "distance_slope": 1.0, "force_std": "component",
           "dropout_p": 0.05, "energy_novelty_widening": False, "structure_floor": False},
    "training": {"lr": 1e-4, "inference_lr": 1e-2},
}

# Backbone-specific keys allowed in the ``model`` section, with their defaults. Each module
# blip/backbones/NAME.py registers its own when imported (see ``backbone_defaults``).
BACKBONE_DEFAULTS: dict[str, dict] = {}


# Optional per-backbone check of the resolved ``model`` section (raises ConfigError).
BACKBONE_CHECKS: dict = {}

# Per-backbone defaults of ``uq`` keys that differ from DEFAULTS (measured per backbone).
BACKBONE_UQ_DEFAULTS: dict[str, dict] = {}


def register_backbone_defaults(name: str, defaults: dict, check=None, uq: dict | None = None) -> None:
    """Let a backbone module declare its ``model`` config keys (and optionally a check of their values
    and ``uq`` defaults of its own)."""
    BACKBONE_DEFAULTS[name] = dict(defaults)
    if check is not None:
        BACKBONE_CHECKS[name] = check
    if uq:
        BACKBONE_UQ_DEFAULTS[name] = dict(uq)


def merge_known(base: dict, update: dict, where: str, whole: tuple = ("test_files",)) -> dict:
    """Copy of ``base`` updated by ``update``; a key not in ``base`` is a ConfigError.

    Mappings are merged key by key, except those under a key in ``whole`` (replaced as a
    whole). ``where`` is the dotted prefix used in error messages, e.g. "active_learning.".
    """
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}'; known keys: {', '.join(sorted(base))}")
        if isinstance(base[key], dict) and key not in whole:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' must be a mapping")
            out[key] = merge_known(base[key], value, f"{where}{key}.", whole)
        else:
            out[key] = value
    return out


_merge = merge_known  # old private name


def parse_override(text: str) -> dict:
    """'a.b=value' -> {'a': {'b': value}}, with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def deep_update(base: dict, update: dict, whole: tuple = ("test_files",)) -> dict:
    """Update ``base`` in place by ``update``, merging nested mappings except under keys in ``whole``."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in whole:
            deep_update(base[key], value, whole)
        else:
            base[key] = value
    return base


_deep_update = deep_update  # old private name


def resolve(user: dict, overrides: list[str] = (), base_dir: Path | None = None) -> dict:
    """Merge defaults (with ``FINETUNE_DEFAULTS`` when ``model.pretrained`` is true), a user config
    and overrides; validate; make file paths absolute."""
    user = copy.deepcopy(user or {})
    for text in overrides:
        _deep_update(user, parse_override(text))
    model = user.get("model") or {}
    backbone = model.get("backbone", DEFAULTS["model"]["backbone"])
    types = default_config(backbone)  # inference_lr may be null also when fine-tuning
    defaults = default_config(backbone, pretrained=model.get("pretrained", types["model"]["pretrained"]) is True)
    cfg = _merge(defaults, user, "")
    _check_types(types, cfg, "")
    _validate(cfg)
    if backbone in BACKBONE_CHECKS:
        BACKBONE_CHECKS[backbone](cfg["model"])
    if base_dir is not None:
        _absolute_paths(cfg, Path(base_dir))
    return cfg


def default_config(backbone: str, pretrained: bool = False) -> dict:
    """The defaults a config of ``backbone`` starts from: DEFAULTS, the backbone's ``model`` keys and
    ``uq`` defaults, and ``FINETUNE_DEFAULTS`` when ``pretrained``."""
    defaults = copy.deepcopy(DEFAULTS)
    defaults["model"].update(backbone_defaults(backbone))
    defaults["uq"].update(BACKBONE_UQ_DEFAULTS.get(backbone, {}))
    if pretrained:
        deep_update(defaults, copy.deepcopy(FINETUNE_DEFAULTS))
    return defaults


def available_backbones() -> list[str]:
    """Names of the modules in blip/backbones/ that are backbones (all but ``base``)."""
    import pkgutil

    from . import backbones

    return sorted(m.name for m in pkgutil.iter_modules(backbones.__path__) if m.name != "base")


def backbone_defaults(name: str) -> dict:
    """The ``model`` keys of backbone ``name``, importing blip/backbones/NAME.py to register them."""
    if name not in BACKBONE_DEFAULTS:
        if name not in available_backbones():
            raise ConfigError(f"unknown model.backbone '{name}'; choose from {', '.join(available_backbones())}")
        import importlib

        importlib.import_module(f"blip.backbones.{name}")
    return BACKBONE_DEFAULTS[name]


#: Keys that take true, false or a number.
_BOOL_OR_NUMBER = {"uq.novelty_widening", "uq.energy_novelty_widening", "uq.novelty_beyond",
                   "uq.energy_novelty_beyond"}


def _number_in_words(text: str, name: str) -> float:
    """A number YAML 1.1 reads as a string (``1e-4``, without a dot) -> float; else ConfigError."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {text!r}") from None


def _check_types(defaults: dict, cfg: dict, where: str) -> None:
    """Every value whose default is a bool, an integer or a number must be one (ConfigError); a number
    YAML 1.1 reads as a string (``1e-4``) becomes a float."""
    for key, default in defaults.items():
        value, name = cfg.get(key), f"{where}{key}"
        if isinstance(value, str) and (isinstance(default, float) or name in _BOOL_OR_NUMBER):
            value = cfg[key] = _number_in_words(value, name)
        if isinstance(default, dict) and isinstance(value, dict):
            _check_types(default, value, f"{name}.")
        elif name in _BOOL_OR_NUMBER:
            if not isinstance(value, (bool, int, float)):
                raise ConfigError(f"{name} must be true, false or a number, got {value!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")


#: key -> (lowest, highest, whether the bounds themselves are allowed); None values pass
_RANGES = {
    ("training", "lr"): (0.0, None, False), ("training", "inference_lr"): (0.0, None, False),
    ("training", "epochs"): (0, None, True), ("training", "batch_size"): (1, None, True),
    ("training", "patience"): (1, None, True), ("training", "warmup_epochs"): (0, None, True),
    ("training", "weight_decay"): (0.0, None, True), ("training", "grad_clip"): (0.0, None, False),
    ("training", "ema_decay"): (0.0, 1.0, True), ("training", "min_lr_ratio"): (0.0, 1.0, True),
    ("training", "energy_weight"): (0.0, None, True), ("training", "forces_weight"): (0.0, None, True),
    ("training", "stress_weight"): (0.0, None, True),
    ("training", "max_minutes"): (0.0, None, False),
    ("training", "max_epochs"): (1, None, True), ("training", "num_workers"): (0, None, True), ("uq", "samples"): (1, None, True),
    ("uq", "ensemble_size"): (1, None, True), ("uq", "networks"): (1, None, True), ("uq", "beta"): (0.0, None, True),
    ("uq", "inference_hidden"): (1, None, True), ("uq", "dropout_p"): (0.0, 1.0, False),
    ("uq", "prior_p"): (0.0, 1.0, False), ("uq", "p_min"): (0.0, 1.0, False), ("uq", "p_max"): (0.0, 1.0, False),
    ("uq", "p_init"): (0.0, 1.0, False), ("uq", "distance_shrinkage"): (0.0, 1.0, True),
    ("uq", "distance_offset"): (0.0, None, False), ("uq", "force_std_floor"): (0.0, None, True),
    ("uq", "stress_std_floor"): (0.0, None, True), ("uq", "rate_every"): (1, None, True),
    ("model", "cutoff"): (0.0, None, False),
    ("data", "valid_fraction"): (0.0, 1.0, True), ("data", "calibration_fraction"): (0.0, 1.0, False),
}


def _check_ranges(cfg: dict) -> None:
    for (section, key), (low, high, closed) in _RANGES.items():
        value = cfg[section].get(key)
        if value is None:
            continue
        below = value < low if closed else value <= low
        above = high is not None and (value > high if closed else value >= high)
        if below or above:
            bounds = f"{'[' if closed else '('}{low}, {high if high is not None else 'inf'}{']' if closed and high is not None else ')'}"
            raise ConfigError(f"{section}.{key} must be in {bounds}, got {value!r}")
    uq = cfg["uq"]
    for key in ("novelty_widening", "energy_novelty_widening"):
        widening = uq.get(key)
        if not isinstance(widening, bool) and widening is not None and not 0.0 <= widening <= 5.0:
            raise ConfigError(f"uq.{key} must be true, false or a number in [0, 5], got {widening!r}")
    for key in ("novelty_beyond", "energy_novelty_beyond"):
        beyond = uq.get(key)
        if beyond is True or (beyond is not None and beyond is not False and not 0.0 <= beyond <= 5.0):
            raise ConfigError(f"uq.{key} must be false or a number in [0, 5], got {beyond!r}")
    slope = uq.get("distance_slope")
    if slope != "auto" and (isinstance(slope, bool) or not isinstance(slope, (int, float)) or not slope > 0.0):
        raise ConfigError(f"uq.distance_slope must be a number > 0 or auto, got {slope!r}")
    if not uq["p_min"] <= uq["p_init"] <= uq["p_max"]:
        raise ConfigError(f"uq: need p_min <= p_init <= p_max, got {uq['p_min']}, {uq['p_init']}, {uq['p_max']}")


def _validate(cfg: dict) -> None:
    stop = cfg["training"]["max_epochs"]
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int)):
        raise ConfigError(f"training.max_epochs must be an integer or null, got {stop!r}")
    _check_ranges(cfg)
    from .model import METHODS

    if cfg["uq"]["method"] not in METHODS:
        raise ConfigError(f"uq.method '{cfg['uq']['method']}' is not one of {', '.join(METHODS)}")
    from .model import NOISE_DRAWS, RATE_INPUTS, WEIGHT_NOISE
    from .predictor import FORCE_STD

    uq = cfg["uq"]
    if uq["networks"] != 1 and uq["method"] not in ("blip", "mc_dropout"):
        raise ConfigError(f"uq.networks is for blip and mc_dropout (sampled networks), not '{uq['method']}'"
                          + ("; an ensemble's size is uq.ensemble_size" if uq["method"] == "ensemble" else ""))
    if uq["weight_noise"] not in (*WEIGHT_NOISE, "auto"):
        raise ConfigError(f"uq.weight_noise '{uq['weight_noise']}' is not one of {', '.join(WEIGHT_NOISE)} or auto")
    if uq["structure_floor"] not in (True, False, "auto"):
        raise ConfigError(f"uq.structure_floor must be true, false or auto, got {uq['structure_floor']!r}")
    if uq["noise_draws"] not in NOISE_DRAWS:
        raise ConfigError(f"uq.noise_draws '{uq['noise_draws']}' is not one of {', '.join(NOISE_DRAWS)}")
    if uq["backbone_training"] not in ("sampled", "noise_free", "auto"):
        raise ConfigError(f"uq.backbone_training must be sampled, noise_free or auto, got {uq['backbone_training']!r}")
    if uq["predict_mean"] not in ("map", "samples"):
        raise ConfigError("uq.predict_mean must be 'map' (noise-free pass) or 'samples' (mean of the samples)")
    if uq["force_std"] not in FORCE_STD:
        raise ConfigError(f"uq.force_std must be one of {', '.join(FORCE_STD)}, got {uq['force_std']!r}")
    from .bayes.inference import METRICS

    if uq["distance_metric"] not in METRICS + ("auto",):
        raise ConfigError(f"uq.distance_metric must be one of {', '.join(METRICS)} or auto, got {uq['distance_metric']!r}")
    if uq["rate_inputs"] not in RATE_INPUTS:
        raise ConfigError(f"uq.rate_inputs '{uq['rate_inputs']}' is not one of {', '.join(RATE_INPUTS)}")
    ncp = uq["contrastive"]
    if not 0.0 < float(ncp["prior_p"]) < 1.0 or float(ncp["weight"]) < 0 or int(ncp["every"]) < 1:
        raise ConfigError("uq.contrastive: need 0 < prior_p < 1, weight >= 0 and every >= 1")
    for key in ("rattle", "strain"):
        span = ncp[key]
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and 0 <= float(span[0]) <= float(span[1])):
            raise ConfigError(f"uq.contrastive.{key}: expected [low, high] with 0 <= low <= high, got {span!r}")
    span = ncp["remove"]
    if span not in (None, "auto") and not (isinstance(span, (list, tuple)) and len(span) == 2
                                           and 0 <= float(span[0]) <= float(span[1]) <= 1):
        raise ConfigError(f"uq.contrastive.remove: expected null, auto or [low, high] with 0 <= low <= high <= 1 "
                          f"(fractions of the atoms), got {span!r}")
    if cfg["model"]["dtype"] not in ("float32", "float64"):
        raise ConfigError("model.dtype must be float32 or float64")
    if cfg["training"]["loss"] not in ("mse", "l1", "huber"):
        raise ConfigError("training.loss must be mse, l1 or huber")
    if cfg["training"]["scheduler"] not in ("cosine", "constant"):
        raise ConfigError(f"training.scheduler must be cosine or constant, got {cfg['training']['scheduler']!r}")
    if cfg["model"]["pretrained"] and cfg["model"]["backbone"] != "chgnet":
        raise ConfigError(f"model.pretrained: no pretrained weights ship for backbone "
                          f"'{cfg['model']['backbone']}' (only chgnet); set pretrained: false")
    if cfg["data"]["calibration_file"] and cfg["data"]["calibration_fraction"]:
        raise ConfigError("give data.calibration_file or data.calibration_fraction, not both")
    if not isinstance(cfg["data"]["test_files"], dict):
        raise ConfigError("data.test_files must be a mapping name: path")


def networks_of(cfg: dict) -> int:
    """How many networks ``cfg`` trains: ``uq.ensemble_size`` for an ensemble, ``uq.networks`` for the
    sampled methods (blip, mc_dropout), one for the deterministic model."""
    uq = cfg["uq"]
    if uq["method"] == "ensemble":
        return int(uq["ensemble_size"])
    return int(uq.get("networks", 1)) if uq["method"] in ("blip", "mc_dropout") else 1


def _absolute_paths(cfg: dict, base: Path) -> None:
    def fix(p):
        if p is None or p == "average" or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    data = cfg["data"]
    for key in ("train_file", "valid_file", "calibration_file", "e0s"):
        data[key] = fix(data[key])
    data["test_files"] = {k: fix(v) for k, v in data["test_files"].items()}


def load(path: str | Path, overrides: list[str] = ()) -> dict:
    """Read a YAML config file and resolve it.

    Data paths are relative to the config file; ``output_dir`` to the working directory.
    """
    path = Path(path)
    return resolve(read_mapping(path), overrides, base_dir=path.parent)


def read_mapping(path: str | Path) -> dict:
    """The YAML mapping in a config file (empty file -> {}); ConfigError if missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return user


def dump(cfg: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
