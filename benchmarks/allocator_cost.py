"""What keeping freed memory (``blip.allocator.keep_freed_memory``, on in every ``blip`` command) buys.

    OMP_NUM_THREADS=1 python benchmarks/allocator_cost.py [--rounds 3] [--repeats 5]

The C allocator's settings are process-wide, so each setting runs in child processes, alternated
round by round (``BLIP_KEEP_FREED_MEMORY=0`` leaves glibc's defaults). Each child times, side by
side in its own process: the MAP predict and the default BLIP predict (K = 16, with its MAP pass)
of the untrained example PaiNN of ``blip bench cost`` on 8 acetylacetone molecules and a 64-atom
Si cell (medians of ``--repeats``), a training step of the deterministic model and BLIP
(``blip.bench.cost.train_step_ratios``, acetylacetone batches of 8), and 200 steps of ``blip md``
(NVT, one acetylacetone molecule) without checks and with the default watch (K = 8 every 20
steps), with the minor page faults of the predicts. Prints per setting the medians over rounds of the milliseconds and of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MD_STEPS = 200


def child(repeats: int) -> dict:
    """Timings of one process (the allocator as the environment left it)."""
    import torch

    from blip.allocator import keep_freed_memory
    from blip.bench import cost
    from blip.md import MDSettings, run_md

    torch.set_num_threads(1)
    out = {"kept": keep_freed_memory()}
    model = cost.build_models(cost.MODELS["painn"], False)["blip"]
    systems = cost.systems(False)
    for name in ("acac", "Si64"):
        structures = systems[name]
        cost.fit_statistics(model, structures)
        for label, k in (("map", 0), ("k16", 16)):
            model.predict(structures, samples=k, seed=0)  # warm-up
            times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(repeats):
                start = time.perf_counter()
                model.predict(structures, samples=k, seed=0)
                times.append(time.perf_counter() - start)
            out[f"{name}_{label}_ms"] = 1000 * statistics.median(times)
            out[f"{name}_{label}_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
        out[f"{name}_k16_ratio"] = out[f"{name}_k16_ms"] / out[f"{name}_map_ms"]
    for row in cost.train_step_ratios(cost.MODELS["painn"], repeats, 8, 8):
        out[f"train_{row['method']}_ms"] = 1000 * row["seconds_per_step"]
        out[f"train_{row['method']}_ratio"] = row["ratio"]
    atoms = systems["acac"][0]
    for label, every in (("plain", MD_STEPS + 1), ("watched", 20)):
        run_md(model, atoms, MDSettings(steps=20, every=every, samples=8, seed=0))  # warm-up
        times = []
        for _ in range(max(1, repeats // 2)):
            start = time.perf_counter()
            run_md(model, atoms, MDSettings(steps=MD_STEPS, every=every, samples=8, seed=0))
            times.append(time.perf_counter() - start)
        out[f"md_{label}_ms_per_step"] = 1000 * statistics.median(times) / MD_STEPS
    out["md_watched_ratio"] = out["md_watched_ms_per_step"] / out["md_plain_ms_per_step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats)))
        return
    results = {"0": [], "1": []}
    for r in range(args.rounds):
        for setting in (("1", "0") if r % 2 else ("0", "1")):
            env = {**os.environ, "BLIP_KEEP_FREED_MEMORY": setting, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                                  env=env, check=True, capture_output=True, text=True)
            results[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}, keep freed memory {setting}: done", file=sys.stderr, flush=True)
    keys = [k for k in results["0"][0] if k != "kept"]
    print(f"{'median over ' + str(args.rounds) + ' rounds':32s} {'glibc defaults':>15s} {'kept (blip)':>12s}")
    for key in keys:
        a, b = (statistics.median(row[key] for row in results[s]) for s in ("0", "1"))
        print(f"{key:32s} {a:15.2f} {b:12.2f}")
    print("settings took effect in the children:", [row["kept"] for row in results["1"]])


if __name__ == "__main__":
    main()
