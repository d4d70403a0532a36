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

from contextlib import contextmanager
from pathlib import Path

import numpy as np
from dissociation import BANDS, paths, report_each_model  # this folder's script (python benchmarks/noise_reach.py)

import blip

LEAVING_H = 8  # the hydroxyl H that leaves along test_H_removal.xyz
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
    frames, distance, reference = paths(data)["H removal"]  # distance: O-H (atoms 2, 8)
    error = np.abs(np.asarray(model.predict(frames, samples=0)["energy"]) - reference)
    columns = {"own rates": spread(model, frames)}
    for who, p in FORCED:
        with forced_rates(model, who, p, len(frames[0])):
            columns[f"{'leaving H' if who == 'H' else 'all atoms'} p={p}"] = spread(model, frames)
    print(path)
    print(f"  {'O-H [A]':>9} {'|err| [eV]':>10} " + " ".join(f"{k:>15}" for k in columns))
    for low, high in BANDS["H removal"]:
        band = (distance >= low) & (distance < high)
        if band.any():
            print(f"  {low:>4}-{high:<4} {error[band].mean():10.3f} "
                  + " ".join(f"{v[band].mean():15.4f}" for v in columns.values()))


def main() -> None:
    report_each_model(report, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
