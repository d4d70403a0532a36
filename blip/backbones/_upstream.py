"""Every place BLIP reaches into another package's private API, in one module.

No public API exists for these; ``tests/test_upstream.py`` fails with a clear message when
an upstream release changes them.

* e3nn: the layer class of ``e3nn.nn.FullyConnectedNet`` (private ``e3nn.nn._fc._Layer``),
  which MACE's radial MLPs are made of and BLIP replaces by a noisy layer;
* CHGNet: ``CHGNet._compute``, its forward pass on an already batched graph, which BLIP
  builds itself so that positions enter differentiably and topologies are cached.
"""

from __future__ import annotations


def e3nn_dense_layer_type() -> type:
    """The class of the layers of e3nn's ``FullyConnectedNet`` (attributes ``weight`` (h_in, h_out),
    ``act``, ``h_in``, ``h_out``, ``var_in``, ``var_out``), found from a tiny instance."""
    from e3nn.nn import FullyConnectedNet

    return type(FullyConnectedNet([1, 1]).layer0)


def chgnet_compute(chgnet, graph) -> dict:
    """CHGNet's forward pass on a ``chgnet.model.model.BatchedGraph``; returns its dict (``"e"``: energies)."""
    return chgnet._compute(graph)
