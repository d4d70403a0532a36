"""One physics suite for every backbone: the checks every potential (and every fixed-seed sample) must pass.

Parametrised over backbone (PaiNN, MACE, CHGNet; PaiNN as built for crystals, whose rates see the
distance to the nearest training rows) x dtype (float64; float32 against the
float64 model with the same weights) x system (a molecule; a periodic Si cell; CHGNet,
a crystal model, only the cell) x mode (the noise-free MAP pass; a fixed-seed sample) x
device (CPU; CUDA when present). A backbone added to ``BUILDERS`` gets every check.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import ase.io
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from blip.backbones.base import DatasetSummary, isolation_switch
from blip.build import build_backbone, build_potential
from blip.config import resolve
from blip.data import build_graph, collate, replicate
from blip.model import BayesianPotential
from conftest import DATA, pulled_out, rattled_si_cells

# energy_shift: a learned energy per atom of -1 eV (as for bound atoms), which a lone atom must not keep
SUMMARY = DatasetSummary(elements=[1, 6, 8, 14], e0s={1: -13.6, 6: -1026.9, 8: -2037.8, 14: -158.4},
                         energy_shift=-1.0)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: float32 results against float64 ones of the same weights: energies relative, forces absolute (eV/A)
TOLERANCE = {torch.float64: {"energy_rel": 1e-12, "forces": 1e-9},
             torch.float32: {"energy_rel": 2e-6, "forces": 2e-3}}


def _varying_rates(model: BayesianPotential, std: float) -> BayesianPotential:
    """Rate heads that depend on their inputs, so rows get different noise rates (BLIP)."""
    torch.manual_seed(1)
    for head in (model.inference.heads_list() if model.inference is not None else []):
        torch.nn.init.normal_(head.net[2].weight, std=std)
    return model


def _painn(method):
    cfg = resolve({"model": {"backbone": "painn", "cutoff": 4.0, "features": 16, "interactions": 2, "radial": 8,
                             "vector_noise": True, "message_noise": True}})  # noise on every layer type
    torch.manual_seed(0)
    return _varying_rates(BayesianPotential(build_backbone(cfg["model"], SUMMARY), method, p_init=0.2), 0.5)


def _mace(method):
    cfg = resolve({"model": {"backbone": "mace", "cutoff": 4.0, "hidden_irreps": "8x0e + 8x1o", "correlation": 2,
                             "num_interactions": 2, "num_radial": 4, "max_ell": 2, "radial_mlp": [8, 8],
                             "mlp_irreps": "4x0e", "edge_noise": True}})  # noise on both layer types
    torch.manual_seed(0)
    backbone = build_backbone(cfg["model"], SUMMARY)
    torch.nn.init.normal_(backbone.species_shift, std=0.5)  # learned energies per species (they start at 0)
    # independent weight noise (the default for MACE on crystals): local reparameterisation on the 0e
    # path and the radial MLPs, per-input factors on the other irreps (MC dropout: per-input masks)
    return _varying_rates(BayesianPotential(backbone, method, p_init=0.2, weight_noise="independent"), 0.5)


def _chgnet(method):
    from blip.backbones.chgnet import NOISE_DOMAINS, CHGNetBackbone, load_chgnet

    # noise on every domain (the default, atom and bond updates, is a subset of these layers)
    backbone = CHGNetBackbone(load_chgnet("0.3.0", pretrained=True, cutoff=6.0), DatasetSummary(elements=[14]),
                              noise_domains=NOISE_DOMAINS)
    model = BayesianPotential(backbone, method, prior_p=0.01, p_min=1e-5, p_max=0.1, p_init=5e-5, dropout_p=0.05)
    _varying_rates(model, 0.3)
    for head in (model.inference.heads_list() if model.inference is not None else []):  # rates near 0.05
        torch.nn.init.constant_(head.net[2].bias, math.log(0.05 / 0.95) - head.logit0)
    return model


def _painn_crystal(method):
    """PaiNN as the defaults build it for periodic training data (``uq.distance_metric: auto`` ->
    nearest), its bank of training rows fitted on other rattled Si cells than the test ones."""
    from ase.build import bulk

    cfg = resolve({"model": {"backbone": "painn", "cutoff": 4.0, "features": 16, "interactions": 2, "radial": 8},
                   "uq": {"method": method, "p_init": 0.2}})
    torch.manual_seed(0)
    model = build_potential(cfg, dataclasses.replace(SUMMARY, periodic=True))
    if model.inference is not None:
        assert model.inference.metric == "nearest"
        cells = []
        for seed in (5, 6, 7):
            cell = bulk("Si", "diamond", a=5.43, cubic=True)
            cell.rattle(0.1, seed=seed)
            cells.append(build_graph(cell, 4.0))
        model.fit_feature_statistics([collate(cells, dtype=torch.float32)])
    return _varying_rates(model, 0.5)


BUILDERS = {"painn": _painn, "mace": _mace, "chgnet": _chgnet, "painn_crystal": _painn_crystal}
SYSTEMS = {"painn": ("molecule", "bulk"), "mace": ("molecule", "bulk"), "chgnet": ("bulk",),
           "painn_crystal": ("bulk",)}
CASES = [(b, s) for b in BUILDERS for s in SYSTEMS[b]]
_MODELS: dict = {}


def model_for(backbone: str, dtype: torch.dtype, device: str, method: str = "blip") -> BayesianPotential:
    """The float64 model of ``backbone``, or a float32 copy with the same weights (cached)."""
    key = (backbone, dtype, device, method)
    if key not in _MODELS:
        base = (backbone, torch.float64, "cpu", method)
        if base not in _MODELS:
            _MODELS[base] = BUILDERS[backbone](method).double()
        _MODELS[key] = copy.deepcopy(_MODELS[base]).to(dtype=dtype, device=device)
    return _MODELS[key]


def structures(system: str) -> list:
    if system == "molecule":
        return ase.io.read(DATA / "acac_small.xyz", ":2")
    return rattled_si_cells()


def run(model, atoms_list, sample: bool, seed: int = 7, first_index: int = 0, replicas: int = 1):
    """Energies (replicas * G,) eV and forces (replicas * N, 3) eV/A as float64 numpy arrays."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    graphs = [build_graph(a, model.backbone.cutoff, index=first_index + i) for i, a in enumerate(atoms_list)]
    batch = collate(graphs, dtype=dtype, device=device)
    if replicas > 1:
        batch = replicate(batch, replicas)
    out = model(batch, sample=sample, seed=seed if sample else None)
    return out["energy"].detach().double().cpu().numpy(), out["forces"].detach().double().cpu().numpy()


