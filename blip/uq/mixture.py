"""Several sampled networks (``uq.networks``) predicted as one: the mixture of their own predictions.

Each network keeps its own calibration (``calibration["networks"][m]``: its factors, widenings and
floors, fitted on validation as for a model of one network); the mixture's prediction is the mean
of the networks' predictions and its spread ``f sqrt(mean_m sigma_m^2 + mean_m (mu_m - mu)^2)``:
the networks' own calibrated spreads plus how far their predictions lie apart, times one factor f
per target fitted on validation after theirs. Calibrating the networks first matters: one factor
for the pooled samples (the networks' noise spreads are 15-20x too small before calibration, their
disagreement is not) left methanol's NLL where one network has it (docs/results/ood-ethanol).

f comes out below 1 (0.54-0.68) because on validation the networks' mean is more accurate than
each network alone. That is only measured inside the validation split's feature distances: an
atom whose log feature distance (the mean of the networks') lies beyond the largest the networks
saw on validation (the mean of their ``novelty_limit``), and a structure's energy whose largest
atom distance lies beyond ``energy_novelty_limit``, gets ``max(f, 1)`` instead: the networks'
own calibrated spreads, which grow there, are not shrunk (far-out ammonia: force NLL 0.37 instead
of 2.03; docs/results/energy-split). Stress keeps f (its spreads carry no distance).
"""

from __future__ import annotations

import numpy as np

#: Targets the mixture combines: (prediction key, whether it is one array per structure).
TARGETS = (("energy", False), ("forces", True), ("stress", False))


def network_shares(samples: int, networks: int) -> list[int]:
    """How K ``samples`` split over ``networks``: evenly, at least one each (16 over 2: [8, 8]; 3: [2, 1])."""
    return [max(1, samples // networks + int(m < samples % networks)) for m in range(networks)]


#: The calibration key of the networks' largest validation feature distance, per target.
LIMIT_KEYS = {"forces": "novelty_limit", "energy": "energy_novelty_limit"}


def network_limit(calibration: dict, target: str) -> float | None:
    """The mean over a mixture's networks (``calibration["networks"]``) of the largest log feature
    distance of their validation split for ``target`` ("forces": per atom, "energy": a structure's
    largest); None for other targets or when a network has none (rate heads without distances)."""
    key = LIMIT_KEYS.get(target)
    limits = [c.get(key) for c in calibration.get("networks", [])] if key else []
    if not limits or any(v is None for v in limits):
        return None
    return float(np.mean(limits))


def factor_within(factor: float, novelty, limit: float | None):
    """The mixture's factor per entry: ``factor`` where ``novelty`` <= ``limit``, ``max(factor, 1)``
    beyond it (an array of ``novelty``'s shape); ``factor`` itself without a novelty or limit."""
    if novelty is None or limit is None:
        return factor
    return np.where(np.asarray(novelty, dtype=np.float64) > limit, max(factor, 1.0), factor)


def mix(outs: list[dict], calibration: dict, stochastic: bool) -> dict:
    """One prediction from the networks' ``outs`` (each as :meth:`BlipModel.predict` returns it,
    calibrated, with ``atom_novelty`` where the networks record distances): the mean, the mixture
    spread times the calibration's factor of each target (stress: its own, else the forces'; per
    entry :func:`factor_within` the networks' validation distances), and the networks' samples in
    order, each moved to the mean and its deviation from it times that factor. ``stochastic``
    False (K = 0): spreads zero, no samples."""
    out = {}
    novelty = [np.mean(v, axis=0) for v in zip(*(o["atom_novelty"] for o in outs))] \
        if all("atom_novelty" in o for o in outs) else None
    for key, per_structure in TARGETS:
        if key not in outs[0]:
            continue
        factor = float(calibration.get(key, calibration["forces"] if key == "stress" else 1.0))
        limit = network_limit(calibration, key) if novelty is not None else None
        parts = [_mix_one([o[key][i] for o in outs], [o[f"{key}_std"][i] for o in outs],
                          [o[f"{key}_samples"][:, i] if not per_structure else o[f"{key}_samples"][i] for o in outs],
                          _entry_factor(factor, key, novelty[i] if limit is not None else None, limit), stochastic)
                 for i in range(len(outs[0][key]))]
        mean, std, samples = (list(p) for p in zip(*parts)) if parts else ([], [], [])
        if per_structure:
            out.update({key: mean, f"{key}_std": std, f"{key}_samples": samples})
        else:
            k = sum(o[f"{key}_samples"].shape[0] for o in outs) if stochastic else 0
            out.update({key: np.array(mean), f"{key}_std": np.array(std),
                        f"{key}_samples": np.stack(samples, axis=1) if parts else np.zeros((k, 0))})
    if novelty is not None:
        out["atom_novelty"] = novelty
    return out


def _entry_factor(factor: float, key: str, atom_novelty, limit: float | None):
    """One structure's factor: per atom (n, 1) for forces, a number for energy (its largest atom's)."""
    if atom_novelty is None:
        return factor
    if key == "forces":
        return factor_within(factor, atom_novelty, limit)[:, None]
    return float(factor_within(factor, np.max(atom_novelty), limit))


def _mix_one(means: list, stds: list, samples: list, factor: float, stochastic: bool):
    """(mean, spread, samples) of one structure's value from the networks' values (same shapes)."""
    mean = np.mean(means, axis=0)
    if not stochastic:
        return mean, np.zeros_like(mean), np.concatenate(samples)[:0]
    variance = np.mean([s * s for s in stds], axis=0) + np.mean([(m - mean) ** 2 for m in means], axis=0)
    moved = np.concatenate([mean + factor * (s - mean) for s in samples])
    return mean, factor * np.sqrt(variance), moved
