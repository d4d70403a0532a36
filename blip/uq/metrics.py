"""Uncertainty-quality metrics for regression: NLL, calibration, sharpness, ranking.

Every function takes 1-D arrays of residuals ``err = reference - prediction``
and predicted **standard deviations** ``sigma`` (not variances) in the same
unit: eV for energies, eV/atom for energies per atom, eV/Angstrom for force
components.  Metrics that are errors or spreads (rmse, mae, sharpness, crps)
carry that unit; nll is in nats plus log(unit); the others are dimensionless.

Zero standard deviations (the noise-free MAP prediction) are handled
everywhere: a metric that is undefined for them returns ``None`` (JSON null),
never nan/inf and never an exception.  If *all* sigma are zero there is no
uncertainty estimate at all and every probabilistic metric is ``None``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

__all__ = [
    "METRIC_KEYS",
    "default_n_bins",
    "nll",
    "calibration_curve",
    "miscalibration_area",
    "rmse_vs_rmv",
    "ence",
    "spearman",
    "coverage",
    "sharpness",
    "crps_gaussian",
    "regression_metrics",
    "prediction_arrays",
    "evaluate_predictions",
]

#: Keys of the dict returned by :func:`regression_metrics`, in table order.
METRIC_KEYS = (
    "rmse", "mae", "nll", "miscalibration_area", "ence", "spearman",
    "coverage_68", "coverage_95", "sharpness", "crps", "n",
)

#: Grid size of expected proportions for the calibration curve (0.01 .. 0.99),
#: as in uncertainty-toolbox.
CALIBRATION_POINTS = 100
#: At most this many sigma bins for ENCE / RMSE-vs-RMV ...
MAX_BINS = 10
#: ... and at least this many points in each bin.
MIN_PER_BIN = 30


def _check(err, sigma=None):
    """Return float64 1-D copies of err (and sigma); reject bad input."""
    e = np.asarray(err, dtype=np.float64).ravel()
    if not np.all(np.isfinite(e)):
        raise ValueError("residuals contain NaN or inf")
    if sigma is None:
        return e
    s = np.asarray(sigma, dtype=np.float64).ravel()
    if s.shape != e.shape:
        raise ValueError(f"residuals ({e.size}) and sigma ({s.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("predicted standard deviations contain NaN or inf")
    if np.any(s < 0):
        raise ValueError("predicted standard deviations must be >= 0")
    return e, s


def _no_uncertainty(s: np.ndarray) -> bool:
    """True if there is nothing to score: no points or all sigma == 0."""
    return s.size == 0 or not np.any(s > 0)


def default_n_bins(n: int) -> int:
    """Default number of equal-count sigma bins for ``n`` points.

    ``min(10, n // 30)`` but at least 1: ten bins for n >= 300, fewer for
    small sets so that every bin holds >= 30 points and its RMSE is not
    dominated by noise (a bin of k points has a relative RMSE noise of about
    1/sqrt(2k), which biases ENCE upwards).
    """
    return max(1, min(MAX_BINS, int(n) // MIN_PER_BIN))


def _abs_z(e: np.ndarray, s: np.ndarray) -> np.ndarray:
    """|err|/sigma, with 0/0 -> 0 and x/0 -> inf where sigma == 0."""
    a = np.abs(e)
    z = np.full_like(a, np.inf)
    pos = s > 0
    z[pos] = a[pos] / s[pos]
    z[~pos & (a == 0)] = 0.0
    return z


def _interval_z(level):
    """Half-width in units of sigma of the central Gaussian interval of probability ``level``."""
    return stats.norm.ppf(0.5 + 0.5 * np.asarray(level, dtype=np.float64))


# --------------------------------------------------------------------------- #
# Proper scoring rules
# --------------------------------------------------------------------------- #
def nll(err, sigma) -> float | None:
    """Mean Gaussian negative log-likelihood of ``err`` under N(0, sigma^2).

    ``mean(0.5*log(2*pi*sigma^2) + err^2 / (2*sigma^2))``; ``sigma`` is a
    standard deviation.  ``None`` if any sigma is 0 (the likelihood is
    degenerate) or there are no points.
    """
    e, s = _check(err, sigma)
    if s.size == 0 or np.any(s <= 0):
        return None
    var = s * s
    return float(np.mean(0.5 * np.log(2.0 * np.pi * var) + e * e / (2.0 * var)))


def crps_gaussian(err, sigma) -> float | None:
    """Mean continuous ranked probability score of N(0, sigma^2) at ``err``.

    Closed form ``sigma * (z*(2*Phi(z)-1) + 2*phi(z) - 1/sqrt(pi))`` with
    ``z = err/sigma``; same unit as ``err``.  For sigma == 0 the score is its
    limit ``|err|`` (the MAE of a point prediction).  ``None`` if all sigma
    are 0 or there are no points.
    """
    e, s = _check(err, sigma)
    if _no_uncertainty(s):
        return None
    out = np.abs(e)
    pos = s > 0
    z = e[pos] / s[pos]
    out[pos] = s[pos] * (
        z * (2.0 * stats.norm.cdf(z) - 1.0) + 2.0 * stats.norm.pdf(z) - 1.0 / math.sqrt(math.pi)
    )
    return float(np.mean(out))


# --------------------------------------------------------------------------- #
# Calibration
# --------------------------------------------------------------------------- #
def calibration_curve(err, sigma, n: int = CALIBRATION_POINTS):
    """Expected and observed coverage of central Gaussian intervals.

    For ``n`` expected proportions q equally spaced on [0.01, 0.99] (the
    uncertainty-toolbox grid) the observed proportion is the fraction of
    points with ``|err| <= Phi^-1(0.5 + q/2) * sigma`` (sigma a standard
    deviation).  Returns ``(expected, observed)``, both shape (n,).  Points
    with sigma == 0 count as inside only if their error is exactly 0.
    """
    e, s = _check(err, sigma)
    expected = np.linspace(0.01, 0.99, int(n))
    if e.size == 0:
        return expected, np.full_like(expected, np.nan)
    z = np.sort(_abs_z(e, s))
    inside = np.searchsorted(z, _interval_z(expected), side="right")
    return expected, inside / z.size


def _area_abs_piecewise_linear(x, d) -> float:
    """Integral of |d(x)| for d linear between samples (sign changes handled)."""
    x = np.asarray(x, dtype=np.float64)
    d = np.asarray(d, dtype=np.float64)
    h = np.diff(x)
    a, b = np.abs(d[:-1]), np.abs(d[1:])
    same = d[:-1] * d[1:] >= 0
    seg = np.where(same, 0.5 * h * (a + b), 0.0)
    cross = ~same  # two triangles meeting at the zero crossing
    seg[cross] = 0.5 * h[cross] * (a[cross] ** 2 + b[cross] ** 2) / (a[cross] + b[cross])
    return float(seg.sum())


def miscalibration_area(err, sigma, n_bins: int = CALIBRATION_POINTS) -> float | None:
    """Area between observed and expected coverage curves (dimensionless, 0 = ideal).

    Uses :func:`calibration_curve` with ``n_bins`` (default 100) expected
    proportions on [0.01, 0.99] and the trapezoid rule on
    ``|observed - expected|``, splitting segments where the curves cross, as
    uncertainty-toolbox does.  ``sigma`` is a standard deviation.  ``None``
    if all sigma are 0 or there are no points.
    """
    e, s = _check(err, sigma)
    if _no_uncertainty(s):
        return None
    expected, observed = calibration_curve(e, s, n_bins)
    return _area_abs_piecewise_linear(expected, observed - expected)


def coverage(err, sigma, level: float) -> float | None:
    """Fraction of points inside the central Gaussian interval of probability ``level``.

    Counts ``|err| <= Phi^-1(0.5 + level/2) * sigma`` (z = 0.994 for 0.68,
    1.960 for 0.95); ideal value is ``level``.  ``None`` if all sigma are 0
    or there are no points.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"coverage level must be in (0, 1), got {level}")
    e, s = _check(err, sigma)
    if _no_uncertainty(s):
        return None
    return float(np.mean(_abs_z(e, s) <= _interval_z(level)))


