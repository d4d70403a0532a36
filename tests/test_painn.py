"""Physics of BLIP-PaiNN: conservative forces, symmetries, batching, reproducible samples."""

import numpy as np
import pytest
import torch

from blip.backbones.painn import PaiNN
from blip.bayes.noise import NoiseContext
from blip.build import build_backbone
from blip.config import resolve
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


def test_samples_differ_and_map_is_deterministic(potential, acac_small):
    atoms = [acac_small[0].atoms]
    assert np.array_equal(_run(potential, atoms, False)[0], _run(potential, atoms, False)[0])
    assert abs(_run(potential, atoms, True, seed=1)[0][0] - _run(potential, atoms, True, seed=2)[0][0]) > 1e-6
    assert np.array_equal(_run(potential, atoms, True, seed=1)[1], _run(potential, atoms, True, seed=1)[1])


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


def test_vector_noise_is_an_option_off_by_default_and_for_older_model_files(acac_summary):
    cfg = resolve({"model": {"backbone": "painn", "features": 8, "interactions": 2, "radial": 4}})["model"]
    assert cfg["vector_noise"] is False
    assert not [n for n in BayesianPotential(build_backbone(cfg, acac_summary)).layers["node"]
                if n.endswith((".U", ".V"))]
    cfg["vector_noise"] = True
    layers = BayesianPotential(build_backbone(cfg, acac_summary)).layers["node"]
    assert [n for n in layers if n.endswith((".U", ".V"))] == [
        "interactions.0.update.U", "interactions.0.update.V", "interactions.1.update.U", "interactions.1.update.V"]
    potential = BayesianPotential(build_backbone(cfg, acac_summary))
    u, v = (potential.backbone.get_submodule(f"interactions.1.update.{m}") for m in "UV")
    assert v.rate_slot == u.rate_slot == u.slot != v.slot  # one rate (they read the same vectors), own draws
    older = {k: v for k, v in cfg.items() if k != "vector_noise"}  # a file written before the key
    layers = BayesianPotential(build_backbone(older, acac_summary)).layers["node"]
    assert not [n for n in layers if n.endswith((".U", ".V"))]


def test_message_noise_is_an_option_off_by_default_and_on_for_older_model_files(acac_summary):
    cfg = resolve({"model": {"backbone": "painn", "features": 8, "interactions": 3, "radial": 4}})["model"]
    assert cfg["message_noise"] is False
    assert BayesianPotential(build_backbone(cfg, acac_summary)).layers["node"] == [
        f"interactions.{i}.update.mlp.{j}" for i in range(3) for j in (0, 2)]
    cfg["message_noise"] = True
    phi = [n for n in BayesianPotential(build_backbone(cfg, acac_summary)).layers["node"] if ".message.phi." in n]
    assert phi == [f"interactions.{i}.message.phi.{j}" for i in (1, 2) for j in (0, 2)]  # not interaction 0's
    older = {k: v for k, v in cfg.items() if k != "message_noise"}  # a file written before the key
    assert [n for n in BayesianPotential(build_backbone(older, acac_summary)).layers["node"]
            if ".message.phi." in n] == phi


def test_vector_noise_alone_changes_a_sample(acac_summary, acac_small):
    """The channel noise of U and V reaches the energy: with every other layer's rate at zero a
    sample still differs from the noise-free pass."""
    torch.manual_seed(0)
    model = BayesianPotential(PaiNN(acac_summary, cutoff=5.0, features=16, interactions=2, radial=8,
                                    vector_noise=True)).double()
    batch = _batch([acac_small[0].atoms])
    vector = {i for i, n in enumerate(model.layers["node"]) if n.endswith((".U", ".V"))}

    def only_vectors(domain, slot, rows, features):
        return torch.full((rows,), 0.2 if slot in vector else 0.0, dtype=torch.float64)

    map_energy = model(batch, forces=False)["energy"].detach()
    batch = model.backbone.prepare(dict(batch))
    with model.noise_state.use(NoiseContext(only_vectors, None, model.noise_kind)), torch.no_grad():
        sampled = model.backbone.energy(batch)
    assert abs(float(sampled - map_energy)) > 1e-4
