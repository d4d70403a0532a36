"""How much energy spread BLIP's noise can give at all along the O-H removal path of ethanol.

    OMP_NUM_THREADS=1 python benchmarks/noise_reach.py MODEL.pt [MODEL.pt ...] [--data ../shared/data]

For BLIP models trained on ethanol (e.g. RUNS/seedN/run/blip/model.pt of ``blip bench ood-ethanol``):
the spread of the energy samples (eV, K = 16, seed 0, raw: no recalibration) with the model's own
rates, with the rates of the leaving H (atom 8) forced to P in every noisy layer, and with every
atom's rates forced to P, against |error| of the noise-free energy, in bands of the O-H distance.
If forcing the rates to large values still gives a spread far below the error, the rate heads are
not what limits the uncertainty there: the places the noise acts on are.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path

import ase.io
import numpy as np
import torch

import blip

BANDS = [(0.9, 1.2), (1.2, 1.9), (1.9, 3.0), (3.0, 4.0), (4.0, 7.0)]
LEAVING_H, OXYGEN = 8, 2
FORCED = [("H", 0.1), ("H", 0.5), ("all", 0.3)]


@contextmanager
def forced_rates(model, who: str, p: float, atoms: int):
    """Within the block, the node rates of atom ``LEAVING_H`` (who="H") or of every atom (who="all")
    are ``p`` in every noisy layer (structures of ``atoms`` atoms; K replicas in one pass)."""
    inference = model.members[0].inference
    original = inference.rate

    def rate(domain, slot, base, features, groups, update=False, training=False, memo=None):
        rates = original(domain, slot, base, features, groups, update, training, memo=memo)
        if domain != "node":
            return rates
        rates = rates.clone()
        if who == "H":
            rates[LEAVING_H::atoms] = p
        else:
            rates[:] = p
        return rates

    inference.rate = rate
    try:
        yield
    finally:
        inference.rate = original


def spread(model, frames) -> np.ndarray:
    return np.asarray(model.predict(frames, samples=16, seed=0)["energy_samples"]).std(axis=0)


def report(path: str, data: Path) -> None:
    model = blip.load(path)
    frames = ase.io.read(data / "ethanol" / "test_H_removal.xyz", ":")
    distance = np.array([a.get_distance(OXYGEN, LEAVING_H) for a in frames])
    reference = np.array([a.get_potential_energy() for a in frames])
    error = np.abs(np.asarray(model.predict(frames, samples=0)["energy"]) - reference)
    columns = {"own rates": spread(model, frames)}
    for who, p in FORCED:
        with forced_rates(model, who, p, len(frames[0])):
            columns[f"{'leaving H' if who == 'H' else 'all atoms'} p={p}"] = spread(model, frames)
    print(path)
    print(f"  {'O-H [A]':>9} {'|err| [eV]':>10} " + " ".join(f"{k:>15}" for k in columns))
    for low, high in BANDS:
        band = (distance >= low) & (distance < high)
        if band.any():
            print(f"  {low:>4}-{high:<4} {error[band].mean():10.3f} "
                  + " ".join(f"{v[band].mean():15.4f}" for v in columns.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", default=os.environ.get("BLIP_DATA", "../shared/data"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for path in args.models:
        report(path, Path(args.data))


if __name__ == "__main__":
    main()
