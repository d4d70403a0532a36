"""A sampled prediction reads the device a fixed number of times, however deep the model.

Every conversion of a tensor to a Python value (``item``, ``tolist``, ``int(t)``, ``bool(t)``,
``nonzero`` ...) is a host synchronisation on a GPU. The sampled pass may make a few per pass
(grouping the rows by species once, scattering results), but none per noisy layer: the count
must not grow when the model gets more interaction blocks.
"""

from __future__ import annotations

import collections

import pytest
import torch
from ase.build import bulk

from blip import config as config_mod
from blip.backbones.base import DatasetSummary
from blip.bench.cost import default_calibration, fit_statistics
from blip.build import build_potential
from blip.predictor import BlipModel

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero")
MODELS = {
    "painn": lambda blocks: {"backbone": "painn", "cutoff": 4.0, "features": 8, "interactions": blocks, "radial": 6},
    "mace": lambda blocks: {"backbone": "mace", "cutoff": 4.0, "hidden_irreps": "4x0e + 4x1o", "correlation": 2,
                            "num_interactions": blocks, "num_radial": 4, "max_ell": 1, "radial_mlp": [8],
                            "mlp_irreps": "4x0e"},
}


def _host_reads(model: BlipModel, structures, monkeypatch) -> int:
    """Tensor-to-Python conversions made inside blip/ during one K = 4 predict."""
    counts = collections.Counter()
    with monkeypatch.context() as m:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                counts["reads"] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        model.predict(structures, samples=4, seed=0)
    return counts["reads"]


def _model(backbone: str, blocks: int, periodic: bool, structures) -> BlipModel:
    cfg = config_mod.resolve({"model": MODELS[backbone](blocks), "uq": {"method": "blip", "samples": 4}})
    summary = DatasetSummary(elements=[14], periodic=periodic)
    torch.manual_seed(0)
    potential = build_potential(cfg, summary)
    model = BlipModel([potential], cfg, summary, calibration=default_calibration(cfg, potential))
    fit_statistics(model, structures)
    return model


@pytest.mark.parametrize("backbone, periodic", [("painn", False), ("painn", True), ("mace", False)])
def test_host_reads_of_a_sampled_predict_do_not_grow_with_the_number_of_layers(backbone, periodic, monkeypatch):
    """PaiNN with the Euclidean distance, PaiNN trained on crystals (the nearest-training-rows
    distance over a stored bank) and MACE: 2 and 4 interaction blocks make the same number of
    host reads in a K = 4 predict of two silicon cells (a per-layer read would add at least 2)."""
    cells = []
    for seed in (0, 1):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True)
        atoms.rattle(0.05, seed=seed)
        cells.append(atoms)
    reads = [_host_reads(_model(backbone, blocks, periodic, cells), cells, monkeypatch) for blocks in (2, 4)]
    if periodic:
        assert _model(backbone, 2, periodic, cells).members[0].inference.metric == "nearest"
    assert reads[0] == reads[1] > 0
