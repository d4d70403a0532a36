"""``model.energy_noise``: BLIP noise on each atom's learned energy (PaiNN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from blip.backbones.painn import PaiNN
from blip.bayes.layers import AtomicEnergyNoise, NoisyAtomicEnergy
from blip.bayes.noise import NoiseContext, NoiseState
from blip.data import build_graph, collate
from blip.model import BayesianPotential


def _batch(atoms_list, dtype=torch.float64):
    return collate([build_graph(a, 5.0, index=i) for i, a in enumerate(atoms_list)], dtype=dtype)


def _potential(summary, structures, method="blip", energy_noise=True):
    torch.manual_seed(0)
    backbone = PaiNN(summary, cutoff=5.0, features=16, interactions=2, radial=8, energy_noise=energy_noise)
    model = BayesianPotential(backbone, method, p_init=0.05, weight_noise="per_input").double()
    for head in (model.inference.heads_list() if model.inference is not None else []):
        torch.nn.init.normal_(head.net[2].weight, std=0.5)
    model.fit_feature_statistics([_batch(structures)])
    return model


def test_atomic_energy_noise_has_the_variance_of_its_rate():
    """e (1 + sqrt(alpha) xi): over many rows with rate p the factor has mean 1 and variance
    alpha = p / (1 - p) (4 standard errors), rows of zero energy stay zero, and without a noise
    context (the MAP pass) or for MC dropout the layer is the identity."""
    state = NoiseState()
    layer = NoisyAtomicEnergy(AtomicEnergyNoise(4), "node", 0, state)
    rows, p = 20000, 0.2
    energy = torch.ones(rows, dtype=torch.float64)
    energy[:10] = 0.0
    features = torch.randn(rows, 4, dtype=torch.float64)
    keys = {"node": torch.arange(rows, dtype=torch.int32)}
    with state.use(NoiseContext.fixed({"node": torch.full((rows, 1), p, dtype=torch.float64)}, keys)):
        out = layer(energy, features)
    factor = out[10:]
    alpha = p / (1 - p)
    assert float(factor.mean()) == pytest.approx(1.0, abs=4 * (alpha / rows) ** 0.5)
    assert float(factor.var()) == pytest.approx(alpha, rel=4 * (2 / rows) ** 0.5)
    assert torch.equal(out[:10], energy[:10])
    assert torch.equal(layer(energy, features), energy)
    with state.use(NoiseContext.fixed({"node": torch.full((rows, 1), p, dtype=torch.float64)}, keys, "bernoulli")):
        assert torch.equal(layer(energy, features), energy)


def test_energy_noise_is_one_more_node_layer_and_leaves_the_map_pass_alone(acac_summary, acac_small):
    atoms = [s.atoms for s in acac_small[:4]]
    with_noise, without = _potential(acac_summary, atoms), _potential(acac_summary, atoms, energy_noise=False)
    assert with_noise.layers["node"][-1] == "atomic_noise"
    assert len(with_noise.layers["node"]) == len(without.layers["node"]) + 1
    batch = _batch(atoms)
    assert torch.equal(with_noise(batch)["energy"], without(batch)["energy"])
    rates = with_noise(batch, sample=True, seed=1)["rates"]
    assert ("node", len(without.layers["node"])) in rates  # its rate enters the KL
    spread = torch.stack([with_noise(batch, sample=True, seed=s)["energy"] for s in range(8)]).std(0)
    base = torch.stack([without(batch, sample=True, seed=s)["energy"] for s in range(8)]).std(0)
    assert bool((spread > 2 * base).all())  # rates near 0.05 on -4.6 eV atomic energies dominate


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fixed_seed_sample_with_energy_noise_is_a_smooth_invariant_potential(acac_summary, acac_small, dtype):
    """A fixed-seed sample's forces are minus the finite-difference gradient of its energy (float64),
    its energy is invariant and its forces rotate with the structure (both dtypes)."""
    model = _potential(acac_summary, [s.atoms for s in acac_small[:4]]).to(dtype)
    atoms = acac_small[4].atoms.copy()
    atoms.rattle(0.05, seed=2)

    def sample(a):
        out = model(_batch([a], dtype=dtype), sample=True, seed=3)
        return float(out["energy"].detach()), out["forces"].detach().double().numpy()

    energy, forces = sample(atoms)
    rotation = Rotation.from_euler("xyz", [0.4, -0.9, 1.7])
    moved = atoms.copy()
    moved.positions = rotation.apply(atoms.positions) + [0.7, -1.2, 2.0]
    energy_moved, forces_moved = sample(moved)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert energy_moved == pytest.approx(energy, rel=tol, abs=tol)
    np.testing.assert_allclose(forces_moved, rotation.apply(forces), atol=tol * 10, rtol=0)
    if dtype == torch.float64:
        h = 1e-5
        for atom, axis in ((0, 0), (4, 2), (9, 1)):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[atom, axis] += h
            minus.positions[atom, axis] -= h
            numeric = -(sample(plus)[0] - sample(minus)[0]) / (2 * h)
            assert numeric == pytest.approx(forces[atom, axis], abs=1e-6)


def test_export_refuses_energy_noise(acac_summary, acac_small):
    pytest.importorskip("metatomic.torch")
    from blip._export_torchscript import PaiNNEnergy

    model = _potential(acac_summary, [s.atoms for s in acac_small[:4]])
    with pytest.raises(NotImplementedError, match="energy_noise"):
        PaiNNEnergy(model)