def assert_same(a, b, dtype, what: str):
    (energy_a, forces_a), (energy_b, forces_b) = a, b
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(energy_a, energy_b, rtol=tol["energy_rel"], atol=1e-10, err_msg=f"{what}: energy")
    np.testing.assert_allclose(forces_a, forces_b, rtol=0, atol=tol["forces"], err_msg=f"{what}: forces")


params = pytest.mark.parametrize
case_params = params("backbone, system", CASES)
dtype_params = params("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
mode_params = params("sample", [False, True], ids=["map", "sample"])
device_params = params("device", DEVICES)


@case_params
@mode_params
@device_params
def test_forces_are_minus_the_finite_difference_gradient(backbone, system, sample, device):
    model = model_for(backbone, torch.float64, device)
    atoms = structures(system)[0]
    _, forces = run(model, [atoms], sample)
    h = 1e-5
    for atom, axis in ((0, 0), (3, 1), (7, 2)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(run(model, [plus], sample)[0][0] - run(model, [minus], sample)[0][0]) / (2 * h)
        assert forces[atom, axis] == pytest.approx(fd, abs=1e-6), (atom, axis)


def run_stress(model, atoms, sample: bool, seed: int = 7) -> np.ndarray:
    """Stress (3, 3) eV/A^3 of one structure (NaN for an open one), float64 numpy."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    batch = collate([build_graph(atoms, model.backbone.cutoff)], dtype=dtype, device=device)
    out = model(batch, sample=sample, seed=seed if sample else None, stress=True)
    return out["stress"][0].detach().double().cpu().numpy()


def strained(atoms, eps: np.ndarray):
    """``atoms`` with cell and positions multiplied by (1 + eps)."""
    out = atoms.copy()
    out.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    return out


@params("backbone", [b for b in BUILDERS if "bulk" in SYSTEMS[b]])
@mode_params
@device_params
def test_stress_is_the_finite_difference_strain_derivative_over_the_volume(backbone, sample, device):
    model = model_for(backbone, torch.float64, device)
    atoms = structures("bulk")[0]
    stress = run_stress(model, atoms, sample)
    h, volume = 1e-5, atoms.get_volume()
    for a, b in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = h / 2 if a != b else h
        plus, minus = strained(atoms, eps), strained(atoms, -eps)
        fd = (run(model, [plus], sample)[0][0] - run(model, [minus], sample)[0][0]) / (2 * h) / volume
        assert stress[a, b] == pytest.approx(fd, abs=1e-7), (a, b)
    assert np.abs(stress).max() > 1e-4  # not trivially zero
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


@params("backbone", [b for b in BUILDERS if "bulk" in SYSTEMS[b]])
@dtype_params
@mode_params
@device_params
def test_stress_rotates_as_a_tensor(backbone, dtype, sample, device):
    model = model_for(backbone, dtype, device)
    atoms = structures("bulk")[1]
    rot = Rotation.random(random_state=5).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T
    moved.cell = atoms.cell.array @ rot.T
    tol = 1e-10 if dtype == torch.float64 else 2e-5  # eV/A^3
    np.testing.assert_allclose(run_stress(model, moved, sample), rot @ run_stress(model, atoms, sample) @ rot.T,
                               rtol=0, atol=tol)


@params("backbone", [b for b in BUILDERS if "molecule" in SYSTEMS[b]])
def test_an_open_molecule_has_no_stress(backbone):
    model = model_for(backbone, torch.float64, "cpu")
    assert np.isnan(run_stress(model, structures("molecule")[0], sample=False)).all()


@case_params
@mode_params
@device_params
def test_float32_equals_float64_with_the_same_weights(backbone, system, sample, device):
    atoms = structures(system)
    ref = run(model_for(backbone, torch.float64, device), atoms, sample)
    assert_same(run(model_for(backbone, torch.float32, device), atoms, sample), ref, torch.float32, "float32")
    if sample:  # the noise is really on
        assert np.abs(ref[1] - run(model_for(backbone, torch.float64, device), atoms, False)[1]).max() > 1e-4


@case_params
@dtype_params
@mode_params
@device_params
@params("method", ["blip", "mc_dropout"])
def test_rotation_and_translation(backbone, system, dtype, sample, device, method):
    model = model_for(backbone, dtype, device, method)
    atoms = structures(system)[1]
    energy, forces = run(model, [atoms], sample)
    rot = Rotation.random(random_state=3).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([1.3, -0.4, 2.2])
    if atoms.pbc.any():
        moved.cell = atoms.cell.array @ rot.T
    assert_same(run(model, [moved], sample), (energy, forces @ rot.T), dtype, "rotated")


@case_params
@dtype_params
@mode_params
@device_params
def test_permuting_atoms_permutes_the_forces(backbone, system, dtype, sample, device):
    """Also for a fixed-seed sample: its draws are shared by the atoms and edges of a structure
    (``uq.noise_draws: structure``), so the sample is one potential, blind to the atoms' order."""
    model = model_for(backbone, dtype, device)
    atoms = structures(system)[0]
    energy, forces = run(model, [atoms], sample)
    perm = np.random.default_rng(0).permutation(len(atoms))
    assert_same(run(model, [atoms[perm]], sample), (energy, forces[perm]), dtype, "permuted")


@params("backbone", list(BUILDERS))
def test_a_sample_keeps_the_zero_forces_of_a_perfect_crystal_unless_rows_draw_alone(backbone):
    """Every atom of a perfect diamond cell is equivalent: the forces are zero by symmetry, in
    every sample with draws shared per structure; with independent draws per row (``noise_draws:
    row``) equivalent atoms take different noise and the sampled forces are not zero."""
    from ase.build import bulk

    model = model_for(backbone, torch.float64, "cpu")
    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    energy, forces = run(model, [crystal], True, replicas=3)
    assert np.abs(energy[0] - energy[1]) > 1e-6  # noisy samples
    assert np.abs(forces).max() < 1e-9
    model.shared_draws = False
    try:
        _, row_forces = run(model, [crystal], True, replicas=3)
    finally:
        model.shared_draws = True
    assert np.abs(row_forces).max() > 1e-4
    # training steps draw per row whatever the setting (the local reparameterisation's gradients)
    trained = copy.deepcopy(model)
    batch = collate([build_graph(crystal, trained.backbone.cutoff)], dtype=torch.float64)
    step_forces = trained(batch, sample=True, seed=7, training=True)["forces"].detach().numpy()
    assert np.abs(step_forces).max() > 1e-4


@case_params
@dtype_params
@mode_params
@device_params
def test_a_batch_equals_its_structures_one_at_a_time(backbone, system, dtype, sample, device):
    model = model_for(backbone, dtype, device)
    atoms = structures(system)
    energy, forces = run(model, atoms, sample)
    start = 0
    for i, a in enumerate(atoms):
        e_i, f_i = run(model, [a], sample, first_index=i)  # same structure index: same noise
        assert_same((e_i, f_i), (energy[i:i + 1], forces[start:start + len(a)]), dtype, f"structure {i}")
        start += len(a)


@case_params
@dtype_params
@device_params
def test_k_batched_samples_equal_k_sequential_samples(backbone, system, dtype, device):
    model = model_for(backbone, dtype, device)
    atoms = structures(system)
    dtype_, device_ = next(model.parameters()).dtype, next(model.parameters()).device
    batch = collate([build_graph(a, model.backbone.cutoff, index=i) for i, a in enumerate(atoms)],
                    dtype=dtype_, device=device_)
    k = 3
    together = model(replicate(batch, k), sample=True, seed=11)
    energies = together["energy"].detach().double().cpu().numpy().reshape(k, -1)
    forces = together["forces"].detach().double().cpu().numpy().reshape(k, -1, 3)
    assert np.abs(energies[0] - energies[1]).max() > 1e-6  # replicas are different samples
    for r in range(k):
        one = replicate(batch, 1)
        one["replica"] = one["replica"] + r
        out = model(one, sample=True, seed=11)
        assert_same((out["energy"].detach().double().cpu().numpy(), out["forces"].detach().double().cpu().numpy()),
                    (energies[r], forces[r]), dtype, f"replica {r}")


@params("backbone", [b for b in BUILDERS if "bulk" in SYSTEMS[b]])
@dtype_params
@mode_params
@device_params
def test_wrapping_atoms_into_other_periodic_images_changes_nothing(backbone, dtype, sample, device):
    model = model_for(backbone, dtype, device)
    if sample and any(d != "node" and d != "atom" for d in model.layers):
        pytest.skip("noise on edge rows is keyed by the edge's cell shift, which re-wrapping changes "
                    "(samples stay continuous along a trajectory, where shifts do not jump)")
    atoms = structures("bulk")[0]
    shifted = atoms.copy()
    shifted.positions[[1, 5]] += atoms.cell.array[0] - 2 * atoms.cell.array[2]
    shifted.positions[3] -= atoms.cell.array[1]
    assert_same(run(model, [shifted], sample), run(model, [atoms], sample), dtype, "re-wrapped")


@params("backbone", [b for b in BUILDERS if "molecule" in SYSTEMS[b]])
@dtype_params
@device_params
def test_far_apart_molecules_add_up(backbone, dtype, device):
    """Noise-free pass: two molecules beyond the cutoff of each other are two independent systems."""
    model = model_for(backbone, dtype, device)
    a, b = structures("molecule")
    far = b.copy()
    far.positions += np.array([30.0, 0.0, 0.0])
    energy, forces = run(model, [a, b], False)
    together = run(model, [a + far], False)
    assert_same(together, (np.array([energy.sum()]), forces), dtype, "a + b")


# -- isolated atoms: the learned energy switched off (PaiNN and MACE; CHGNet keeps its own) -----------
LEAVING_H = 9  # an H of acac_small; pulled out 3 A it keeps part of its learned energy (cutoff 4 A)


def test_the_isolation_switch_by_hand():
    """One pair at half the cutoff: each atom's neighbour weight is 0.5, and smootherstep(0.5) = 0.5;
    two such neighbours weigh 1 (switch 1); beyond the cutoff 0; it rises monotonically in between."""
    lengths = torch.tensor([2.0, 2.0, 2.0, 2.0, 4.5, 4.5], dtype=torch.float64)
    centres = torch.tensor([0, 1, 2, 2, 3, 4])
    g = isolation_switch(lengths, centres, 5, 4.0)
    assert g.tolist() == pytest.approx([0.5, 0.5, 1.0, 0.0, 0.0], abs=1e-15)
    r = torch.linspace(0.5, 3.99, 200, dtype=torch.float64)
    one_neighbour = torch.stack([isolation_switch(x[None], torch.tensor([0]), 1, 4.0)[0] for x in r])
    assert bool((one_neighbour.diff() < 0).all()) and 0.0 < float(one_neighbour[-1]) < 1e-6


@params("backbone", ["painn", "mace"])
@dtype_params
@mode_params
@device_params
def test_a_lone_atom_carries_its_isolated_atom_energy(backbone, dtype, sample, device):
    """A molecule plus an O atom 40 A away: the energy is the molecule's plus E0(O) (in every noise
    sample too; E0 as stored: these models are built in float32, so E0 to float32 precision), the lone atom feels no force and the
    molecule's forces do not change. With the limit off the lone atom would keep a learned energy."""
    model = model_for(backbone, dtype, device)
    molecule = structures("molecule")[0]
    lone = ase.Atoms("O", positions=[molecule.positions.mean(axis=0) + [40.0, 0.0, 0.0]])
    energy, forces = run(model, [molecule], sample)
    energy_with, forces_with = run(model, [molecule + lone], sample)
    e0_as_stored = float(np.float32(SUMMARY.e0s[8]))
    assert energy_with[0] - energy[0] == pytest.approx(e0_as_stored, abs=1e-9 if dtype == torch.float64 else 1e-4)
    np.testing.assert_allclose(forces_with[-1], 0.0, atol=1e-12)
    np.testing.assert_allclose(forces_with[:-1], forces, rtol=0, atol=TOLERANCE[dtype]["forces"] * 1e-3)
    model.backbone.isolated_atom_limit = False
    try:
        assert abs(run(model, [molecule + lone], sample)[0][0] - energy[0] - e0_as_stored) > 1e-3
    finally:
        model.backbone.isolated_atom_limit = True


@params("backbone", ["painn", "mace"])
@mode_params
def test_forces_of_a_leaving_atom_are_minus_the_finite_difference_gradient(backbone, sample):
    """An H pulled 3 A out of the molecule, where its switch lies strictly between 0 and 1."""
    model = model_for(backbone, torch.float64, "cpu")
    atoms = pulled_out(structures("molecule")[0], LEAVING_H, 3.0)
    graph = collate([build_graph(atoms, 4.0)], dtype=torch.float64)
    i, j = graph["edge_index"]
    lengths = torch.linalg.norm(graph["positions"][j] - graph["positions"][i] + graph["shifts"], dim=1)
    assert 0.02 < float(isolation_switch(lengths, i, len(atoms), 4.0)[LEAVING_H]) < 0.98
    _, forces = run(model, [atoms], sample)
    assert np.abs(forces[LEAVING_H]).max() > 1e-4  # the leaving atom is still held by the molecule
    h = 1e-5
    for axis in range(3):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[LEAVING_H, axis] += h
        minus.positions[LEAVING_H, axis] -= h
        fd = -(run(model, [plus], sample)[0][0] - run(model, [minus], sample)[0][0]) / (2 * h)
        assert forces[LEAVING_H, axis] == pytest.approx(fd, abs=1e-6), axis


@params("backbone", ["painn", "mace"])
def test_the_isolated_atom_limit_is_on_by_default_and_off_for_older_model_files(backbone):
    cfg = resolve({"model": {"backbone": backbone}})
    assert cfg["model"]["isolated_atom_limit"] is True
    assert build_backbone(cfg["model"], SUMMARY).isolated_atom_limit is True
    older = {k: v for k, v in cfg["model"].items() if k != "isolated_atom_limit"}  # a file written before the key
    assert build_backbone(older, SUMMARY).isolated_atom_limit is False


@params("backbone", [b for b in BUILDERS if "molecule" in SYSTEMS[b]])
@device_params
def test_float32_models_keep_total_energies_to_a_fraction_of_a_meV(backbone, device):
    """Energies of ~1e4 eV: the isolated-atom part is summed in float64, so a float32 model's total
    energy is as precise as its (small) network part, well below float32's 1 meV at 1e4 eV."""
    atoms = structures("molecule")
    e32, _ = run(model_for(backbone, torch.float32, device), atoms, False)
    e64, _ = run(model_for(backbone, torch.float64, device), atoms, False)
    assert np.abs(e64).min() > 8000
    assert np.abs(e32 - e64).max() < 5e-5
    batch = collate([build_graph(a, 4.0, energy=a.get_potential_energy()) for a in atoms], dtype=torch.float32)
    assert batch["energy"].dtype == torch.float64 and batch["positions"].dtype == torch.float32
