"""Energies along bond-breaking paths: error and energy sigma by distance, for trained models.

    OMP_NUM_THREADS=1 python benchmarks/dissociation.py MODEL.pt [MODEL.pt ...] [--data ../shared/data]

Models trained on ethanol (e.g. the runs of ``blip bench ood-ethanol --runs-dir RUNS``:
RUNS/seedN/run/METHOD/model.pt). Two paths of the ethanol data set: ``test_H_removal.xyz``
(the hydroxyl H pulled away from the O, distance d = O-H) and the H2 curve of
``test_dimers.xyz`` (d = H-H; the dimers' C and O curves dissociate to atoms 2-3 eV below
``isolated_atoms.xyz``, so only H2 is compared with the isolated-atom limit). For each path:
mean |energy error| (eV) and mean energy sigma (eV, K = 16 samples, seed 0, not recalibrated)
in bands of d, and the Spearman rank correlation of sigma with |error| over the whole path.
Models without a spread (deterministic) print errors only.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ase.io
import numpy as np
import torch
from scipy.stats import spearmanr

import blip

BANDS = {"H removal": [(0.9, 1.2), (1.2, 1.9), (1.9, 3.0), (3.0, 4.0), (4.0, 7.0)],
         "H2": [(0.3, 1.0), (1.0, 2.5), (2.5, 4.0), (4.0, 6.0)]}


def paths(data: Path) -> dict:
    """Path name -> (structures, distance per structure (n,) Angstrom, reference energies (n,) eV)."""
    removal = ase.io.read(data / "ethanol" / "test_H_removal.xyz", ":")
    dimers = [a for a in ase.io.read(data / "ethanol" / "test_dimers.xyz", ":") if a.info.get("config_type") == "HH"]
    out = {}
    for name, frames, (i, j) in (("H removal", removal, (2, 8)), ("H2", dimers, (0, 1))):
        distance = np.array([a.get_distance(i, j) for a in frames])
        out[name] = (frames, distance, np.array([a.get_potential_energy() for a in frames]))
    return out


def report(model_path: str, data: Path) -> None:
    model = blip.load(model_path)
    print(model_path)
    for name, (frames, distance, reference) in paths(data).items():
        pred = model.predict(frames, samples=16, seed=0)
        error = np.abs(np.asarray(pred["energy"]) - reference)
        sigma = pred.get("energy_std")
        if sigma is not None and not np.any(np.asarray(sigma) > 0):
            sigma = None  # a model without a spread (deterministic)
        cells = []
        for low, high in BANDS[name]:
            band = (distance >= low) & (distance < high)
            if band.any():
                spread = f", sigma {np.mean(np.asarray(sigma)[band]):.3f}" if sigma is not None else ""
                cells.append(f"{low}-{high} A: |err| {error[band].mean():.2f}{spread}")
        rank = f"; Spearman {spearmanr(sigma, error).statistic:.2f}" if sigma is not None else ""
        print(f"  {name}: " + " | ".join(cells) + rank)


def report_each_model(report_model, description: str) -> None:
    """Command line of the path scripts: ``report_model(path, data)`` for every MODEL.pt given
    (``--data``: the shared data folder), on one torch thread."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=os.environ.get("BLIP_DATA", "../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        report_model(path, Path(args.data))


def main() -> None:
    report_each_model(report, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
