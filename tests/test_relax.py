"""``blip relax``: positions and cell relax on the MAP model; the uncertainty of the result; the watch."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from blip.calculator import BlipCalculator, max_atom_force_std
from blip.cli import main
from blip.relax import RelaxSettings, relax
from conftest import lj_si_cells


def test_positions_relax_below_fmax_and_report_the_uncertainty(lj_si_model):
    start = lj_si_cells(1, seed=4)[0]
    result = relax(lj_si_model, start, RelaxSettings(fmax=0.01, steps=300, optimizer="BFGS", samples=4))
    assert result.status == "converged"
    final = result.atoms
    assert np.linalg.norm(final.get_forces(), axis=1).max() < 0.01
    assert final.get_potential_energy() < _map_energy(lj_si_model, start)
    watch = BlipCalculator(lj_si_model, samples=4, seed=0)
    again = final.copy()
    again.calc = watch
    again.get_forces()
    assert final.info["max_force_std"] == pytest.approx(max_atom_force_std(watch.results["forces_std"]), rel=1e-9)
    assert final.info["energy_std"] > 0 and final.info["stress_std"].shape == (6,)
    np.testing.assert_allclose(final.cell.array, start.cell.array)  # positions only


def test_cell_relaxation_reaches_the_target_pressure(lj_si_model):
    start = lj_si_cells(1, seed=4)[0]
    fmax, gpa = 0.02, 1.0 / 160.21766  # eV/A; 1 GPa in eV/A^3
    result = relax(lj_si_model, start, RelaxSettings(fmax=fmax, steps=400, cell=True, pressure_GPa=1.0))
    assert result.status == "converged"
    final = result.atoms
    # at the target pressure the stress is -P 1 (ASE: positive stress is tensile). FrechetCellFilter's
    # cell "forces" are V (sigma + P) / n_atoms, so fmax bounds |sigma + P| by fmax n_atoms / V.
    residual = final.get_stress(voigt=False) + gpa * np.eye(3)
    assert np.abs(residual).max() <= fmax * len(final) / final.get_volume()
    assert abs(final.get_volume() - start.get_volume()) > 1.0


def test_the_uncertainty_watch_stops_a_relaxation(lj_si_model):
    start = lj_si_cells(1, seed=4)[0]
    result = relax(lj_si_model, start, RelaxSettings(steps=50, max_force_std=1e-6, every=1, samples=2))
    assert result.status == "uncertain" and result.steps == 0
    assert result.atoms.info["max_force_std"] > 1e-6


def test_cell_relaxation_of_a_molecule_is_an_error(tiny_model_path):
    from blip.errors import ConfigError
    from conftest import DATA

    with pytest.raises(ConfigError, match="periodic"):
        relax(str(tiny_model_path), ase.io.read(DATA / "acac_small.xyz", 0), RelaxSettings(cell=True))


def test_command_line(lj_si_model, tmp_path, capsys):
    from blip.io import save_model

    save_model(lj_si_model, tmp_path / "model.pt")
    ase.io.write(tmp_path / "start.xyz", lj_si_cells(1, seed=4)[0])
    code = main(["relax", str(tmp_path / "model.pt"), str(tmp_path / "start.xyz"), "-o", str(tmp_path / "out.xyz"),
                 "--fmax", "0.02", "--samples", "2"])
    assert code == 0
    out = ase.io.read(tmp_path / "out.xyz")
    assert out.info["status"] == "converged" and np.linalg.norm(out.get_forces(), axis=1).max() < 0.02
    assert "converged" in capsys.readouterr().err


def _map_energy(model, atoms):
    return float(model.predict([atoms], samples=0)["energy"][0])
