"""``blip md``: NVE energy conservation, the uncertainty stop, faults, the command line."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

import blip
from blip.calculator import BlipCalculator, max_atom_force_std
from blip.cli import main
from blip.errors import DataError
from blip.md import MDFault, MDSettings, run_md

from conftest import DATA, lj_si_cells


SAMPLES = 8


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return blip.load(tiny_model_path)


@pytest.fixture(scope="module")
def equilibrium():
    return ase.io.read(DATA / "acac_small.xyz", ":")


def compressed(atoms, factor=0.6):
    """All interatomic distances scaled by ``factor``: far outside the training data."""
    a = atoms.copy()
    a.positions = (a.positions - a.positions.mean(0)) * factor
    return a


@pytest.fixture(scope="module")
def threshold(model, equilibrium):
    """Twice the largest max-per-atom force std over the equilibrium structures (eV/A)."""
    calc = BlipCalculator(model, samples=SAMPLES, seed=0)
    stds = []
    for a in equilibrium:
        a = a.copy()
        a.calc = calc
        a.get_forces()
        stds.append(max_atom_force_std(calc.results["forces_std"]))
    return 2.0 * max(stds)


def test_nve_in_map_mode_conserves_energy(model, equilibrium):
    # 40 velocity-Verlet steps of 0.5 fs at 300 K, float64 model, MAP forces.
    # Tolerance: total energy spread < 10 meV (0.7 meV/atom) and < 2 % of the potential
    # energy's own spread; measured ~1.3 meV against ~0.6 eV.
    s = MDSettings(steps=40, temperature_K=300, timestep_fs=0.5, ensemble="nve", every=1000, log_every=1,
                   samples=2, dtype="float64", seed=0)
    result = run_md(model, equilibrium[0], s, keep_frames=True)
    assert result.status == "completed" and result.steps_done == 40 and len(result.frames) == 41
    total = np.array([f.info["total_energy"] for f in result.frames])
    potential = np.array([f.get_potential_energy() for f in result.frames])
    drift = np.ptp(total)
    assert np.ptp(potential) > 0.05  # the molecule really moves
    assert drift < 0.010 and drift < 0.02 * np.ptp(potential), drift


def test_uncertainty_stop_triggers_far_from_equilibrium(model, equilibrium, threshold, tmp_path):
    s = MDSettings(steps=20, temperature_K=300, timestep_fs=0.5, max_force_std=threshold, every=5,
                   samples=SAMPLES, seed=0)
    traj = tmp_path / "far.xyz"
    result = run_md(model, compressed(equilibrium[0]), s, trajectory=traj)
    assert result.status == "uncertain" and result.steps_done == 0
    frames = ase.io.read(traj, ":")
    assert len(frames) == 1  # the offending frame is saved
    assert frames[-1].info["flagged"] and frames[-1].info["max_force_std"] > threshold
    assert frames[-1].info["step"] == 0 and "stopped at step 0" in result.message


def test_uncertainty_stop_stays_quiet_at_equilibrium(model, equilibrium, threshold, tmp_path):
    s = MDSettings(steps=20, temperature_K=300, timestep_fs=0.5, max_force_std=threshold, every=5,
                   samples=SAMPLES, seed=0)
    traj = tmp_path / "eq.xyz"
    result = run_md(model, equilibrium[2], s, trajectory=traj)
    assert result.status == "completed" and result.steps_done == 20 and result.n_flagged == 0
    frames = ase.io.read(traj, ":")
    assert [f.info["step"] for f in frames] == [0, 5, 10, 15, 20]
    for f in frames:
        assert f.info["std_step"] == f.info["step"]
        assert 0 < f.info["max_force_std"] <= threshold and f.info["energy_std"] > 0
        assert f.info["temperature_K"] > 0 and "momenta" in f.arrays
        assert f.get_potential_energy() < 0 and f.get_forces().shape == (len(f), 3)


@pytest.mark.parametrize("adaptive", [0.5, None])
def test_adaptive_watch_checks_every_step_once_close_to_the_threshold(model, equilibrium, adaptive):
    calc = BlipCalculator(model, samples=SAMPLES, seed=0)
    start = equilibrium[1].copy()
    start.calc = calc
    start.get_forces()
    sigma0 = max_atom_force_std(calc.results["forces_std"])
    # sigma at step 0 is 2/3 of the threshold: above the adaptive fraction, below the stop
    s = MDSettings(steps=3, temperature_K=0, timestep_fs=0.1, max_force_std=1.5 * sigma0, every=1000,
                   log_every=1, adaptive=adaptive, samples=SAMPLES, seed=0)
    result = run_md(model, equilibrium[1], s, keep_frames=True)
    assert result.status == "completed" and len(result.frames) == 4
    checked = [f.info["std_step"] for f in result.frames]
    assert checked == ([0, 1, 2, 3] if adaptive else [0, 0, 0, 0])


def test_watch_takes_at_most_watch_samples_unless_told(tiny_model_path, equilibrium):
    # the step-0 check's max force std is that of K = min(WATCH_SAMPLES, uq.samples) samples
    # (fixed seed), not of the model's K = 16
    from blip.md import WATCH_SAMPLES

    model = blip.load(tiny_model_path)
    model.config["uq"]["samples"] = 16

    def checked(samples):
        s = MDSettings(steps=1, temperature_K=0, timestep_fs=0.1, every=1000, log_every=1, samples=samples, seed=0)
        return run_md(model, equilibrium[0], s, keep_frames=True).frames[0].info["max_force_std"]

    def direct(samples):
        calc = BlipCalculator(model, samples=samples, seed=0, mode="sample")  # the watch's spread is the calculator's
        calc.calculate(equilibrium[0].copy(), ["energy", "forces"])
        return max_atom_force_std(calc.results["forces_std"])

    assert WATCH_SAMPLES == 8
    assert checked(None) == pytest.approx(direct(8), rel=1e-6)
    assert checked(16) == pytest.approx(direct(16), rel=1e-6)
    assert abs(direct(16) - direct(8)) > 1e-3 * direct(8)
    model.config["uq"]["samples"] = 4
    assert checked(None) == pytest.approx(direct(4), rel=1e-6)


def test_flag_only_marks_frames_and_keeps_going(model, equilibrium, threshold, tmp_path):
    s = MDSettings(steps=4, temperature_K=0, timestep_fs=0.1, max_force_std=threshold, every=2, log_every=4,
                   flag_only=True, samples=SAMPLES, seed=0)
    traj = tmp_path / "flag.xyz"
    result = run_md(model, compressed(equilibrium[0]), s, trajectory=traj)
    assert result.status == "completed" and result.steps_done == 4 and result.n_flagged >= 2
    frames = ase.io.read(traj, ":")
    assert [f.info["flagged"] for f in frames].count(True) == result.n_flagged


def test_unknown_element_fails_before_step_zero(model, equilibrium, tmp_path):
    a = equilibrium[0].copy()
    a.numbers[0] = 14
    traj = tmp_path / "si.xyz"
    with pytest.raises(DataError, match="Si"):
        run_md(model, a, MDSettings(steps=5), trajectory=traj)
    assert not traj.exists() and not list(tmp_path.iterdir())  # nothing written


def test_nan_energy_stops_with_last_good_frame(model, equilibrium, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = model.predict

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 6:  # the network "breaks" after a few steps
            out["energy"] = out["energy"] * np.nan
        return out

    monkeypatch.setattr(model, "predict", broken)
    traj = tmp_path / "nan.xyz"
    s = MDSettings(steps=20, temperature_K=300, timestep_fs=0.5, every=100, log_every=100, seed=0)
    with pytest.raises(MDFault, match="energy is nan") as info:
        run_md(model, equilibrium[0], s, trajectory=traj)
    frames = ase.io.read(traj, ":")
    bad_step = int(str(info.value).split("step ")[1].split(":")[0])
    assert frames[-1].info["step"] == bad_step - 1 and "last good frame" in frames[-1].info["note"]
    assert np.isfinite(frames[-1].get_potential_energy())


def test_exploding_temperature_is_a_fault(model, equilibrium, tmp_path):
    # Squeezed molecule in NVE: the potential energy turns into heat within a few steps.
    s = MDSettings(steps=50, temperature_K=300, timestep_fs=0.5, ensemble="nve", every=1000,
                   max_temperature_K=1200, seed=0)
    traj = tmp_path / "hot.xyz"
    with pytest.raises(MDFault, match="exceeds 1200 K") as info:
        run_md(model, compressed(equilibrium[0], 0.6), s, trajectory=traj)
    frames = ase.io.read(traj, ":")
    assert frames[-1].info["temperature_K"] <= 1200 and "last good frame" in frames[-1].info["note"]
    assert info.value.result.status == "fault"


def test_command_line(tiny_model_path, tmp_path, capsys):
    traj = tmp_path / "cli.xyz"
    code = main(["md", str(tiny_model_path), str(DATA / "acac_small.xyz"), "--steps", "6", "--every", "3",
                 "--temperature", "300", "--timestep", "0.5", "--ensemble", "nvt", "--samples", "4",
                 "--max-force-std", "100", "-o", str(traj), "--quiet"])
    assert code == 0
    frames = ase.io.read(traj, ":")
    assert [f.info["step"] for f in frames] == [0, 3, 6]
    assert "completed 6 steps" in capsys.readouterr().err
    bad = tmp_path / "si.xyz"
    a = ase.io.read(DATA / "si_small.xyz", 0)
    ase.io.write(bad, a)
    assert main(["md", str(tiny_model_path), str(bad), "--steps", "2", "-o", str(tmp_path / "x.xyz"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip: error:") and "Si" in err and "Traceback" not in err
    assert main(["md", str(tiny_model_path), str(DATA / "acac_small.xyz"), "--every", "0",
                 "-o", str(tmp_path / "y.xyz"), "--quiet"]) == 2
    assert not (tmp_path / "x.xyz").exists() and not (tmp_path / "y.xyz").exists()


def test_npt_keeps_the_cell_finite_and_changes_the_volume(lj_si_model):
    # 30 MTK steps of 1 fs at 300 K and 5 GPa (a fast barostat: pdamp 50 fs) from a cell that is
    # not at that pressure: the volume must move, every frame keeps a finite cell and its stress.
    start = lj_si_cells(1, seed=3)[0]
    s = MDSettings(steps=30, temperature_K=300, timestep_fs=1.0, ensemble="npt", pressure_GPa=5.0, pdamp_fs=50,
                   tdamp_fs=20, every=10, log_every=5, samples=2, seed=0)
    result = run_md(lj_si_model, start, s, keep_frames=True)
    assert result.status == "completed" and len(result.frames) == 7
    volumes = np.array([f.info["volume_A3"] for f in result.frames])
    assert np.all(np.isfinite([f.cell.array for f in result.frames]))
    np.testing.assert_allclose(volumes, [f.get_volume() for f in result.frames])
    assert abs(volumes[-1] - start.get_volume()) > 1e-3 * start.get_volume()
    assert result.frames[-1].get_stress().shape == (6,)


def test_npt_needs_a_periodic_cell(model, equilibrium):
    from blip.errors import ConfigError

    with pytest.raises(ConfigError, match="periodic"):
        run_md(model, equilibrium[0], MDSettings(steps=2, ensemble="npt"))