def rmse_vs_rmv(err, sigma, n_bins: int | None = None):
    """Per-bin root mean variance and RMSE for ENCE and reliability plots.

    Points are sorted by sigma (stable sort) and split into ``n_bins``
    equal-count bins (sizes differ by at most one; the first bins get the
    extra points).  Default ``n_bins`` is :func:`default_n_bins` (n):
    ``min(10, n // 30)``, at least 1.  Returns ``(rmv, rmse, counts)``:
    ``rmv_k = sqrt(mean sigma^2)`` (a standard deviation, not a variance) and
    ``rmse_k = sqrt(mean err^2)``, both in the unit of ``err``.
    """
    e, s = _check(err, sigma)
    if e.size == 0:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=int)
    if n_bins is None:
        n_bins = default_n_bins(e.size)
    n_bins = int(min(max(1, n_bins), e.size))
    order = np.argsort(s, kind="stable")
    rmv, rmse, counts = [], [], []
    for idx in np.array_split(order, n_bins):
        rmv.append(math.sqrt(np.mean(s[idx] ** 2)))
        rmse.append(math.sqrt(np.mean(e[idx] ** 2)))
        counts.append(idx.size)
    return np.array(rmv), np.array(rmse), np.array(counts)


def ence(err, sigma, n_bins: int | None = None) -> float | None:
    """Expected normalised calibration error (dimensionless, 0 = ideal).

    ``mean_k |RMV_k - RMSE_k| / RMV_k`` over equal-count sigma bins from
    :func:`rmse_vs_rmv` (default ``min(10, n // 30)`` bins, at least 1).
    An over-dispersed sigma (c times too large) gives ``1 - 1/c``.  ``None``
    if a bin has RMV == 0 (all its sigma are 0) or there are no points.
    """
    rmv, rmse, _ = rmse_vs_rmv(err, sigma, n_bins)
    if rmv.size == 0 or np.any(rmv <= 0):
        return None
    return float(np.mean(np.abs(rmv - rmse) / rmv))


