"""Batches of graphs as ``dict[str, torch.Tensor]`` (see docs/architecture.md).

N atoms, E edges, G graphs. Per-atom keys have leading size N, per-edge keys
E (``edge_index`` is (2, E)), per-graph keys G.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch

__all__ = ["collate", "replicate", "iterate_batches", "ATOM_KEYS", "EDGE_KEYS", "GRAPH_KEYS"]

ATOM_KEYS = frozenset({"positions", "numbers", "batch", "forces"})
#: float keys kept in float64 whatever the model dtype: total energies of ~1e4 eV need it for meV
FLOAT64_KEYS = frozenset({"energy"})
EDGE_KEYS = frozenset({"edge_index", "shifts", "unit_shifts"})
GRAPH_KEYS = frozenset(
    {"cell", "pbc", "n_atoms", "n_edges", "structure_index", "energy", "replica", "stress", "noise_free"}
)


def _to_tensor(array: np.ndarray, dtype: torch.dtype, device, key: str = "") -> torch.Tensor:
    if array.dtype == np.bool_:
        target = torch.bool
    elif np.issubdtype(array.dtype, np.integer):
        target = torch.long
    elif np.issubdtype(array.dtype, np.floating):
        target = torch.float64 if key in FLOAT64_KEYS else dtype
    else:
        raise TypeError(f"cannot batch array of dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=target)


def collate(
    graphs: list[dict], dtype: torch.dtype = torch.float32, device="cpu"
) -> dict[str, torch.Tensor]:
    """Concatenate graphs from :func:`blip.data.graph.build_graph` into one batch.

    ``edge_index`` is offset by cumulative atom counts; ``batch`` (N,) gives each
    atom's graph. Keys missing from any graph (e.g. ``energy``) are left out.
    Floats become ``dtype`` (energy labels stay float64), integers long, ``pbc`` bool.
    """
    if not graphs:
        raise ValueError("collate needs at least one graph")
    keys = [k for k in graphs[0] if all(k in g for g in graphs)]
    n_atoms = np.array([int(g["n_atoms"][0]) for g in graphs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    out = {}
    for key in keys:
        if key == "edge_index":
            arr = np.concatenate([g[key] + off for g, off in zip(graphs, offsets)], axis=1)
        else:
            arr = np.concatenate([np.asarray(g[key]) for g in graphs], axis=0)
        out[key] = _to_tensor(arr, dtype, device, key)
    out["batch"] = torch.repeat_interleave(
        torch.arange(len(graphs), device=device), torch.as_tensor(n_atoms, device=device)
    )
    return out


def replicate(batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """K copies of ``batch`` as consecutive blocks (copy 0 = all graphs, then copy 1, ...).

    ``edge_index`` and ``batch`` are offset per copy, ``structure_index`` is
    repeated, and ``replica`` (G*k,) long gives each graph's copy number.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if "replica" in batch:
        raise ValueError("batch is already replicated")
    n_atoms = batch["positions"].shape[0]
    n_graphs = batch["n_atoms"].shape[0]
    out = {}
    for key, value in batch.items():
        if key == "edge_index":
            out[key] = torch.cat([value + c * n_atoms for c in range(k)], dim=1)
        elif key == "batch":
            out[key] = torch.cat([value + c * n_graphs for c in range(k)], dim=0)
        elif key in ATOM_KEYS or key in EDGE_KEYS or key in GRAPH_KEYS:
            out[key] = torch.cat([value] * k, dim=0)
        else:
            raise ValueError(f"replicate does not know whether {key!r} is per atom, edge or graph")
    device = batch["n_atoms"].device
    out["replica"] = torch.arange(k, device=device).repeat_interleave(n_graphs)
    return out


def iterate_batches(items: Iterable, batch_size: int) -> Iterator[list]:
    """Yield consecutive chunks (lists) of at most ``batch_size`` items, in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(items)
    while chunk := list(islice(it, batch_size)):
        yield chunk
