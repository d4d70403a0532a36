"""The ``blip`` command: train, predict, evaluate, calibrate (and more, registered below)."""

from __future__ import annotations

import argparse
import json
import sys

from ._files import atomic_path, write_text_atomic
from .errors import BlipError, DataError


# -- train ---------------------------------------------------------------------------
def cmd_train(args) -> int:
    from . import config, distributed

    overrides = list(args.set or [])
    if args.resume:
        overrides.append("training.resume=true")
    cfg = config.load(args.config, overrides)
    with distributed.process_group_from_env(cfg["training"]["device"]) as device:
        if device is not None:
            cfg["training"]["device"] = device
        return _train(cfg, args)


def _train(cfg, args) -> int:
    from . import distributed
    from .build import auto_settings
    from .io import save_model
    from .report import format_table
    from .train.datasets import prepare_data
    from .train.loop import Trainer, write_test_metrics
    from .uq.recalibration import recalibrate

    data = prepare_data(cfg)
    main = distributed.is_main()
    world, bs = distributed.world_size(), int(cfg["training"]["batch_size"])
    if main:
        print(f"blip train: {len(data.train)} train / {len(data.valid)} valid structures, "
              f"backbone {cfg['model']['backbone']}, method {cfg['uq']['method']}, output {cfg['output_dir']}; "
              f"global batch {bs}" + (f" over {world} ranks (~{bs / world:.3g} per rank)" if world > 1 else ""),
              file=sys.stderr)
        chosen = auto_settings(cfg, data.summary) if cfg["uq"]["method"] == "blip" else {}
        if chosen:
            print(f"blip train: {', '.join(f'uq.{key} auto -> {value}' for key, value in chosen.items())} "
                  f"({'periodic' if data.summary.periodic else 'non-periodic'} training data)", file=sys.stderr)
    trainer = Trainer(cfg, progress=not args.quiet)
    model = trainer.run(data)
    if not main:  # rank 0 recalibrates, evaluates and writes; the others are done
        return 0
    if cfg["uq"]["recalibrate"] and model.method != "deterministic":
        where = "validation split" if data.calibration is None else f"calibration set ({len(data.calibration)})"
        factors = recalibrate(model, list(data.valid) if data.calibration is None else data.calibration,
                              seed=int(cfg["training"]["seed"]), source=where)
        save_model(model, trainer.out / "model.pt")
        mixed = (f" (each of the {len(model.members)} networks first on its own, then their mixture)"
                 if model.mixture else "")
        print(f"recalibrated on the {where}{mixed}: standard deviations x "
              + ", ".join(f"{q} {f:.3g}" for q, f in factors.items() if q in ("energy", "forces", "stress"))
              + f"; force spread per {model.force_std}{_floors_text(model.calibration)}"
              + _widening_text(model.calibration), file=sys.stderr)
    elif model.method != "deterministic":
        print("uq.recalibrate is off: the uncertainties are the samples' raw spread, which for BLIP is "
              "typically several times too small in distribution; fit the scale on labelled held-out data "
              "with `blip calibrate MODEL VALID.xyz -o OUT`", file=sys.stderr)
    if data.tests:
        results = write_test_metrics(model, data, trainer.out, progress=not args.quiet)
        for name, metrics in results.items():
            print(f"\n== test set: {name} ==")
            print(format_table(metrics))
    print(f"\nwrote {trainer.out / 'model.pt'}")
    return 0


# -- preprocess ----------------------------------------------------------------------
def cmd_preprocess(args) -> int:
    from . import config
    from .train.datasets import preprocess

    cfg = config.load(args.config, list(args.set or []))
    header = preprocess(cfg, args.output, shard_size=args.shard_size)
    s = header["statistics"]["summary"]
    print(f"wrote {header['n_structures']} structures in {len(header['shards'])} shard(s) to {args.output} "
          f"(energy shift {s['energy_shift']:.4g} eV/atom, force scale {s['force_scale']:.4g} eV/A, "
          f"{s['avg_num_neighbors']:.3g} neighbours); train with data.train_file: {args.output}", file=sys.stderr)
    return 0


# -- predict -------------------------------------------------------------------------
def cmd_predict(args) -> int:
    from . import distributed

    with distributed.process_group_from_env(args.device) as device:
        return _predict(args, device)


def _predict(args, device) -> int:
    import ase.io

    from .data import read_structures
    from .io import load

    model = load(args.model, device=device)
    atoms_list = read_structures(args.input)
    pred = model.predict_distributed(atoms_list, samples=args.samples, seed=args.seed, progress=not args.quiet,
                                     source=args.input)
    if pred is None:  # torchrun: rank 0 writes
        return 0
    for i, atoms in enumerate(atoms_list):
        atoms.info["blip_energy"] = float(pred["energy"][i])
        atoms.info["blip_energy_std"] = float(pred["energy_std"][i])
        atoms.arrays["blip_forces"] = pred["forces"][i]
        atoms.arrays["blip_forces_std"] = pred["forces_std"][i]
        if "stress" in pred and atoms.pbc.any():
            atoms.info["blip_stress"] = pred["stress"][i]
            atoms.info["blip_stress_std"] = pred["stress_std"][i]
    with atomic_path(args.output, suffix=".xyz") as tmp:
        ase.io.write(tmp, atoms_list, format="extxyz")
    print(f"wrote {len(atoms_list)} structures to {args.output}", file=sys.stderr)
    return 0


# -- evaluate ------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from . import distributed

    with distributed.process_group_from_env(args.device) as device:
        args.device = device
        return _evaluate(args)


