"""The private upstream API BLIP relies on (blip/backbones/_upstream.py) is still there and still behaves.

A failure here means an upstream release changed something BLIP reaches into; the message
says what to adapt.
"""

from __future__ import annotations

import torch

from blip.backbones import mace as _mace  # noqa: F401  (imports mace-torch before e3nn)
from blip.backbones._upstream import e3nn_dense_layer_type


def test_e3nn_fully_connected_net_is_made_of_the_dense_layer_blip_wraps():
    from e3nn.nn import FullyConnectedNet

    layer_type = e3nn_dense_layer_type()
    net = FullyConnectedNet([3, 5, 2], torch.nn.functional.silu)
    layers = [m for m in net.modules() if type(m) is layer_type]
    assert len(layers) == 2, "e3nn FullyConnectedNet no longer consists of one layer type: adapt NoisyFCLayer"
    first = layers[0]
    for name in ("weight", "act", "h_in", "h_out", "var_in", "var_out"):
        assert hasattr(first, name), f"e3nn dense layer lost attribute {name!r}: adapt blip/bayes/irreps.py"
    assert tuple(first.weight.shape) == (3, 5), "e3nn dense layer weight is no longer (h_in, h_out)"


def test_chgnet_compute_takes_a_batched_graph_and_returns_energies():
    """Through BLIP's CHGNet backbone: MAP energies of two Si cells are finite, one per cell."""
    from ase.build import bulk

    from blip.backbones.base import DatasetSummary
    from blip.backbones.chgnet import CHGNetBackbone, load_chgnet
    from blip.data import build_graph, collate

    backbone = CHGNetBackbone(load_chgnet("0.3.0", pretrained=True, cutoff=6.0), DatasetSummary(elements=[14]))
    cells = [bulk("Si", "diamond", a=5.43), bulk("Si", "diamond", a=5.5)]
    batch = backbone.prepare(collate([build_graph(a, 6.0, index=i) for i, a in enumerate(cells)]))
    energy = backbone.energy(batch)
    assert energy.shape == (2,) and torch.isfinite(energy).all(), "CHGNet._compute changed: adapt chgnet_compute"
    assert float(energy[0]) != float(energy[1])  # one energy per graph of the batch, not a mix
