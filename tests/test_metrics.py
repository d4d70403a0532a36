"""Uncertainty metrics, recalibration and report writing (fast, no model needed)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

if importlib.util.find_spec("blip") is None:  # allow running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip.report import format_table, write_report
from blip.uq import metrics as M
from blip.uq.recalibration import apply_scale, fit_scale

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)  # 0.9189385...


# --------------------------------------------------------------------------- #
# Hand-computed values on tiny arrays
# --------------------------------------------------------------------------- #
def test_nll_hand_values():
    # err = [0, 1], sigma = [1, 1]:
    #   terms 0.5*log(2pi) + 0 and 0.5*log(2pi) + 1/2 -> mean 0.918939 + 0.25
    assert M.nll([0.0, 1.0], [1.0, 1.0]) == pytest.approx(HALF_LOG_2PI + 0.25, rel=1e-12)
    assert M.nll([0.0, 1.0], [1.0, 1.0]) == pytest.approx(1.1689385, abs=1e-7)
    # err = 2, sigma = 2: 0.5*log(2pi*4) + 4/8 = 0.918939 + log 2 + 0.5 = 2.112086
    assert M.nll([2.0], [2.0]) == pytest.approx(2.1120857, abs=1e-7)
    # sign of the residual does not matter
    assert M.nll([-2.0], [2.0]) == M.nll([2.0], [2.0])


def test_coverage_hand_values():
    err = np.array([0.5, -1.5, 2.5, -0.1])
    sigma = np.ones(4)
    # 68 % interval: |z| <= Phi^-1(0.84) = 0.99446 -> 0.5 and 0.1 inside -> 2/4
    assert M.coverage(err, sigma, 0.68) == pytest.approx(0.5)
    # 95 % interval: |z| <= 1.95996 -> 0.5, 1.5, 0.1 inside -> 3/4
    assert M.coverage(err, sigma, 0.95) == pytest.approx(0.75)
    # doubling sigma: 68 % half-width 1.989 -> 0.5, 1.5, 0.1 inside -> 3/4
    assert M.coverage(err, 2 * sigma, 0.68) == pytest.approx(0.75)


def test_ence_hand_values():
    # Case 1, 2 bins of 2: sigma [1,1 | 2,2], err [1,-1 | 3,-1]
    #   bin 1: RMV 1, RMSE 1           -> 0
    #   bin 2: RMV 2, RMSE sqrt(10/2)=sqrt5 -> |2 - 2.23607|/2 = 0.118034
    #   ENCE = 0.059017
    assert M.ence([1, -1, 3, -1], [1, 1, 2, 2], n_bins=2) == pytest.approx(
        (math.sqrt(5) - 2) / 4, rel=1e-12)
    # Case 2, unsorted input, 3 bins of 2: sigma [3,1,2,1,3,2], err [0,2,2,0,3,-2]
    #   sigma 1 (idx 1,3): err 2,0  -> RMSE sqrt2, RMV 1 -> sqrt2 - 1  = 0.414214
    #   sigma 2 (idx 2,5): err 2,-2 -> RMSE 2,     RMV 2 -> 0
    #   sigma 3 (idx 0,4): err 0,3  -> RMSE 3/sqrt2, RMV 3 -> 1 - 1/sqrt2 = 0.292893
    #   ENCE = (sqrt2 - 1/sqrt2)/3 = 1/(3 sqrt2) = 0.235702
    sigma = [3, 1, 2, 1, 3, 2]
    err = [0, 2, 2, 0, 3, -2]
    assert M.ence(err, sigma, n_bins=3) == pytest.approx(1 / (3 * math.sqrt(2)), rel=1e-12)
    rmv, rmse, counts = M.rmse_vs_rmv(err, sigma, n_bins=3)
    np.testing.assert_allclose(rmv, [1, 2, 3])
    np.testing.assert_allclose(rmse, [math.sqrt(2), 2, 3 / math.sqrt(2)])
    np.testing.assert_array_equal(counts, [2, 2, 2])
    # Case 3, one bin: RMV = sqrt((1+4)/2), RMSE = sqrt((1+1)/2) = 1
    #   |sqrt(2.5) - 1| / sqrt(2.5) = 1 - 1/sqrt(2.5) = 0.367544
    assert M.ence([1, 1], [1, 2], n_bins=1) == pytest.approx(1 - 1 / math.sqrt(2.5))


def test_default_bins():
    assert M.default_n_bins(5) == 1
    assert M.default_n_bins(95) == 3
    assert M.default_n_bins(300) == 10
    assert M.default_n_bins(10**6) == 10
    rmv, _, counts = M.rmse_vs_rmv(np.ones(1000), np.linspace(1, 2, 1000))
    assert rmv.size == 10 and counts.sum() == 1000


def test_miscalibration_area_hand_value():
    # all residuals 0: observed proportion 1 at every q; area = int_{0.01}^{0.99} (1-q) dq = 0.49
    # (the integrand is linear, so the trapezoid rule is exact)
    assert M.miscalibration_area(np.zeros(10), np.ones(10)) == pytest.approx(0.49, abs=1e-12)
    exp, obs = M.calibration_curve(np.zeros(10), np.ones(10), n=100)
    assert exp[0] == pytest.approx(0.01) and exp[-1] == pytest.approx(0.99) and exp.size == 100
    np.testing.assert_array_equal(obs, 1.0)


def test_crps_sharpness_spearman_hand_values():
    # CRPS of N(0,1) at 0: 2*phi(0) - 1/sqrt(pi) = 0.797885 - 0.564190 = 0.233695
    assert M.crps_gaussian([0.0], [1.0]) == pytest.approx(0.2336950, abs=1e-7)
    # CRPS scales with sigma for z fixed; sigma == 0 entries score |err|
    assert M.crps_gaussian([0.0], [3.0]) == pytest.approx(3 * 0.2336950, abs=1e-6)
    assert M.crps_gaussian([0.0, 2.0], [1.0, 0.0]) == pytest.approx((0.2336950 + 2) / 2, abs=1e-7)
    # sharpness = sqrt((1 + 4 + 4 + 16)/4) = 2.5
    assert M.sharpness([1, 2, 2, 4]) == pytest.approx(2.5)
    # |err| proportional to sigma (signs mixed) -> rank correlation exactly 1
    sigma = np.array([0.3, 0.1, 0.7, 0.2, 0.5])
    sign = np.array([1, -1, -1, 1, 1])
    assert M.spearman(2.5 * sigma * sign, sigma) == pytest.approx(1.0)
    assert M.spearman(1 / sigma, sigma) == pytest.approx(-1.0)


# --------------------------------------------------------------------------- #
# Statistical checks on Gaussian samples
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def gaussian_samples():
    rng = np.random.default_rng(1234)
    n = 200_000
    sigma = rng.lognormal(mean=-2.0, sigma=0.8, size=n)  # heteroscedastic
    err = sigma * rng.standard_normal(n)
    return err, sigma


def test_perfectly_calibrated(gaussian_samples):
    err, sigma = gaussian_samples
    assert M.miscalibration_area(err, sigma) < 0.01
    assert M.ence(err, sigma) < 0.05
    assert M.coverage(err, sigma, 0.68) == pytest.approx(0.68, abs=0.005)
    assert M.coverage(err, sigma, 0.95) == pytest.approx(0.95, abs=0.003)
    # E[NLL] under the true distribution = 0.5*log(2pi) + E[log sigma] + 1/2
    expected_nll = HALF_LOG_2PI + np.mean(np.log(sigma)) + 0.5
    assert M.nll(err, sigma) == pytest.approx(expected_nll, abs=0.01)


def test_overdispersed_sigma_matches_analytic(gaussian_samples):
    err, sigma = gaussian_samples
    c = 3.0

    # If sigma is c times too large, the observed proportion inside the nominal
    # q-interval is P(|Z| <= c * Phi^-1(0.5 + q/2)) = 2*Phi(c*t) - 1.
    def gap(q):
        t = stats.norm.ppf(0.5 + q / 2)
        return abs(2 * stats.norm.cdf(c * t) - 1 - q)

    analytic, _ = integrate.quad(gap, 0, 1, limit=200)
    # the metric integrates over the grid [0.01, 0.99] only; the two end strips
    # contribute < 2e-4 here, sampling noise ~1e-3
    area = M.miscalibration_area(err, c * sigma)
    assert area == pytest.approx(analytic, abs=3e-3)
    assert 0.25 < analytic < 0.4  # sanity: clearly miscalibrated
    # every bin has RMV = c * RMSE -> |RMV - RMSE|/RMV = 1 - 1/c = 2/3
    assert M.ence(err, c * sigma) == pytest.approx(2 / 3, abs=0.01)
    assert M.coverage(err, c * sigma, 0.68) > 0.99


def test_fit_scale_recovers_factor():
    rng = np.random.default_rng(7)
    n = 50_000
    sigma = rng.uniform(0.05, 0.5, size=n)
    err = rng.normal(0.0, 2.0 * sigma)
    s = fit_scale(err, sigma)
    assert s == pytest.approx(2.0, rel=0.02)
    # zero-sigma entries are ignored, and none at all gives 1.0
    assert fit_scale(np.append(err, 5.0), np.append(sigma, 0.0)) == pytest.approx(s)
    assert fit_scale([1.0, 2.0], [0.0, 0.0]) == 1.0
    # s minimises the NLL
    scaled = apply_scale(sigma, s)
    assert M.nll(err, scaled) < min(M.nll(err, 0.95 * scaled), M.nll(err, 1.05 * scaled))
    assert M.miscalibration_area(err, scaled) < 0.02
    out = apply_scale([np.ones((2, 3)), np.ones((1, 3))], 2.0)
    assert out[0].shape == (2, 3) and np.all(out[1] == 2.0)


# --------------------------------------------------------------------------- #
# Zero sigma (MAP prediction) and aggregation
# --------------------------------------------------------------------------- #
PROB_KEYS = ("nll", "miscalibration_area", "ence", "spearman", "coverage_68",
             "coverage_95", "sharpness", "crps")


def test_zero_sigma_gives_none():
    err = np.array([0.1, -0.2, 0.3])
    for sigma in (np.zeros(3), None):
        m = M.regression_metrics(err, sigma)
        assert set(m) == set(M.METRIC_KEYS)
        assert m["rmse"] == pytest.approx(math.sqrt((0.01 + 0.04 + 0.09) / 3))
        assert m["mae"] == pytest.approx(0.2)
        assert m["n"] == 3
        for k in PROB_KEYS:
            assert m[k] is None, k
        json.dumps(m, allow_nan=False)
    # partly zero: the NLL is undefined, counting metrics still work
    m = M.regression_metrics(err, [0.0, 1.0, 1.0])
    assert m["nll"] is None
    assert m["coverage_95"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)


def test_evaluate_predictions_structure():
    rng = np.random.default_rng(0)
    n_atoms = np.array([2, 3, 4])
    ref_e = rng.normal(size=3)
    pred_e = ref_e + 0.1
    e_std = np.full(3, 0.1)
    ref_f = [rng.normal(size=(k, 3)) for k in n_atoms]
    pred_f = [f + rng.normal(scale=0.05, size=f.shape) for f in ref_f]
    f_std = [np.full(f.shape, 0.05) for f in ref_f]
    res = M.evaluate_predictions(ref_e, pred_e, e_std, ref_f, pred_f, f_std, n_atoms)
    assert list(res) == ["energy", "energy_per_atom", "forces"]
    for v in res.values():
        assert set(v) == set(M.METRIC_KEYS)
    assert res["forces"]["n"] == 3 * n_atoms.sum()
    assert res["energy"]["rmse"] == pytest.approx(0.1)
    assert res["energy_per_atom"]["mae"] == pytest.approx(np.mean(0.1 / n_atoms))
    json.dumps(res, allow_nan=False)
    # no energy labels -> energy keys omitted; MAP (std None) -> None metrics
    res = M.evaluate_predictions(None, pred_e, None, ref_f, pred_f, None, n_atoms)
    assert list(res) == ["forces"]
    assert res["forces"]["nll"] is None and res["forces"]["rmse"] > 0


def test_bad_input_raises():
    with pytest.raises(ValueError):
        M.nll([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        M.regression_metrics([np.nan], [1.0])
    with pytest.raises(ValueError):
        M.coverage([1.0], [-1.0], 0.68)


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #
def _fake_set(rng, n_struct=20, with_std=True):
    n_atoms = rng.integers(2, 6, size=n_struct)
    ref_e = rng.normal(-10, 3, size=n_struct)
    e_std = rng.uniform(0.02, 0.1, size=n_struct)
    pred_e = ref_e + e_std * rng.standard_normal(n_struct)
    ref_f = [rng.normal(size=(k, 3)) for k in n_atoms]
    f_std = [rng.uniform(0.01, 0.1, size=(k, 3)) for k in n_atoms]
    pred_f = [f + s * rng.standard_normal(f.shape) for f, s in zip(ref_f, f_std)]
    if not with_std:
        e_std, f_std = None, None
    args = (ref_e, pred_e, e_std, ref_f, pred_f, f_std, n_atoms)
    return M.evaluate_predictions(*args), M.prediction_arrays(*args)


def test_write_report(tmp_path):
    metrics, arrays = _fake_set(np.random.default_rng(3))
    arrays["forces"]["std_recalibrated"] = 1.1 * arrays["forces"]["std"]
    paths = write_report(metrics, tmp_path / "rep", arrays)
    names = {p.name for p in paths}
    for q in ("energy", "energy_per_atom", "forces"):
        for kind in ("parity", "calibration", "rmse_rmv", "error_sigma"):
            assert f"{q}_{kind}.png" in names
    assert "report.md" in names
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| forces |" in md and "(forces_parity.png)" in md and "miscalibration_area" in md
    assert not list((tmp_path / "rep").glob("*.tmp"))


def test_write_report_zero_sigma(tmp_path):
    metrics, arrays = _fake_set(np.random.default_rng(4), with_std=False)
    paths = write_report(metrics, tmp_path, arrays)
    names = sorted(p.name for p in paths)
    assert names == ["energy_parity.png", "energy_per_atom_parity.png",
                     "forces_parity.png", "report.md"]
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].split()[0] == "quantity"
    assert [ln.split()[0] for ln in lines[2:5]] == ["energy", "energy_per_atom", "forces"]
    assert lines[4].split()[4] == "-"  # forces nll is None (columns: quantity n rmse mae nll)
    assert lines[4].split()[2] != "-"  # rmse still computed


def test_format_table_digits():
    m = {"energy": M.regression_metrics([0.123456, -0.2], [0.1, 0.3]), "cost": 1.5}
    table = format_table(m)
    row = table.splitlines()[2].split()
    assert row[0] == "energy" and row[1] == "2"
    assert row[2] == f"{math.sqrt((0.123456**2 + 0.04) / 2):.4g}"
    assert "cost" not in table


def test_evaluate_names_structures_whose_prediction_overflowed():
    """Far out a float32 network can overflow: evaluate (and so recalibrate and `blip evaluate`)
    says which structures, in one line, instead of failing inside a metric."""
    from blip.data import read_labelled
    from blip.errors import DataError
    from blip.evaluate import evaluate_structures

    structures = read_labelled(Path(__file__).parent / "data" / "acac_small.xyz")[:3]

    class Overflowing:
        def predict(self, atoms, **kwargs):
            forces = [np.zeros((len(a), 3)) for a in atoms]
            std = [np.full((len(a), 3), 0.1) for a in atoms]
            std[1][0, 2] = np.inf
            return {"energy": np.zeros(3), "energy_std": np.full(3, 0.1), "forces": forces, "forces_std": std}

    with pytest.raises(DataError, match=r"far.xyz: .* not finite for 1 structure\(s\) \(structures 1\)"):
        evaluate_structures(Overflowing(), structures, source="far.xyz")
