"""``blip ipi``: a real i-PI server (subprocess, UNIX socket) driven by BLIP forces."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units

import blip
from blip.calculator import max_atom_force_std
from blip.cli import main
from blip.ipi import LOG_COLUMNS, write_init_xyz

from conftest import DATA

STEPS, BEADS, SAMPLES = 3, 2, 4

INPUT_XML = """<simulation verbosity='low'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [ step, time{{femtosecond}}, temperature{{kelvin}}, potential{{electronvolt}}, bead_potentials{{electronvolt}} ] </properties>
    <trajectory filename='pos' stride='1' format='ase'> positions </trajectory>
    <trajectory filename='for' stride='1' format='xyz'> forces </trajectory>
  </output>
  <total_steps> {steps} </total_steps>
  <prng><seed> 31415 </seed></prng>
  <ffsocket name='blip' mode='unix' pbc='false'>
    <address> {address} </address>
    <latency> 1e-3 </latency>
  </ffsocket>
  <system>
    <initialize nbeads='{beads}'>
      <file mode='xyz'> init.xyz </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities>
    </initialize>
    <forces><force forcefield='blip'/></forces>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'> 0.5 </timestep>
        <thermostat mode='pile_l'><tau units='femtosecond'> 100 </tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units='kelvin'> 300 </temperature></ensemble>
  </system>
