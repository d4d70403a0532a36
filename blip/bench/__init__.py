"""``blip bench PROTOCOL``: every UQ method on the same splits, seeds and budget.

    blip bench ood-ethanol --out bench/ood-ethanol          # full protocol
    blip bench data-scarce --quick --data examples          # smoke test, seconds

Trains blip, deterministic, mc_dropout and ensemble (or the fine-tuning variants of
``finetune-si``), recalibrates each on the validation split, scores the test sets before
and after recalibration, times prediction against the deterministic model's MAP pass,
and writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/plots/*.png``. Trained
models go to ``OUT/runs/`` (or ``--runs-dir``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from .protocols import PROTOCOLS, Budget, Options, build_plan, data_dir, parse_budget_scale

__all__ = ["register", "run"]


def register(subparsers) -> None:
    """Add the ``bench`` sub-command to the ``blip`` parser."""
    p = subparsers.add_parser(
        "bench", help="train and compare all UQ methods on a benchmark protocol",
        description="Train every method on the same splits, seeds and budget; recalibrate on "
                    "validation; write OUT/results.md, OUT/results.json and plots. Protocols: "
                    + "; ".join(f"{k}: {v[1]}" for k, v in PROTOCOLS.items()))
    p.add_argument("protocol", choices=[*PROTOCOLS, "cost", "active", "all"],
                   help="benchmark protocol ('all': each in OUT/NAME); 'cost': prediction, training and MD "
                        "cost as ratios to the MAP pass (--backbone painn,mace,chgnet; --sets acac,Si64,Si1000); "
                        "'active': active-learning selectors (BLIP sigma, random, FPS, ensemble) on a mixed "
                        "GFN2-xTB-labelled ethanol pool, and warm-started rounds (--seeds, --epochs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a handful of structures, a tiny model, 1 epoch")
    p.add_argument("--out", default=None, help="output folder (default: bench/PROTOCOL)")
    p.add_argument("--data", default=None,
                   help="data folder with acac/, ethanol/, si/ (default: $BLIP_DATA, else ../shared/data)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-time cap per network in minutes (each ensemble member gets it)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per network (protocol defaults: ood-ethanol 25 epochs, data-scarce 400 "
                        "steps, energy-split and si-defects 1500 steps, finetune-si 10 epochs)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per network; epochs = ceil(steps / batches per epoch)")
    p.add_argument("--budget-scale", default=None, metavar="METHOD=FACTOR[,...]",
                   help="train the networks of these methods for FACTOR times the budget, e.g. blip=3 "
                        "(about the training cost of a 5-member ensemble); the others keep it")
    p.add_argument("--max-test", type=int, default=None, help="score at most this many structures per test set")
    p.add_argument("--methods", default=None, help="comma-separated subset of the protocol's methods")
    p.add_argument("--backbone", default=None,
                   help="backbone for ood-ethanol / data-scarce / energy-split / si-defects (default painn); "
                        "comma-separated for cost "
                        "(default painn,mace)")
    p.add_argument("--repeats", type=int, default=None, help="cost: interleaved timing repeats (default 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the splits, training and sampling (default 0)")
    p.add_argument("--seeds", type=int, default=None,
                   help="run every experiment for this many seeds (seed, seed+1, ...) and report mean ± std "
                        "over them (default 3; 1 with --quick)")
    p.add_argument("--sets", default=None,
                   help="comma-separated subset of the protocol's experiments, e.g. ethanol,acac for "
                        "energy-split (which also takes paths of labelled extxyz files of one's own) or "
                        "N=25,N=50 for data-scarce")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="config override for every method, e.g. model.features=32")
    p.add_argument("--runs-dir", default=None, help="where trained models go (default OUT/runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted bench: every run picks up its checkpoint in the runs "
                        "folder (finished runs are reused; train seconds come from their log.csv)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is much faster on a busy machine")
    p.add_argument("--warm-epochs", default=None,
                   help="active: comma-separated epochs of the warm-started rounds, one warm-start run per value "
                        "(default: a third of --epochs)")
    p.add_argument("--diversity", choices=("weighted", "greedy", "fps", "none"), default="weighted",
                   help="active: batch selection of the uncertainty selector (default weighted: sigma x distance "
                        "to the labelled and picked structures)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (log lines stay)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    names = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.budget_scale and args.protocol in ("cost", "active"):
        raise ConfigError(f"--budget-scale applies to the training protocols, not to '{args.protocol}'")
    if args.protocol == "cost":
        from . import cost

        backbones = [b.strip() for b in (args.backbone or "painn,mace").split(",")]
        unknown = sorted(set(backbones) - set(cost.MODELS))
        if unknown:
            raise ConfigError(f"bench cost: unknown backbone(s) {', '.join(unknown)}; choose from {', '.join(cost.MODELS)}")
        cost.run(Path(args.out or "bench/cost"), backbones, quick=args.quick, repeats=args.repeats,
                 system_names=[x.strip() for x in args.sets.split(",")] if args.sets else None)
        return 0
    if args.protocol == "active":
        from . import active

        seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        if seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        active.run(Path(args.out or "bench/active"), data_dir(args.data), list(range(args.seed, args.seed + seeds)),
                   quick=args.quick, epochs=args.epochs, runs_dir=Path(args.runs_dir) if args.runs_dir else None,
                   progress=not args.quiet,
                   warm_epochs=[int(x) for x in args.warm_epochs.split(",")] if args.warm_epochs else None,
                   diversity=args.diversity)
        return 0
    root = data_dir(args.data)
    opts = Options(quick=args.quick, seed=args.seed, epochs=args.epochs, steps=args.steps,
                   budget_minutes=args.budget_minutes, max_test=args.max_test,
                   methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
                   backbone=args.backbone,
                   overrides=list(args.set or []) + (["training.resume=true"] if args.resume else []),
                   budget_scale=parse_budget_scale(args.budget_scale),
                   seeds=args.seeds if args.seeds is not None else (1 if args.quick else 3),
                   experiments=[e.strip() for e in args.sets.split(",")] if args.sets else None)
    for name in names:
        if args.out is None:
            out = Path("bench") / name
        else:
            out = Path(args.out) / name if args.protocol == "all" else Path(args.out)
        runs = Path(args.runs_dir) / name if args.runs_dir and args.protocol == "all" else args.runs_dir
        run(name, root, opts, out, Path(runs) if runs else None, progress=not args.quiet)
    return 0


def run(protocol: str, root: Path, opts: Options, out: Path, runs_dir: Path | None = None,
        progress: bool = True) -> dict:
    """Run one protocol for ``opts.seeds`` seeds; write OUT/results.json, results.md and plots.

    Seeds ``opts.seed, opts.seed + 1, ...`` change the splits, the training and the sampling.
    Rows carry their ``seed``; ``summary`` rows hold the mean and the standard deviation over
    seeds (``KEY`` and ``KEY_std``) of every number. Plots show the first seed.
    """
    import torch

    from . import results
    from .runner import log, run_experiment

    if opts.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    start = time.time()
    seeds = list(range(opts.seed, opts.seed + opts.seeds))
    plans = [build_plan(protocol, root, dataclasses.replace(opts, seed=s)) for s in seeds]
    plan = plans[0]
    out = Path(out)
    runs_dir = runs_dir or out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    first = plan.experiments[0]
    ensemble_size = _resolved_ensemble_size(first, opts)
    settings = {
        "protocol": protocol, "quick": opts.quick, "data_dir": str(root), "seed": opts.seed, "seeds": seeds,
        "command": "blip " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"]
        else f"blip bench {protocol}",
        "budget": {"epochs": plan.budget.epochs, "steps": plan.budget.steps,
                   "max_minutes_per_network": plan.budget.minutes, "scale_per_method": plan.budget.scale,
                   "statement": plan.budget.statement(ensemble_size)},
        "methods": [m.name for m in first.methods],
        "timing": {"n": first.timing_structures, "repeats": first.timing_repeats},
        "protocol_settings": plan.settings,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "versions": _versions(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    settings.update(_resolved_sections(first, opts))
    description = PROTOCOLS[protocol][1]
    log(f"{protocol}: {len(plan.experiments)} experiment(s) x {len(first.methods)} methods x {len(seeds)} "
        f"seed(s); {settings['budget']['statement']}; writing {out}")
    rows, scored = [], {}
    counter = [0]
    total = len(seeds) * sum(len(e.methods) for e in plan.experiments)
    for seed, seed_plan in zip(seeds, plans):
        seed_runs = runs_dir / f"seed{seed}" if len(seeds) > 1 else runs_dir
        for exp in seed_plan.experiments:
            new_rows, new_scored = run_experiment(protocol, exp, seed_plan.budget, opts.overrides, seed_runs,
                                                  progress, counter, total)
            rows += [{**r, "seed": seed} for r in new_rows]
            if seed == seeds[0]:
                scored.update({(exp.name, m, t): v for (m, t), v in new_scored.items()})
            _write(out, protocol, description, rows, settings, start, complete=False, plots=[])
    plots = results.write_plots(out, plan.experiments, scored, results.summarise(rows),
                                learning_curve=bool(plan.settings.get("learning_curve")))
    data = _write(out, protocol, description, rows, settings, start, complete=True, plots=plots)
    log(f"{protocol}: done in {(time.time() - start) / 60:.1f} min; wrote {out / 'results.md'}, "
        f"{out / 'results.json'} and {len(plots)} plots")
    return data


def _write(out, protocol, description, rows, settings, start, complete, plots) -> dict:
    from . import results

    settings["wall_seconds"] = time.time() - start
    settings["complete"] = complete
    settings["finished"] = datetime.datetime.now().isoformat(timespec="seconds") if complete else None
    summary = results.summarise(rows)
    results.write_json(out, rows, settings, summary)
    results.write_markdown(out, protocol, description, summary, settings,
                           settings["protocol_settings"].get("test_sets", {}), plots)
    return {"rows": rows, "summary": summary, "settings": settings}


def _resolved_sections(exp, opts) -> dict:
    """model / uq / training sections of the first method, as every method resolves them."""
    from .runner import method_config

    cfg = method_config(exp, exp.methods[0], Budget(epochs=1), opts.overrides, Path("unused"))
    training = {k: cfg["training"][k] for k in ("batch_size", "lr", "scheduler", "loss", "energy_weight",
                                                 "forces_weight", "ema_decay", "seed")}
    uq = {k: v for k, v in cfg["uq"].items() if k != "method"}
    return {"model": cfg["model"], "uq": uq, "training": training}


def _resolved_ensemble_size(exp, opts) -> int:
    return int(_resolved_sections(exp, opts)["uq"]["ensemble_size"])


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    from .. import __version__

    out = {"blip": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("ase", "numpy", "mace-torch", "chgnet"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
