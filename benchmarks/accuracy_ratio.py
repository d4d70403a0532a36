"""BLIP's force RMSE over the plain model's, per seed and pooled, from `blip bench energy-split` runs.

    python benchmarks/accuracy_ratio.py RUN_A/results.json RUN_B/results.json ...

Each results.json must hold the methods ``blip`` and ``deterministic`` for the same seeds (one
run trains both on the same splits); seeds of several files are pooled (e.g. seeds 0-2 and 3-5
run separately). Prints, per experiment and test set, each seed's RMSEs (meV/A) and ratio, the
ratio of the means over all seeds and BLIP's mean recalibrated force NLL.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def collect(paths) -> dict:
    """{(experiment, test set): {seed: {method: row}}} of the blip and deterministic rows."""
    out: dict = {}
    for path in paths:
        for row in json.load(open(path))["rows"]:
            if row["method"] in ("blip", "deterministic"):
                out.setdefault((row["experiment"], row["test_set"]), {}).setdefault(row["seed"], {})[row["method"]] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    for (experiment, test_set), by_seed in sorted(collect(args.results).items()):
        seeds = sorted(s for s, rows in by_seed.items() if len(rows) == 2)
        blip = np.array([by_seed[s]["blip"]["forces_rmse"] for s in seeds]) * 1e3
        plain = np.array([by_seed[s]["deterministic"]["forces_rmse"] for s in seeds]) * 1e3
        nll = [by_seed[s]["blip"]["forces_nll_recal"] for s in seeds]
        print(f"{experiment} {test_set}: seeds {seeds}; BLIP {np.round(blip, 1)}, plain {np.round(plain, 1)} meV/A; "
              f"per seed {np.round(blip / plain, 3)}; ratio of the means {blip.mean() / plain.mean():.3f}; "
              f"BLIP force NLL {np.mean(nll):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