# --------------------------------------------------------------------------- #
# Ranking and sharpness
# --------------------------------------------------------------------------- #
def spearman(err, sigma) -> float | None:
    """Spearman rank correlation of ``|err|`` with ``sigma`` (in [-1, 1]).

    ``None`` when undefined: fewer than 2 points or a constant input
    (e.g. all sigma == 0).
    """
    e, s = _check(err, sigma)
    a = np.abs(e)
    if e.size < 2 or np.ptp(s) == 0 or np.ptp(a) == 0:
        return None
    rho = stats.spearmanr(a, s)[0]
    return None if not np.isfinite(rho) else float(rho)


def sharpness(sigma) -> float | None:
    """Root mean predicted variance ``sqrt(mean sigma^2)``: a standard deviation in the unit of err.

    ``None`` if all sigma are 0 or there are no points (no uncertainty to
    summarise; 0 would read as "infinitely sharp").
    """
    s = _check(np.zeros(np.size(sigma)), sigma)[1]
    if _no_uncertainty(s):
        return None
    return float(math.sqrt(np.mean(s * s)))


# --------------------------------------------------------------------------- #
# Aggregation
# --------------------------------------------------------------------------- #
def regression_metrics(err, sigma=None, n_bins: int | None = None) -> dict:
    """All metrics for one quantity, as a JSON-ready dict with keys :data:`METRIC_KEYS`.

    ``err`` are residuals (reference - prediction), ``sigma`` predicted
    standard deviations (``None`` = no uncertainty, same as all zeros).
    rmse, mae, sharpness, crps are in the unit of err; nll in nats;
    miscalibration_area, ence, spearman, coverage_68/95 dimensionless; n is
    the number of scored values.  Probabilistic entries are ``None`` when
    undefined (all sigma == 0); rmse/mae are ``None`` only for n == 0.
    """
    e = _check(err)
    s = np.zeros_like(e) if sigma is None else _check(e, sigma)[1]
    n = int(e.size)
    return {
        "rmse": float(math.sqrt(np.mean(e * e))) if n else None,
        "mae": float(np.mean(np.abs(e))) if n else None,
        "nll": nll(e, s),
        "miscalibration_area": miscalibration_area(e, s),
        "ence": ence(e, s, n_bins),
        "spearman": spearman(e, s) if not _no_uncertainty(s) else None,
        "coverage_68": coverage(e, s, 0.68),
        "coverage_95": coverage(e, s, 0.95),
        "sharpness": sharpness(s),
        "crps": crps_gaussian(e, s),
        "n": n,
    }