def _evaluate(args) -> int:
    from .data import read_labelled
    from .evaluate import evaluate_structures
    from .io import load
    from .report import add_recalibration_section, format_table, write_report

    model = load(args.model, device=args.device)
    ek = args.energy_key or model.config["data"]["energy_key"]
    fk = args.forces_key or model.config["data"]["forces_key"]
    structures = read_labelled(args.input, ek, fk, require_energy=False, require_forces=False)
    if not any(st.energy is not None or st.forces is not None for st in structures):
        raise DataError(args.input, f"no reference labels to evaluate against (energy key '{ek}', forces key "
                                    f"'{fk}'; --energy-key / --forces-key name others)")
    metrics, arrays = evaluate_structures(model, structures, samples=args.samples, seed=args.seed,
                                          progress=not args.quiet, source=args.input, split=True)
    if metrics is None:  # torchrun: rank 0 reports
        return 0
    print(format_table(metrics))
    if args.json:
        write_text_atomic(args.json, json.dumps(metrics, indent=2))
    if args.report:
        paths = write_report(metrics, args.report, arrays)
        if any(float(v) != 1.0 for q, v in model.calibration.items() if q != "networks"):
            paths += add_recalibration_section(args.report, arrays, model.calibration)
        print(f"wrote report ({len(paths)} files) to {args.report}", file=sys.stderr)
    return 0


# -- calibrate -----------------------------------------------------------------------
def _widening_text(calibration: dict) -> str:
    """How recalibration widens the force and energy spreads with the feature distance ("" when it does not)."""
    from .uq.recalibration import BEYOND_KEYS, NOVELTY_KEYS, widening_formula

    text = ""
    for target, what, of in (("forces", "each atom's force", "novelty"), ("energy", "each energy's", "largest novelty")):
        (b_key, centre_key), (b2_key, limit_key) = NOVELTY_KEYS[target], BEYOND_KEYS[target]
        if b_key in calibration:
            formula = widening_formula(float(calibration[b_key]), float(calibration[centre_key]), of)
            text += f"; {what} spread also x {formula}"
            if float(calibration.get(b2_key, 0.0)) > 0.0:
                limit = float(calibration[limit_key])
                text += f", and x {widening_formula(float(calibration[b2_key]), limit, of)} above {limit:.3g}"
    return text


def _floors_text(calibration: dict) -> str:
    """The floors recalibration added to the force spreads in quadrature ("" when none)."""
    from .uq.recalibration import has_structure_floor, widening_formula

    floor = calibration.get("forces_floor")
    text = f", {floor:g} eV/Å added in quadrature" if floor else ""
    if has_structure_floor(calibration):
        formula = widening_formula(calibration["structure_floor_novelty"], calibration["structure_floor_centre"],
                                   "mean novelty")
        text += (f", a floor of {calibration['forces_structure_floor']:.3g} eV/Å x {formula} per structure "
                 f"(mean novelty at most {calibration['structure_floor_limit']:.3g})")
    return text


def cmd_calibrate(args) -> int:
    from .data import read_labelled
    from .io import load, save_model
    from .uq.recalibration import recalibrate, with_settings

    model = load(args.model, device=args.device)
    if args.set:
        model.config = with_settings(model.config, args.set)
    data_cfg = model.config["data"]
    structures = read_labelled(args.valid, data_cfg["energy_key"], data_cfg["forces_key"],
                               stress_key=data_cfg.get("stress_key", "stress"))
    recalibrate(model, structures, samples=args.samples, seed=args.seed, progress=not args.quiet, source=args.valid)
    save_model(model, args.output)
    cal = model.calibration
    floor_text = _floors_text(cal)
    stress_text = ""
    if "stress" in cal:
        stress_floor = cal.get("stress_floor")
        stress_text = f", stress {cal['stress']:.4g}" + (f" ({stress_floor:g} eV/Å^3 added in quadrature)"
                                                         if stress_floor else "")
    print(f"calibration factors: energy {cal['energy']:.4g}, "
          f"forces {cal['forces']:.4g} (force spread per {model.force_std}{floor_text}){stress_text}"
          f"{_widening_text(cal)}; wrote {args.output}")
    return 0


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_common(p, samples=True):
    if samples:
        p.add_argument("--samples", type=nonnegative_int, default=None,
                       help="Monte-Carlo samples K (default: the model's uq.samples; 0 = noise-free MAP)")
        p.add_argument("--seed", type=int, default=0, help="seed of the noise (reproducible samples)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip", description="Bayesian machine-learning interatomic potentials")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or fine-tune) a model from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.epochs=5")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="write data.train_file to HDF5 shards for streamed training")
    p.add_argument("config")
    p.add_argument("-o", "--output", required=True, help="folder of the data set (header.json, shard-*.h5)")
    p.add_argument("--shard-size", type=int, default=10000, help="structures per shard")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("predict", help="energies and forces with uncertainties -> extxyz")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics of a model on a labelled file")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("--json", help="write the metrics as JSON")
    p.add_argument("--report", help="write plots and report.md to this folder")
    p.add_argument("--energy-key", default=None)
    p.add_argument("--forces-key", default=None)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="fit one uncertainty scale factor per target on a validation file")
    p.add_argument("model")
    p.add_argument("valid")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--set", action="append", default=[], metavar="uq.KEY=VALUE",
                   help="change a recalibration setting first, e.g. uq.energy_novelty_widening=true (stored in OUTPUT)")
    _add_common(p)
    p.set_defaults(func=cmd_calibrate)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands defined in other modules (each exposes ``register(subparsers)``)."""
    import importlib

    found = []
    for name in ("blip.bench", "blip.md", "blip.relax", "blip.ipi", "blip.export", "blip.active"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        found.append(module.register)
    return found


def main(argv=None) -> int:
    from .allocator import keep_freed_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # large tensors reused, not faulted in again (blip.allocator)
    try:
        return args.func(args)
    except BlipError as exc:
        print(f"blip: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"blip: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("blip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
