"""Stress uncertainties: BLIP against the baselines on a stress-labelled silicon set (prints tables).

    python benchmarks/make_si_stress_dataset.py -o si_stress_gfn1.xyz
    OMP_NUM_THREADS=1 python benchmarks/stress_calibration.py si_stress_gfn1.xyz --out OUT \
        --methods blip,ensemble --seeds 3 [--floors 0,0.01]

Each seed splits the ``strained`` and ``axial`` cells (the training distribution) at random
into validation (recalibration, early stopping), an in-distribution test set and training
structures; ``large_strain``, ``hot`` and ``vacancy`` are the out-of-distribution test sets.
Every method trains with ``blip train`` (PaiNN, energies, forces and stress,
``training.stress_weight``) for the same number of optimiser steps per network. Each trained
model is then recalibrated on the validation split once per stress floor of ``--floors``
(``uq.stress_std_floor``; the force floor stays at its default) and scored on every test set:
stress and force NLL (per component, nats), 95 % coverage, Spearman and the ratio of mean
spreads to the in-distribution test set's. Structures whose prediction or spread is not finite
(a float32 network overflowing far out) are left out of a set's scores and counted. Results:
OUT/results.json and the tables printed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml
from ase.io import read, write

ID_KINDS = ("strained", "axial")
OOD_KINDS = ("large_strain", "hot", "vacancy")
TARGETS = ("stress", "forces")
SCORES = ("nll", "coverage_95", "spearman", "rmse")


def split(structures: list, seed: int, n_valid: int, n_test: int) -> dict[str, list]:
    """{"train", "valid", "test_id", and one set per OOD kind} of ``structures`` (ase.Atoms)."""
    rng = np.random.default_rng(seed)
    ident = [a for a in structures if a.info["config_type"] in ID_KINDS]
    order = rng.permutation(len(ident))
    sets = {"valid": [ident[i] for i in order[:n_valid]], "test_id": [ident[i] for i in order[n_valid:n_valid + n_test]],
            "train": [ident[i] for i in order[n_valid + n_test:]]}
    sets.update({kind: [a for a in structures if a.info["config_type"] == kind] for kind in OOD_KINDS})
    return sets


def train(method: str, files: dict[str, Path], out: Path, seed: int, steps: int, stress_weight: float,
          overrides: list[str] = ()) -> Path:
    """Train one method with ``blip train`` (``overrides``: its ``--set KEY=VALUE``); returns its model file."""
    from blip.cli import main as blip_main

    n_train = len(read(files["train"], ":"))
    epochs = math.ceil(steps / math.ceil(n_train / 8))
    cfg = {"data": {"train_file": str(files["train"].resolve()), "valid_file": str(files["valid"].resolve())},
           "model": {"backbone": "painn", "cutoff": 5.0, "features": 64, "interactions": 3, "radial": 20},
           "uq": {"method": method},
           "training": {"epochs": epochs, "batch_size": 8, "lr": 0.005, "seed": seed,
                        "stress_weight": stress_weight, "device": "cpu"},
           "output_dir": str(out.resolve())}
    (out.parent / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["train", str(out.parent / f"{method}.yaml"), "--quiet"] + [a for o in overrides for a in ("--set", o)]
    if blip_main(argv) != 0:
        raise RuntimeError(f"blip train failed for {method}, seed {seed}")
    return out / "model.pt"


def score(model_file: Path, files: dict[str, Path], floor: float, seed: int) -> dict:
    """Recalibrate with stress floor ``floor`` on the validation split; metrics per test set."""
    import blip
    from blip.data import read_labelled
    from blip.uq.metrics import regression_metrics
    from blip.uq.recalibration import recalibrate

    model = blip.load(model_file)
    model.config["uq"]["stress_std_floor"] = floor
    if model.method != "deterministic":
        recalibrate(model, read_labelled(files["valid"]), seed=seed)
    out = {"calibration": dict(model.calibration)}
    for name in ("test_id",) + OOD_KINDS:
        structures = read_labelled(files[name])
        arrays, excluded = finite_arrays(model, structures, seed)
        out[name] = {q: {**{k: regression_metrics(a["ref"] - a["pred"], a["std"]).get(k) for k in SCORES},
                         "mean_std": float(np.mean(a["std"]))} for q, a in arrays.items()}
        out[name]["excluded"] = excluded
    for name in OOD_KINDS:
        for q in TARGETS:
            ref = out["test_id"][q]["mean_std"]
            out[name][q]["std_ratio"] = out[name][q]["mean_std"] / ref if ref > 0 else None
    return out


def finite_arrays(model, structures: list, seed: int) -> tuple[dict, int]:
    """Flat ``{"stress", "forces"}: {"ref", "pred", "std"}`` arrays of one prediction of every
    structure, without the structures whose prediction or spread is not finite (far out a float32
    network can overflow, e.g. a sample's force of inf, which no metric can score); and how many
    were left out. One predict call, so every structure keeps the noise draws of its position."""
    from blip.data.io import full_to_voigt
    from blip.evaluate import nonfinite_structures

    pred = model.predict([s.atoms for s in structures], seed=seed, stress=True)
    left_out = set(nonfinite_structures(pred))
    parts = {q: {"ref": [], "pred": [], "std": []} for q in TARGETS}
    for i, s in enumerate(structures):
        if i in left_out:
            continue
        values = {"stress": (full_to_voigt(s.stress), pred["stress"][i], pred["stress_std"][i]),
                  "forces": (s.forces, pred["forces"][i], pred["forces_std"][i])}
        for q, (ref, p, std) in values.items():
            for key, v in zip(("ref", "pred", "std"), (ref, p, std)):
                parts[q][key].append(np.ravel(v))
    return {q: {k: np.concatenate(v) for k, v in a.items()} for q, a in parts.items()}, len(left_out)


def table(results: dict, target: str) -> str:
    """Markdown: one row per (method, floor), one column per test set, mean ± std over seeds."""
    sets = ("test_id",) + OOD_KINDS
    lines = [f"| {target}: method, floor | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for label, per_seed in results.items():
        cells = []
        for name in sets:
            def stat(key):
                v = [s[name][target].get(key) for s in per_seed]
                v = [x for x in v if x is not None and math.isfinite(x)]
                return (np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0) if v else (math.nan, 0.0)
            nll, cov, ratio = stat("nll"), stat("coverage_95"), stat("std_ratio")
            rmse = stat("rmse")
            cell = f"{nll[0]:.3g} ± {nll[1]:.2g} ({cov[0]:.2f}"
            cell += f", {ratio[0]:.2g}x)" if name != "test_id" else ")"
            excluded = sum(s[name]["excluded"] for s in per_seed)
            cells.append(cell + f" rmse {rmse[0]:.3g}" + (f"; {excluded} left out" if excluded else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default="blip,ensemble")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps per network")
    p.add_argument("--stress-weight", type=float, default=1e4)
    p.add_argument("--floors", default="0,0.01", help="uq.stress_std_floor values to score each model with")
    p.add_argument("--n-valid", type=int, default=100)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every training (repeatable), as blip train --set")
    args = p.parse_args(argv)
    structures = read(args.data, ":")
    floors = [float(x) for x in args.floors.split(",")]
    results: dict[str, list] = {}
    for seed in range(args.seed, args.seed + args.seeds):
        root = args.out / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, atoms in split(structures, seed, args.n_valid, args.n_test).items():
            files[name] = root / f"{name}.xyz"
            write(files[name], atoms, format="extxyz")
        for method in args.methods.split(","):
            model_file = root / method / "model.pt"
            if not model_file.exists():
                model_file = train(method, files, root / method, seed, args.steps, args.stress_weight, args.set)
            for floor in floors if method != "deterministic" else [0.0]:
                results.setdefault(f"{method}, {floor:g}", []).append(score(model_file, files, floor, seed))
                print(f"seed {seed} {method} floor {floor:g}: done", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    for target in TARGETS:
        print("\n" + table(results, target))
    print("\ncells: recalibrated NLL per component (nats) mean ± std over seeds (95 % coverage, mean spread "
          "over the in-distribution test set's); rmse: of the prediction (eV/A^3 for stress, eV/A for forces); "
          "left out: structures (over all seeds) with a non-finite prediction or spread")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
