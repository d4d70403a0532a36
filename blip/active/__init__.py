"""``blip active-learn CONFIG.yaml``: uncertainty-driven active learning with a random control.

Each round, for each strategy: train on the labelled set (or, with ``warm_start``, fine-tune
the previous round's model) -> test metrics -> score the remaining pool -> stop if its
largest calibrated force sigma is below ``stop_max_force_std`` -> pick ``n_select`` -> label
-> add. Strategy "uncertainty" ranks the pool by a score of the predicted uncertainty with a
batch-diversity rule (greedy on the score, skipping candidates within a data-driven radius
of one already picked, in the model's feature space); "random" picks uniformly with the same
budget; "fps" is farthest-point sampling in the model's feature space (no uncertainty);
"ensemble" uses a deep ensemble trained on the same labels as the selector. Round 0 (the
initial set) is shared by all strategies.

The config file holds a normal ``blip train`` config (data/model/uq/training/output_dir;
``data.train_file`` is set by the loop) plus a section ``active_learning`` (see AL_DEFAULTS).
Paths in the file are relative to it; ``output_dir`` is relative to the working directory.

Output (OUT = output_dir):
    OUT/round_000/labelled.xyz              the initial labelled set (shared)
    OUT/<strategy>/round_NNN/labelled.xyz   labelled set of a round (written atomically)
    OUT/.../train/model.pt                  the round's model;  OUT/.../metrics.json its test rows
    OUT/.../selector/model.pt               strategy "ensemble": the selector ensemble of the round
    OUT/<strategy>/pool_NNN.json            the pool scan of round NNN (largest force sigma, stopped)
    OUT/learning_curve.csv, OUT/learning_curve.png
A killed run restarted with the same command resumes after its last completed round.

Modules: config (settings and their checks), selection (scores and diversity rankings),
loop (the rounds), output (CSV, plot, table).
"""

from __future__ import annotations

import sys

from .config import AL_DEFAULTS, POOL_MD_DEFAULTS, STRATEGIES, ALConfig, load_config, resolve_config
from .loop import ActiveLearning
from .loop import _warm_start_trainer  # noqa: F401 (imported by tests)
from .output import CSV_FIELDS, format_rows, plot_learning_curves
from .selection import (SCORES, duplicate_radius, farthest_from, model_features, pair_distance_descriptor, rank_fps,
                        rank_greedy, uncertainty_scores)

__all__ = ["AL_DEFAULTS", "POOL_MD_DEFAULTS", "STRATEGIES", "SCORES", "CSV_FIELDS", "ALConfig", "ActiveLearning",
           "load_config", "resolve_config", "uncertainty_scores", "pair_distance_descriptor", "rank_greedy",
           "rank_fps", "duplicate_radius", "farthest_from", "model_features", "plot_learning_curves", "format_rows", "cmd_active_learn", "register"]


def cmd_active_learn(args) -> int:
    cfg = load_config(args.config, list(args.set or []))
    rows = ActiveLearning(cfg, progress=not args.quiet).run()
    print(format_rows(rows))
    print(f"\nwrote {cfg.output_dir / 'learning_curve.csv'} and {cfg.output_dir / 'learning_curve.png'}",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("active-learn", help="active learning: uncertainty-driven vs random selection")
    p.add_argument("config", help="YAML: a blip train config plus an 'active_learning' section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. active_learning.rounds=2 or training.epochs=5")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_active_learn)
