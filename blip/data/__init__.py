"""Data layer: reading and validation, labels, E0s, neighbour-list graphs, batching."""

from blip.data.batch import collate, iterate_batches, replicate
from blip.data.e0s import e0s_from_file, e0s_least_squares, resolve_e0s
from blip.data.graph import build_graph
from blip.data.io import (
    Structure,
    all_periodic,
    check_elements,
    get_energy,
    get_forces,
    read_labelled,
    read_structures,
)

__all__ = [
    "Structure",
    "all_periodic",
    "read_structures",
    "get_energy",
    "get_forces",
    "read_labelled",
    "check_elements",
    "e0s_from_file",
    "e0s_least_squares",
    "resolve_e0s",
    "build_graph",
    "collate",
    "replicate",
    "iterate_batches",
]
