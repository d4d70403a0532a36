"""Physics of BLIP-PaiNN: conservative forces, symmetries, batching, reproducible samples."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from blip.backbones.painn import PaiNN
from blip.data import build_graph, collate, replicate
from blip.model import BayesianPotential


@pytest.fixture
def potential(acac_summary):
    torch.manual_seed(0)
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=16, interactions=2, radial=8),
                              p_init=0.2).double()
    # Make the inference net depend on its inputs so that rates vary between rows.
    for head in model.inference.heads_list():
        torch.nn.init.normal_(head.net[2].weight, std=0.5)
    return model


def _batch(atoms_list):
    return collate([build_graph(a, 5.0, index=i) for i, a in enumerate(atoms_list)], dtype=torch.float64)


def _run(model, atoms_list, sample, seed=7):
    out = model(_batch(atoms_list), sample=sample, seed=seed if sample else None)
    return out["energy"].detach().numpy(), out["forces"].detach().numpy()


@pytest.mark.parametrize("sample", [False, True])
def test_forces_are_minus_finite_difference_gradient(potential, acac_small, sample):
    atoms = acac_small[0].atoms.copy()
    _, forces = _run(potential, [atoms], sample)
    h = 1e-5
    for atom, axis in [(0, 0), (3, 1), (7, 2), (12, 0)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        fd = -(_run(potential, [plus], sample)[0][0] - _run(potential, [minus], sample)[0][0]) / (2 * h)
        assert forces[atom, axis] == pytest.approx(fd, abs=1e-6)


@pytest.mark.parametrize("sample", [False, True])
def test_rotation_and_translation(potential, acac_small, sample):
    atoms = acac_small[1].atoms.copy()
    energy, forces = _run(potential, [atoms], sample)
    rot = Rotation.random(random_state=3).as_matrix()
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([1.3, -0.4, 2.2])
    energy2, forces2 = _run(potential, [moved], sample)
    assert energy2[0] == pytest.approx(energy[0], abs=1e-9)
    np.testing.assert_allclose(forces2, forces @ rot.T, atol=1e-9)


def test_samples_differ_and_map_is_deterministic(potential, acac_small):
    atoms = [acac_small[0].atoms]
    assert np.array_equal(_run(potential, atoms, False)[0], _run(potential, atoms, False)[0])
    assert abs(_run(potential, atoms, True, seed=1)[0][0] - _run(potential, atoms, True, seed=2)[0][0]) > 1e-6
    assert np.array_equal(_run(potential, atoms, True, seed=1)[1], _run(potential, atoms, True, seed=1)[1])


def test_permutation_of_atoms_permutes_map_outputs(potential, acac_small):
    atoms = acac_small[2].atoms.copy()
    energy, forces = _run(potential, [atoms], False)
    perm = np.random.default_rng(0).permutation(len(atoms))
    energy2, forces2 = _run(potential, [atoms[perm]], False)
    assert energy2[0] == pytest.approx(energy[0], abs=1e-9)
    np.testing.assert_allclose(forces2, forces[perm], atol=1e-9)


@pytest.mark.parametrize("sample", [False, True])
def test_batched_equals_one_at_a_time(potential, acac_small, sample):
    atoms = [s.atoms for s in acac_small]
    energy, forces = _run(potential, atoms, sample)
    start = 0
    for i, a in enumerate(atoms):
        graph = build_graph(a, 5.0, index=i)  # same structure_index -> same noise
        out = potential(collate([graph], dtype=torch.float64), sample=sample, seed=7 if sample else None)
        assert float(out["energy"].detach()[0]) == pytest.approx(energy[i], abs=1e-9)
        np.testing.assert_allclose(out["forces"].detach().numpy(), forces[start:start + len(a)], atol=1e-9)
        start += len(a)


def test_k_batched_samples_equal_k_sequential_samples(potential, acac_small):
    batch = _batch([s.atoms for s in acac_small[:3]])
    k = 4
    together = potential(replicate(batch, k), sample=True, seed=11)
    energies = together["energy"].detach().reshape(k, 3)
    forces = together["forces"].detach().reshape(k, -1, 3)
    for replica in range(k):
        single = replicate(batch, 1)
        single["replica"] = single["replica"] + replica
        out = potential(single, sample=True, seed=11)
        torch.testing.assert_close(out["energy"].detach(), energies[replica], atol=1e-10, rtol=0)
        torch.testing.assert_close(out["forces"].detach(), forces[replica], atol=1e-10, rtol=0)


def test_shared_radial_filters_give_the_same_samples_with_exact_forces(potential, acac_small):
    """Predictions compute the radial filters once for all replicas (``shared_terms``): the
    samples equal the unshared ones, and each sample's forces are minus the finite-difference
    gradient of its own energy."""
    atoms = [a.atoms for a in acac_small[:2]]
    batch = _batch(atoms)
    rep = replicate(batch, 3)
    plain = potential(rep, sample=True, seed=4)
    shared = potential({**rep, **potential.backbone.shared_terms(batch)}, sample=True, seed=4)
    torch.testing.assert_close(shared["energy"], plain["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(shared["forces"], plain["forces"], rtol=0, atol=1e-10)

    def sample_energy(displaced, replica=1, structure=0):
        b = _batch(displaced)
        out = potential({**replicate(b, 3), **potential.backbone.shared_terms(b)}, sample=True, seed=4,
                        forces=False)
        return float(out["energy"].reshape(3, 2)[replica, structure].detach())

    n0 = len(atoms[0])
    forces = shared["forces"].detach().reshape(3, -1, 3)[1, :n0]
    h = 1e-5
    for atom, axis in ((0, 0), (4, 2), (9, 1)):
        moved = [a.copy() for a in atoms]
        moved[0].positions[atom, axis] += h
        e_plus = sample_energy(moved)
        moved[0].positions[atom, axis] -= 2 * h
        e_minus = sample_energy(moved)
        assert -(e_plus - e_minus) / (2 * h) == pytest.approx(float(forces[atom, axis]), abs=1e-6)


def test_edge_order_does_not_change_a_sample(acac_summary, acac_small):
    """Noise is keyed by each edge's identity, not its place in the list: a shuffled edge list
    (with noise on the radial filters too) gives the same sample."""
    torch.manual_seed(0)
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=16, interactions=2, radial=8, edge_noise=True),
                              p_init=0.2).double()
    assert "edge" in model.layers
    graph = build_graph(acac_small[0].atoms, 5.0)
    perm = np.random.default_rng(1).permutation(graph["edge_index"].shape[1])
    shuffled = dict(graph, edge_index=graph["edge_index"][:, perm], shifts=graph["shifts"][perm],
                    unit_shifts=graph["unit_shifts"][perm])
    e1 = model(collate([graph], dtype=torch.float64), sample=True, seed=5, forces=False)["energy"]
    e2 = model(collate([shuffled], dtype=torch.float64), sample=True, seed=5, forces=False)["energy"]
    e_map = model(collate([graph], dtype=torch.float64), forces=False)["energy"]
    assert abs(float((e1 - e_map).detach())) > 1e-4, float((e1 - e_map).detach())  # the noise is there
    assert float(e1.detach()) == pytest.approx(float(e2.detach()), abs=1e-10)


def test_unwrapped_backbone_equals_map(acac_summary, acac_small):
    torch.manual_seed(1)
    plain = PaiNN(acac_summary, features=16, interactions=2, radial=8).double()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    wrapped = BayesianPotential(PaiNN(acac_summary, features=16, interactions=2, radial=8)).double()
    wrapped.backbone.load_state_dict(state)
    batch = _batch([s.atoms for s in acac_small])
    assert torch.equal(plain.energy(batch), wrapped(batch)["energy"].detach())
