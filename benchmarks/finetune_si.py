"""Fine-tuning pretrained CHGNet 0.3.0 on silicon: pretrained vs plain vs BLIP fine-tuning.

Group split of the mlearn Si data (train.xyz + test.xyz): the AIMD-NVT and Elastic
structures are the training pool (``data.valid_fraction`` of them held out for validation),
the Vacancy and Surface structures the out-of-distribution test set. Three runs through
the same Trainer and evaluation code as ``blip train`` / ``blip evaluate``:

  (a) pretrained CHGNet as is: BLIP-wrapped, ``training.epochs: 0``, MAP prediction;
  (b) plain fine-tuning: ``uq.method: deterministic``;
  (c) BLIP fine-tuning: ``uq.method: blip`` with K samples; force uncertainty metrics raw and
      after one scale factor fitted on the validation set (as ``blip calibrate`` does).

(b) and (c) share every setting of examples/si/finetune.yaml except the method. Writes
OUT/data/{pool,test}.xyz, OUT/{a,b,c}/ (model.pt, log.csv) and OUT/results.json; prints a table.

    python benchmarks/finetune_si.py [--data ../shared/data/si] [--epochs 3] [--samples 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from blip import config as config_mod
from blip.evaluate import evaluate_structures
from blip.train.datasets import prepare_data
from blip.train.loop import Trainer
from blip.uq.metrics import regression_metrics
from blip.uq.recalibration import fit_scale

ROOT = Path(__file__).resolve().parent.parent
TRAIN_GROUPS, TEST_GROUPS = ("AIMD-NVT", "Elastic"), ("Vacancy", "Surface")


def xyz_blocks(path: Path) -> list[list[str]]:
    """The extxyz text of each structure (labels untouched): list of line lists."""
    lines = path.read_text().splitlines(keepends=True)
    blocks, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        blocks.append(lines[i:i + n + 2])
        i += n + 2
    return blocks


def group_split(data_dir: Path, out: Path) -> tuple[Path, Path, dict]:
    """Write OUT/data/pool.xyz (training groups) and test.xyz (test groups); return counts."""
    blocks = xyz_blocks(data_dir / "train.xyz") + xyz_blocks(data_dir / "test.xyz")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    paths = []
    for name, groups in (("pool", TRAIN_GROUPS), ("test", TEST_GROUPS)):
        chosen = [b for b in blocks if any(f"config_type={g} " in b[1] for g in groups)]
        counts[name] = len(chosen)
        path = out / f"{name}.xyz"
        path.write_text("".join(line for b in chosen for line in b))
        paths.append(path)
    return paths[0], paths[1], counts


def by_group(structures, forces: dict) -> dict:
    """Force RMSE and RMS predicted sigma (eV/A) per config_type; per-structure Spearman of the two.

    forces: flat per-component arrays {"ref", "pred", "std"} in structure order.
    """
    from scipy.stats import spearmanr

    bounds = np.cumsum([0] + [3 * len(s.atoms) for s in structures])
    err = [(forces["ref"] - forces["pred"])[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    std = [forces["std"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    groups = np.array([s.atoms.info.get("config_type", "?") for s in structures])
    out = {}
    for g in sorted(set(groups)):
        idx = np.flatnonzero(groups == g)
        e, sd = np.concatenate([err[i] for i in idx]), np.concatenate([std[i] for i in idx])
        out[g] = {"n": len(idx), "forces_rmse": float(np.sqrt(np.mean(e**2))),
                  "forces_rms_sigma": float(np.sqrt(np.mean(sd**2)))}
    per_err = [float(np.sqrt(np.mean(e**2))) for e in err]
    per_sd = [float(np.sqrt(np.mean(sd**2))) for sd in std]
    if np.ptp(per_sd) > 0:
        out["per_structure_spearman"] = float(spearmanr(per_err, per_sd)[0])
    return out


def run(cfg: dict, data, samples: int, seed: int) -> dict:
    """Train (or just wrap, epochs 0), then score the test set; wall times in seconds."""
    t0 = time.time()
    model = Trainer(cfg, progress=False).run(data)
    t_train = time.time() - t0
    t0 = time.time()
    metrics, arrays = evaluate_structures(model, data.tests["test"], samples=samples, seed=seed, source="test")
    result = {"train_s": t_train, "test_eval_s": time.time() - t0, "samples": samples, "test": metrics,
              "test_by_group": by_group(data.tests["test"], arrays["forces"])}
    if samples > 0:
        t0 = time.time()
        _, valid = evaluate_structures(model, data.valid, samples=samples, seed=seed, source="valid")
        scale = fit_scale(valid["forces"]["ref"] - valid["forces"]["pred"], valid["forces"]["std"])
        f = arrays["forces"]
        result["forces_recalibrated"] = {"scale": scale, **regression_metrics(f["ref"] - f["pred"], scale * f["std"])}
        result["valid_eval_s"] = time.time() - t0
    return result


def fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "si"))
    parser.add_argument("--config", default=str(ROOT / "examples" / "si" / "finetune.yaml"))
    parser.add_argument("--out", default="runs/bench_finetune_si")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8, help="Monte-Carlo samples K for (c)")
    parser.add_argument("--max-minutes", type=float, default=8.0, help="training budget per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--runs", default="abc", help="which of a, b, c to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out).resolve()
    pool, test, counts = group_split(Path(args.data), out / "data")
    base = yaml.safe_load(Path(args.config).read_text())
    base["data"].update({"train_file": str(pool), "valid_fraction": 0.1, "test_files": {"test": str(test)}})
    base["training"].update({"epochs": args.epochs, "max_minutes": args.max_minutes})
    variants = {
        "a": ("pretrained CHGNet (epochs 0)", {"training": {"epochs": 0}}, 0),
        "b": ("plain fine-tuning", {"uq": {"method": "deterministic"}}, 0),
        "c": ("BLIP fine-tuning", {}, args.samples),
    }
    results = {"split": counts, "settings": {"epochs": args.epochs, "samples": args.samples,
                                             "threads": args.threads, "base_config": base}}
    data = None
    for key in args.runs:
        title, changes, samples = variants[key]
        user = copy.deepcopy(base)
        for section, values in changes.items():
            user[section].update(values)
        user["output_dir"] = str(out / key)
        cfg = config_mod.resolve(user)
        data = data or prepare_data(cfg)
        print(f"({key}) {title}: {len(data.train)} train / {len(data.valid)} valid / "
              f"{len(data.tests['test'])} test structures", flush=True)
        results[key] = {"title": title, **run(cfg, data, samples, int(cfg["training"]["seed"]))}
        (out / "results.json").write_text(json.dumps(results, indent=2))

    print("\n| run | force RMSE (eV/A) | E RMSE (eV/atom) | force NLL | Spearman | ENCE | train s | test eval s |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.runs:
        r = results[key]
        f, e = r["test"]["forces"], r["test"]["energy_per_atom"]
        print(f"| ({key}) {r['title']} | {fmt(f['rmse'])} | {fmt(e['rmse'])} | {fmt(f['nll'])} | "
              f"{fmt(f['spearman'], 3)} | {fmt(f['ence'], 3)} | {r['train_s']:.0f} | {r['test_eval_s']:.0f} |")
        if "forces_recalibrated" in r:
            g = r["forces_recalibrated"]
            print(f"| ({key}) recalibrated (x{g['scale']:.3g}) | {fmt(g['rmse'])} | | {fmt(g['nll'])} | "
                  f"{fmt(g['spearman'], 3)} | {fmt(g['ence'], 3)} | | |")
    for key in args.runs:
        print(f"({key}) by group: {json.dumps(results[key]['test_by_group'])}")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
