"""How much of a force NLL is accuracy and how much is the ranking of sigma, for trained models.

    OMP_NUM_THREADS=1 python benchmarks/nll_breakdown.py MODEL.pt [MODEL.pt ...] --test FILE.xyz \
        [--config-type methanol] [--samples 16]

For each model, on the labelled structures of ``--test`` (optionally only those whose
``info["config_type"]`` matches): the force RMSE (meV/A) and the Gaussian NLL per force
component (nats) with three spreads: the model's own calibrated sigma; that sigma rescaled by
the single factor that is best on this test set ("oracle": what a perfect recalibration could
reach with this ranking); and a constant sigma equal to the model's RMSE here (no ranking at
all). The gap between the last two is what the ranking of sigma is worth; the constant-sigma
NLL, 0.5 log(2 pi e RMSE^2), is set by accuracy alone.
"""

from __future__ import annotations

import argparse

import ase.io
import numpy as np
import torch

import blip


def gaussian_nll(error: np.ndarray, sigma: np.ndarray) -> float:
    """Mean Gaussian negative log-likelihood of ``error`` with standard deviations ``sigma``."""
    return float(np.mean(0.5 * np.log(2 * np.pi * sigma ** 2) + error ** 2 / (2 * sigma ** 2)))


def breakdown(model_path: str, structures: list, samples: int) -> dict:
    model = blip.load(model_path)
    pred = model.predict(structures, samples=samples, seed=0)
    reference = np.concatenate([a.get_forces() for a in structures]).ravel()
    error = np.concatenate([np.asarray(f) for f in pred["forces"]]).ravel() - reference
    sigma = np.concatenate([np.asarray(s) for s in pred["forces_std"]]).ravel()
    rmse = float(np.sqrt(np.mean(error ** 2)))
    out = {"rmse": rmse, "constant": gaussian_nll(error, np.full_like(error, rmse))}
    if np.all(sigma > 0):
        factor = float(np.sqrt(np.mean(error ** 2 / sigma ** 2)))  # maximum-likelihood scale
        out.update(calibrated=gaussian_nll(error, sigma), factor=factor, oracle=gaussian_nll(error, factor * sigma))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--test", required=True, help="labelled extxyz file")
    parser.add_argument("--config-type", default=None, help="only structures with this info['config_type']")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    structures = ase.io.read(args.test, ":")
    if args.config_type is not None:
        structures = [a for a in structures if a.info.get("config_type") == args.config_type]
    if not structures:
        raise SystemExit(f"no structures in {args.test}" + (f" with config_type {args.config_type}"
                                                               if args.config_type else ""))
    for path in args.models:
        r = breakdown(path, structures, args.samples)
        line = f"{path}: force RMSE {1000 * r['rmse']:.1f} meV/A; NLL constant sigma {r['constant']:.3f}"
        if "oracle" in r:
            line += (f", calibrated sigma {r['calibrated']:.3f}, oracle-scaled sigma {r['oracle']:.3f} "
                     f"(factor {r['factor']:.2f})")
        print(line)


if __name__ == "__main__":
    main()
