"""One short check on a CUDA machine: the same samples on CPU and GPU, and what the uncertainty costs there.

    python benchmarks/cuda_check.py --out DIR [--repeats 5] [--backbones painn,mace]

1. Samples equal: untrained BLIP models (PaiNN, MACE; the example configs' sizes), each built as
   for its system's kind of training data (Si cells: as for crystals, so PaiNN measures the
   nearest-row distance) with feature statistics fitted on that system, predict K = 8 samples of 8
   acetylacetone molecules and of a rattled 64-atom Si cell on the CPU and, with the same weights
   and seed, on CUDA; prints the
   largest difference of energies [eV] and forces [eV/A] between the two, in float64 and float32.
   The noise is a counter-based hash of (seed, replica, structure, row, channel) computed on the
   device, so the two differ only by floating-point rounding.
2. Cost on CUDA (float32): ``blip bench cost``'s interleaved predict ratios over the MAP predict of
   the same model (BLIP and MC dropout K = 1 ... 32, the 5-member ensemble) on acetylacetone (8 x 15
   atoms), Si 64 and Si 1000 (models built per kind of system, as above); per-sample marginal
   cost; one training step of BLIP over the deterministic model's (PaiNN, batch 8 and 32);
   ``blip md`` with the default watch (8 samples every 20 steps) over MD without checks.

Writes DIR/cuda_check.json and DIR/cuda_check.md; exits non-zero if a difference exceeds its tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from blip.bench import cost
from blip.data import all_periodic

#: largest |CPU - CUDA| allowed per dtype [eV for energies, eV/A for forces]: rounding only
TOLERANCE = {"float64": 1e-8, "float32": 2e-3}


def samples_equal(backbone: str, dtype: str, device: str, samples: int = 8) -> dict:
    """Max |CPU - ``device``| of energy and force samples of untrained BLIP models: acac with one
    built as for molecules, Si64 with one built as for crystals (PaiNN: the nearest-row distance)."""
    structures = cost.systems(False)
    out = {"backbone": backbone, "dtype": dtype, "samples": samples}
    for name in ("acac", "Si64"):
        model = cost.build_models({**cost.MODELS[backbone], "dtype": dtype}, False,
                                  periodic=all_periodic(structures[name]))["blip"]
        cost.fit_statistics(model, structures[name])
        gpu = copy.deepcopy(model).to(device)
        a = model.predict(structures[name], samples=samples, seed=3)
        b = gpu.predict(structures[name], samples=samples, seed=3)
        de = float(np.max(np.abs(np.asarray(a["energy_samples"]) - np.asarray(b["energy_samples"]))))
        df = max(float(np.max(np.abs(fa - fb))) for fa, fb in zip(a["forces_samples"], b["forces_samples"]))
        spread = float(np.mean([f.std(0).mean() for f in a["forces_samples"]]))
        out[name] = {"energy_max_diff": de, "forces_max_diff": df, "forces_sample_spread": spread}
    out["ok"] = all(out[n][k] <= TOLERANCE[dtype] for n in ("acac", "Si64")
                    for k in ("energy_max_diff", "forces_max_diff"))
    return out


def cuda_cost(backbone: str, repeats: int, system_names: list[str], device: str) -> dict:
    """Predict ratios and per-sample slopes on ``device`` for each system."""
    rows, slopes = [], []
    for system, structures in cost.systems(False).items():
        if system not in system_names:
            continue
        models = cost.build_models(cost.MODELS[backbone], False, periodic=all_periodic(structures))
        cost.fit_statistics(models["blip"], structures)
        on_gpu = {k: copy.deepcopy(m).to(device) for k, m in models.items()}
        new = cost.predict_ratios(on_gpu, structures, cost.SAMPLES, repeats)
        map_s = _median_seconds(lambda: on_gpu["blip"].predict(structures, samples=0, seed=0), repeats, device)
        rows += [{"system": system, "map_seconds": map_s, **r} for r in new]
        slopes += [{"system": system, "method": m, **cost.marginal_cost(new, m)} for m in ("blip", "mc_dropout")]
        print(f"{backbone} {system}: MAP {1000 * map_s:.1f} ms; " + ", ".join(
            f"{r['method']} K={r['samples']} {r['ratio']:.2f}" for r in new), flush=True)
    return {"predict": rows, "marginal": slopes}


def _median_seconds(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def markdown(result: dict) -> str:
    lines = ["# CUDA check", "", f"* device: {result['device']}; torch {result['torch']}; "
             f"wall time {result['wall_seconds'] / 60:.1f} min", "", "## CPU and CUDA samples (K = 8, seed 3)", "",
             "| backbone | dtype | system | max dE [eV] | max dF [eV/A] | force spread [eV/A] |",
             "|---|---|---|---:|---:|---:|"]
    for r in result["samples_equal"]:
        for name in ("acac", "Si64"):
            s = r[name]
            lines.append(f"| {r['backbone']} | {r['dtype']} | {name} | {s['energy_max_diff']:.1e} | "
                         f"{s['forces_max_diff']:.1e} | {s['forces_sample_spread']:.1e} |")
    for backbone, c in result["cost"].items():
        systems = list(dict.fromkeys(r["system"] for r in c["predict"]))
        lines += ["", f"## {backbone}: predict on CUDA [x MAP predict], float32", "",
                  "| method | K | " + " | ".join(systems) + " |", "|---|---:|" + "---:|" * len(systems)]
        keyed = {(r["method"], r["samples"], r["system"]): r["ratio"] for r in c["predict"]}
        for method, k in dict.fromkeys((r["method"], r["samples"]) for r in c["predict"]):
            lines.append(f"| {method} | {k} | " + " | ".join(f"{keyed[(method, k, s)]:.2f}" for s in systems) + " |")
        maps = {r["system"]: r["map_seconds"] for r in c["predict"]}
        lines.append("| MAP [ms] | | " + " | ".join(f"{1000 * maps[s]:.1f}" for s in systems) + " |")
        for m in ("blip", "mc_dropout"):
            sl = {r["system"]: r["slope"] for r in c["marginal"] if r["method"] == m}
            lines.append(f"| {m} slope per sample | | " + " | ".join(f"{sl[s]:.3f}" for s in systems) + " |")
    if result.get("train_step"):
        lines += ["", "## PaiNN training step on CUDA [x deterministic]", "", "| method | batch | ms / step | ratio |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['batch_size']} | {1000 * r['seconds_per_step']:.1f} | {r['ratio']:.2f} |"
                  for r in result["train_step"]]
    if result.get("md"):
        lines += ["", "## PaiNN `blip md` on CUDA (acac, 200 steps) [x MD without checks]", "",
                  "| K | every M | ratio |", "|---:|---:|---:|"]
        lines += [f"| {r['samples']} | {r['every']} | {r['ratio']:.2f} |" for r in result["md"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cuda-check")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="painn,mace")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script without CUDA")
    parser.add_argument("--systems", default="acac,Si64,Si1000", help="systems of the cost part")
    parser.add_argument("--parts", default="equal,cost,train", help="which parts to run (comma-separated)")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbones = args.backbones.split(",")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)", "torch": torch.__version__, "samples_equal": [], "cost": {}}

    def write():
        result["wall_seconds"] = time.time() - start
        (out / "cuda_check.json").write_text(json.dumps(result, indent=1))
        (out / "cuda_check.md").write_text(markdown(result))

    parts = args.parts.split(",")
    for backbone in backbones if "equal" in parts else []:
        for dtype in ("float64", "float32"):
            r = samples_equal(backbone, dtype, device)
            result["samples_equal"].append(r)
            print(json.dumps(r), flush=True)
    write()
    for backbone in backbones if "cost" in parts else []:
        result["cost"][backbone] = cuda_cost(backbone, args.repeats, args.systems.split(","), device)
        write()
    if "painn" in backbones and "train" in parts:
        for batch in cost.TRAIN_BATCH_SIZES:
            result.setdefault("train_step", []).extend(
                cost.train_step_ratios(cost.MODELS["painn"], args.repeats, 8, batch, device=device))
        model, acac = cost.acac_blip_model("painn")
        result["md"] = cost.md_ratios(model.to(device), acac[0], 200, 3, [(8, 20), (16, 20)])
        write()
    print(markdown(result))
    return 0 if all(r["ok"] for r in result["samples_equal"]) else 1


if __name__ == "__main__":
    sys.exit(main())
