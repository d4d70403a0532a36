"""Active-learning settings: defaults of the ``active_learning`` section, loading and checks."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from .. import config as config_mod
from ..errors import ConfigError
from .selection import SCORES

AL_DEFAULTS: dict = {
    "initial_file": None,  # starting structures (labelled unless the oracle is a calculator)
    "initial_size": 25,  # null = the whole file
    "initial_pick": "random",  # random | first
    "pool_file": None,  # candidate structures; those of initial_file are excluded if it is the same file
    "pool_size": None,  # cap on the pool (a random subset)
    "pool_md": None,  # mapping (POOL_MD_DEFAULTS): add MD frames of the round-0 model to the pool
    "oracle": "pool",  # pool (hidden labels of pool_file) | tblite (GFN2-xTB reference calculator)
    "tblite": {},  # settings of the tblite oracle (method, accuracy, electronic_temperature, ...)
    "rounds": 5,  # selection rounds after round 0
    "n_select": 25,  # structures labelled per round and strategy
    "strategies": ["uncertainty", "random"],  # STRATEGIES
    "score": "max_force_std",  # SCORES
    "diversity": "weighted",  # weighted (sigma x distance to the known) | greedy | fps | none
    "diversity_space": "features",  # features (the model's own) | pairs (pair-distance histograms)
    # greedy: a candidate within this fraction of the labelled set's median nearest-neighbour
    # descriptor distance of one already picked in the batch is passed over (exact duplicates always)
    "diversity_threshold": 0.5,
    "diversity_candidates": 10,  # greedy/fps: consider the top (this x n_select) scored structures
    "samples": 16,  # Monte-Carlo samples K for scoring and test metrics
    "ensemble_size": 5,  # strategy "ensemble": members of the selector ensemble
    "warm_start": False,  # fine-tune the previous round's model instead of training from scratch
    "warm_start_epochs": None,  # epochs of a warm-started round (null = training.epochs)
    "fine_tune": False,  # old name of warm_start
    "stop_max_force_std": None,  # eV/A: stop when the pool's largest calibrated force sigma is below
    "seed": 0,
}
POOL_MD_DEFAULTS: dict = {"temperature": 600.0, "steps": 200, "every": 10, "timestep": 0.5,
                          "friction": 0.01, "starts": 4}
STRATEGIES = ("uncertainty", "random", "fps", "ensemble")
#: uncertainty: the round's model's sigma (score) + batch diversity; random: uniform;
#: fps: farthest-point sampling in the round's model's feature space (no sigma);
#: ensemble: sigma of a deep ensemble (ensemble_size members) trained on the same labels as the
#: selector; its curve is that of the round's main model trained on the ensemble-picked labels.


@dataclass
class ALConfig:
    """Resolved active-learning settings (``al``) and the training config of every round."""

    al: dict
    training: dict
    output_dir: Path


def load_config(path, overrides=()) -> ALConfig:
    path = Path(path)
    return resolve_config(config_mod.read_mapping(path), path.parent, overrides)


def resolve_config(user: dict, base_dir, overrides=()) -> ALConfig:
    """Validate the ``active_learning`` section (unknown keys are errors) and the training part."""
    user = copy.deepcopy(user)
    for text in overrides:
        config_mod.deep_update(user, config_mod.parse_override(text), whole=())
    base_dir = Path(base_dir)
    if "active_learning" not in user or not isinstance(user["active_learning"], dict):
        raise ConfigError("config needs a mapping 'active_learning' (see examples/active/acac.yaml)")
    al = config_mod.merge_known(AL_DEFAULTS, user.pop("active_learning"), "active_learning.", whole=("tblite",))
    if al["pool_md"] is not None:
        if not isinstance(al["pool_md"], dict):
            raise ConfigError("active_learning.pool_md must be a mapping (or null)")
        al["pool_md"] = config_mod.merge_known(POOL_MD_DEFAULTS, al["pool_md"], "active_learning.pool_md.")
    _check_al(al)
    al["warm_start"] = bool(al["warm_start"] or al.pop("fine_tune"))
    for key in ("initial_file", "pool_file"):
        if al[key] is not None:
            al[key] = str((base_dir / al[key]).resolve())
    data = user.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError("config key 'data' must be a mapping")
    if data.get("train_file"):
        raise ConfigError("data.train_file is set by active learning each round; "
                          "give the starting structures as active_learning.initial_file")
    data["train_file"] = "labelled.xyz"  # placeholder, replaced every round
    user.setdefault("output_dir", "runs/active")
    training = config_mod.resolve(user, base_dir=base_dir)
    if not training["data"]["test_files"]:
        raise ConfigError("data.test_files must name at least one test set (learning curves are measured on it)")
    if "uncertainty" in al["strategies"] and training["uq"]["method"] == "deterministic":
        raise ConfigError("strategy 'uncertainty' needs a model with uncertainty (uq.method blip, "
                          "mc_dropout or ensemble), not 'deterministic'")
    if al["oracle"] == "tblite":
        from ..oracle import tblite_oracle

        tblite_oracle(al["tblite"])  # validates the settings early
    return ALConfig(al=al, training=training, output_dir=Path(training["output_dir"]))


def _check_al(al: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(f"active_learning.{msg}")

    need(al["initial_file"], "initial_file is required")
    need(al["oracle"] in ("pool", "tblite"), "oracle must be 'pool' or 'tblite'")
    if al["oracle"] == "pool":
        need(al["pool_file"], "pool_file is required with oracle 'pool'")
        need(al["pool_md"] is None, "pool_md needs a reference calculator (oracle 'tblite'), not 'pool'")
    else:
        need(al["pool_file"] or al["pool_md"], "give pool_file and/or pool_md")
    for key in ("rounds", "n_select", "samples", "diversity_candidates", "seed", "ensemble_size"):
        need(isinstance(al[key], int) and not isinstance(al[key], bool), f"{key} must be an integer")
    need(al["rounds"] >= 0, "rounds must be >= 0")
    need(al["n_select"] >= 1, "n_select must be >= 1")
    need(al["samples"] >= 1, "samples must be >= 1")
    need(al["diversity_candidates"] >= 1, "diversity_candidates must be >= 1")
    need(al["initial_size"] is None or (isinstance(al["initial_size"], int) and al["initial_size"] >= 2),
         "initial_size must be an integer >= 2 (or null for the whole file)")
    need(al["pool_size"] is None or (isinstance(al["pool_size"], int) and al["pool_size"] >= 1),
         "pool_size must be a positive integer or null")
    need(al["initial_pick"] in ("random", "first"), "initial_pick must be random or first")
    need(al["score"] in SCORES, f"score must be one of {', '.join(SCORES)}")
    need(al["diversity"] in ("greedy", "weighted", "fps", "none"), "diversity must be greedy, weighted, fps or none")
    need(isinstance(al["diversity_threshold"], (int, float)) and al["diversity_threshold"] >= 0,
         "diversity_threshold must be a number >= 0")
    need(isinstance(al["strategies"], list) and al["strategies"]
         and set(al["strategies"]) <= set(STRATEGIES) and len(set(al["strategies"])) == len(al["strategies"]),
         f"strategies must be a list of distinct names from {', '.join(STRATEGIES)}")
    need(isinstance(al["fine_tune"], bool), "fine_tune must be true or false")
    need(isinstance(al["warm_start"], bool), "warm_start must be true or false")
    need(al["warm_start_epochs"] is None or (isinstance(al["warm_start_epochs"], int)
                                             and not isinstance(al["warm_start_epochs"], bool)
                                             and al["warm_start_epochs"] >= 0),
         "warm_start_epochs must be an integer >= 0 or null")
    need(al["ensemble_size"] >= 2, "ensemble_size must be >= 2")
    need(al["diversity_space"] in ("features", "pairs"), "diversity_space must be features or pairs")
    stop = al["stop_max_force_std"]
    need(stop is None or (isinstance(stop, (int, float)) and not isinstance(stop, bool) and stop > 0),
         "stop_max_force_std must be a positive number (eV/A) or null")
    need(isinstance(al["tblite"], dict), "tblite must be a mapping")
    md = al["pool_md"]
    if md is not None:
        need(md["steps"] >= 1 and md["every"] >= 1 and md["starts"] >= 1, "pool_md steps, every, starts must be >= 1")