</simulation>
"""


def _ipi_command():
    pytest.importorskip("ipi", reason="i-PI is not installed (pip install ipi)")
    exe = shutil.which("i-pi") or str(Path(sys.executable).with_name("i-pi"))
    if not os.path.exists(exe):
        pytest.skip("the i-pi executable is not on PATH")
    return [exe]


@pytest.fixture(scope="module")
def ipi_run(tiny_model_path, tmp_path_factory):
    """i-PI (2 beads, 3 NVT steps) served by ``blip ipi`` in this process; the run's files."""
    cmd = _ipi_command()
    work = tmp_path_factory.mktemp("ipi")
    address = f"blip-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # socket /tmp/ipi_<address>
    start = ase.io.read(DATA / "acac_small.xyz", 0)
    write_init_xyz(work / "init.xyz", start, box=50.0)
    (work / "input.xml").write_text(INPUT_XML.format(steps=STEPS, beads=BEADS, address=address))
    log = open(work / "ipi.log", "w")
    server = subprocess.Popen(cmd + ["input.xml"], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        rc = main(["ipi", str(tiny_model_path), str(work / "init.xyz"), "--unix", address,
                   "--log", str(work / "sigma.csv"), "--beads", str(BEADS), "--samples", str(SAMPLES),
                   "--seed", "0", "--quiet", "--connect-timeout", "30", "--timeout", "60"])
        # the client returned after i-PI's EXIT: i-PI must end too (on a client failure,
        # i-PI would wait for another client forever: kill it at once in the finally)
        server_rc = server.wait(timeout=30) if rc == 0 else None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
        if os.path.exists(f"/tmp/ipi_{address}"):
            os.unlink(f"/tmp/ipi_{address}")
    assert rc == 0 and server_rc == 0, (work / "ipi.log").read_text()[-2000:]
    return work


def _bead_frames(work, bead):
    """(positions in A, forces in eV/A) per step recorded by i-PI for one bead."""
    pos = ase.io.read(work / f"sim.pos_{bead}.extxyz", ":")  # format='ase': Angstrom, full precision
    forces = ase.io.read(work / f"sim.for_{bead}.xyz", ":")  # i-PI xyz: atomic units, 6 significant digits
    assert len(pos) == len(forces) == STEPS + 1
    return ([p.arrays["positions"] for p in pos],
            [f.positions * (units.Hartree / units.Bohr) for f in forces])


def test_ipi_forces_are_blip_forces(ipi_run, tiny_model_path):
    # Every bead of every step: the forces i-PI integrated (written in Hartree/Bohr with
    # %12.5e, i.e. 6 significant digits) equal blip.Calculator's at the positions i-PI
    # wrote (extxyz, 1e-8 A). Same float32 model and noise seed. Tolerance 2e-5 eV/A
    # absolute + 2e-5 relative: the print rounding is <= 3e-6 eV/A for |F| ~ 1 eV/A,
    # float32 autograd ~1e-6; measured max difference ~3e-6 eV/A.
    start = ase.io.read(DATA / "acac_small.xyz", 0)
    calc = blip.Calculator(tiny_model_path, samples=SAMPLES, seed=0)
    rows = list(csv.DictReader(open(ipi_run / "sigma.csv")))
    moved = 0.0
    for bead in range(BEADS):
        positions, forces = _bead_frames(ipi_run, bead)
        for step, (x, f_ipi) in enumerate(zip(positions, forces)):
            atoms = start.copy()
            atoms.positions = x
            atoms.calc = calc
            f_blip = atoms.get_forces()
            np.testing.assert_allclose(f_ipi, f_blip, rtol=2e-5, atol=2e-5, err_msg=f"bead {bead} step {step}")
            moved = max(moved, float(np.abs(x - start.positions).max()))
            # the log row of this bead (rows of a step come in i-PI's dispatch order): the
            # row of that step nearest in (energy, energy std, max force std); then all three
            # agree: energy to 3 float32 ulps at ~9.4e3 eV, sigmas to 1e-3 relative
            energy = atoms.get_potential_energy()
            ref = np.array([energy, calc.results["energy_std"], max_atom_force_std(calc.results["forces_std"])])
            cand = [np.array([float(r[k]) for k in ("energy_eV", "energy_std_eV", "max_force_std_eV_A")])
                    for r in rows if int(r["step"]) == step]
            best = min(cand, key=lambda c: float(np.sum(np.abs(c - ref) / (np.abs(ref) + 1e-12))))
            tol = np.array([3e-3, 1e-7, 1e-7]) + np.array([0, 1e-3, 1e-3]) * np.abs(ref)
            assert np.all(np.abs(best - ref) <= tol), (bead, step, best, ref)
    assert moved > 1e-3  # the dynamics really moved the beads


def test_ipi_sigma_log(ipi_run):
    with open(ipi_run / "sigma.csv") as handle:
        header = next(csv.reader(handle))
    rows = list(csv.DictReader(open(ipi_run / "sigma.csv")))
    assert tuple(header) == LOG_COLUMNS
    assert len(rows) == (STEPS + 1) * BEADS  # one evaluation per bead per step, step 0 included
    assert [int(r["eval"]) for r in rows] == list(range(len(rows)))
    assert [int(r["step"]) for r in rows] == [n // BEADS for n in range(len(rows))]
    for r in rows:  # sample mode: positive, finite sigmas
        assert 0 < float(r["energy_std_eV"]) < np.inf and 0 < float(r["max_force_std_eV_A"]) < np.inf
    # i-PI's own record of the bead energies holds the same values as the log
    out = np.loadtxt(ipi_run / "sim.out", ndmin=2)
    assert out.shape == (STEPS + 1, 4 + BEADS)
    logged = np.array([float(r["energy_eV"]) for r in rows]).reshape(STEPS + 1, BEADS)
    # (i-PI prints %16.8e: 1e-5 eV at 9.4e3 eV, and its Hartree->eV factor differs from
    # ASE's, which the client uses, by ~1e-7 relative: ~1 meV at 9.4e3 eV)
    np.testing.assert_allclose(np.sort(logged, axis=1), np.sort(out[:, 4:], axis=1), rtol=2e-7, atol=1e-4)


def test_ipi_unreachable_socket_is_a_clear_error(tiny_model_path, capsys):
    name = f"blip-none-{uuid.uuid4().hex[:8]}"
    rc = main(["ipi", str(tiny_model_path), str(DATA / "acac_small.xyz"), "--unix", name,
               "--connect-timeout", "0.3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"/tmp/ipi_{name}" in err and "no i-PI server" in err


def test_ipi_example_files_are_consistent():
    import xml.etree.ElementTree as ET

    example = DATA.parent.parent / "examples" / "ipi"
    root = ET.parse(example / "input.xml").getroot()
    socket = root.find("ffsocket")
    assert socket.get("mode") == "unix" and socket.get("pbc") == "false"
    assert socket.find("address").text.strip() == "blip-acac"
    assert root.find("system/initialize").get("nbeads") == "4"
    assert root.find("system/forces/force").get("forcefield") == socket.get("name")
    init = ase.io.read(example / "init.xyz")  # also the client's START: a non-periodic molecule
    assert not init.pbc.any() and init.get_chemical_formula() == ase.io.read(DATA / "acac_small.xyz", 0).get_chemical_formula()
    assert "--unix blip-acac" in (example / "README.md").read_text()