def _flat(x) -> np.ndarray:
    """Concatenate an array or a list of (n_i, 3) arrays into one flat float64 array."""
    if isinstance(x, (list, tuple)):
        parts = [np.asarray(a, dtype=np.float64).ravel() for a in x]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(x, dtype=np.float64).ravel()


def structure_novelty(atom_novelty) -> np.ndarray:
    """Each structure's largest per-atom log feature distance (G,) from a list of (n_i,) arrays:
    what widens its energy spread (the most unfamiliar atom dominates an energy's error)."""
    return np.array([float(np.max(v)) for v in atom_novelty])


def prediction_arrays(ref_energy, pred_energy, energy_std, ref_forces, pred_forces,
                      forces_std, n_atoms, atom_novelty=None) -> dict:
    """Flat reference/prediction/std arrays per quantity (input for plots and metrics).

    Energies are per structure (eV), shape (N,); forces are lists of (n_i, 3)
    arrays (eV/Angstrom) scored per Cartesian component; ``*_std`` are
    standard deviations (``None`` = no uncertainty, treated as zeros).
    Returns ``{"energy": {"ref", "pred", "std"}, "energy_per_atom": {...}
    (eV/atom), "forces": {...}}``; a quantity without reference labels
    (``ref_* is None`` or ``pred_* is None``) is omitted. ``atom_novelty``: a list of (n_i,)
    per-atom log feature distances (``predict(..., novelty=True)``); forces then also carry
    ``novelty``, each component's atom's, and ``mean_novelty``, the mean over its structure's
    atoms; energies carry each structure's largest.
    """
    out = {}
    if ref_energy is not None and pred_energy is not None:
        ref, pred = _flat(ref_energy), _flat(pred_energy)
        std = np.zeros_like(pred) if energy_std is None else _flat(energy_std)
        if not (ref.shape == pred.shape == std.shape):
            raise ValueError("energy reference, prediction and std differ in length")
        out["energy"] = {"ref": ref, "pred": pred, "std": std}
        nat = _flat(n_atoms)
        if nat.shape != ref.shape:
            raise ValueError("n_atoms and energies differ in length")
        if np.any(nat <= 0):
            raise ValueError("n_atoms must be positive")
        out["energy_per_atom"] = {"ref": ref / nat, "pred": pred / nat, "std": std / nat}
        if atom_novelty is not None:
            out["energy"]["novelty"] = out["energy_per_atom"]["novelty"] = structure_novelty(atom_novelty)
    if ref_forces is not None and pred_forces is not None:
        ref, pred = _flat(ref_forces), _flat(pred_forces)
        std = np.zeros_like(pred) if forces_std is None else _flat(forces_std)
        if not (ref.shape == pred.shape == std.shape):
            raise ValueError("force reference, prediction and std differ in size")
        out["forces"] = {"ref": ref, "pred": pred, "std": std}
        if atom_novelty is not None:
            out["forces"]["novelty"] = np.repeat(_flat(atom_novelty), 3)
            out["forces"]["mean_novelty"] = np.concatenate(
                [np.full(3 * len(v), float(np.mean(v))) for v in atom_novelty]) if len(atom_novelty) else np.zeros(0)
    return out


def evaluate_predictions(ref_energy, pred_energy, energy_std, ref_forces, pred_forces,
                         forces_std, n_atoms) -> dict:
    """Metrics for energy (eV), energy per atom (eV/atom) and force components (eV/Angstrom).

    Arguments as in :func:`prediction_arrays` (``*_std`` are standard
    deviations).  Returns ``{"energy": {...}, "energy_per_atom": {...},
    "forces": {...}}`` with the keys of :func:`regression_metrics`; a
    quantity without labels is omitted.  Residuals are reference - prediction.
    """
    arrays = prediction_arrays(ref_energy, pred_energy, energy_std, ref_forces,
                               pred_forces, forces_std, n_atoms)
    return {k: regression_metrics(a["ref"] - a["pred"], a["std"]) for k, a in arrays.items()}
