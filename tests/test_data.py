"""Tests of blip.data: reading, labels, E0s, neighbour-list graphs, batching."""

import itertools
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from blip.data import (
    Structure,
    build_graph,
    check_elements,
    collate,
    e0s_from_file,
    e0s_least_squares,
    get_energy,
    get_forces,
    iterate_batches,
    read_labelled,
    read_structures,
    replicate,
    resolve_e0s,
)
from blip.errors import DataError

DATA = Path(__file__).parent / "data"
ACAC = DATA / "acac_small.xyz"
ACAC_E0 = DATA / "acac_isolated_atoms.xyz"
SI = DATA / "si_small.xyz"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def frame(symbols_positions, comment):
    lines = [str(len(symbols_positions)), comment]
    lines += [" ".join(str(x) for x in row) for row in symbols_positions]
    return "\n".join(lines) + "\n"


GOOD = 'energy=-1.5 pbc="F F F" Properties=species:S:1:pos:R:3:forces:R:3'


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("path", [ACAC, SI])
def test_labels_match_ase(path):
    structures = read_labelled(path)
    reference = ase.io.read(path, ":")
    assert len(structures) == len(reference) > 0
    for k, (s, ref) in enumerate(zip(structures, reference)):
        assert isinstance(s, Structure)
        assert s.index == k and s.source == str(path)
        assert isinstance(s.energy, float)
        assert s.energy == ref.get_potential_energy()
        assert s.forces.dtype == np.float64 and s.forces.shape == (len(ref), 3)
        np.testing.assert_array_equal(s.forces, ref.get_forces())
        np.testing.assert_array_equal(s.atoms.positions, ref.positions)


def test_first_acac_energy_value():
    # value from the first comment line of the file
    assert read_labelled(ACAC)[0].energy == pytest.approx(-9391.45554428476, abs=1e-9)


def test_extxyz_moves_energy_to_calculator_and_getters_find_it():
    atoms = ase.io.read(ACAC, 0)
    assert "energy" not in atoms.info and "forces" not in atoms.arrays
    assert get_energy(atoms, "energy") == atoms.calc.results["energy"]
    assert get_forces(atoms, "forces").shape == (len(atoms), 3)
    assert get_energy(atoms, "REF_energy") is None
    assert get_forces(atoms, "REF_forces") is None


def test_custom_label_keys(tmp_path):
    comment = 'REF_energy=-7.25 pbc="F F F" Properties=species:S:1:pos:R:3:REF_forces:R:3'
    path = write(tmp_path, "ref.xyz", frame([["H", 0, 0, 0, 1, 2, 3], ["H", 0, 0, 0.7, -1, -2, -3]], comment))
    (s,) = read_labelled(path, energy_key="REF_energy", forces_key="REF_forces")
    assert s.energy == -7.25
    np.testing.assert_array_equal(s.forces, [[1, 2, 3], [-1, -2, -3]])


def test_optional_labels(tmp_path):
    path = write(tmp_path, "nolabels.xyz", frame([["H", 0, 0, 0]], 'pbc="F F F"'))
    (s,) = read_labelled(path, require_energy=False, require_forces=False)
    assert s.energy is None and s.forces is None


def test_read_structures_index():
    assert len(read_structures(ACAC)) == 5
    (one,) = read_structures(ACAC, 2)
    np.testing.assert_array_equal(one.positions, ase.io.read(ACAC, 2).positions)


# ---------------------------------------------------------------- bad input


def assert_data_error(exc_info, path, index=None, *words):
    message = str(exc_info.value)
    assert "\n" not in message
    assert str(path) in message
    if index is not None:
        assert f"structure {index}" in message
        assert exc_info.value.index == index
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.xyz"
    with pytest.raises(DataError) as e:
        read_structures(path)
    assert_data_error(e, path, None, "not found")


def test_empty_file(tmp_path):
    for name, text in [("empty.xyz", ""), ("blank.xyz", "  \n\n")]:
        path = write(tmp_path, name, text)
        with pytest.raises(DataError) as e:
            read_labelled(path)
        assert_data_error(e, path, None, "no structures")


@pytest.mark.parametrize(
    "name, content",
    [("notes.txt", "hello world\nthis is not a structure\n"), ("garbage.xyz", "hello world\nnot xyz\n")],
)
def test_not_a_structure_file(tmp_path, name, content):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        read_structures(path)
    assert_data_error(e, path, None, "not a structure file ASE can read")


def test_binary_file(tmp_path):
    path = tmp_path / "binary.xyz"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError) as e:
        read_structures(path)
    assert_data_error(e, path, None, "not a structure file ASE can read")


def test_index_out_of_range():
    with pytest.raises(DataError) as e:
        read_structures(ACAC, 99)
    assert_data_error(e, ACAC, None, "99")


def test_missing_energy_key(tmp_path):
    good = frame([["H", 0, 0, 0, 0, 0, 0]], GOOD)
    bad = frame([["H", 0, 0, 0, 0, 0, 0]], 'config_type=md pbc="F F F" Properties=species:S:1:pos:R:3:forces:R:3')
    path = write(tmp_path, "noenergy.xyz", good + bad)
    with pytest.raises(DataError) as e:
        read_labelled(path)
    assert_data_error(e, path, 1, "'energy'", "config_type")


def test_missing_forces_key(tmp_path):
    path = write(tmp_path, "noforces.xyz", frame([["H", 0, 0, 0]], 'energy=1.0 pbc="F F F"'))
    with pytest.raises(DataError) as e:
        read_labelled(path)
    assert_data_error(e, path, 0, "'forces'")


def test_nan_forces(tmp_path):
    good = frame([["H", 0, 0, 0, 0, 0, 0]], GOOD)
    bad = frame([["H", 0, 0, 0, 0, 0, 0], ["H", 0, 0, 1, "nan", 0, 0]], GOOD)
    path = write(tmp_path, "nanforces.xyz", good + good + bad)
    with pytest.raises(DataError) as e:
        read_labelled(path)
    assert_data_error(e, path, 2, "NaN")


def test_inf_energy(tmp_path):
    comment = GOOD.replace("energy=-1.5", "energy=inf")
    path = write(tmp_path, "infenergy.xyz", frame([["H", 0, 0, 0, 0, 0, 0]], comment))
    with pytest.raises(DataError) as e:
        read_labelled(path)
    assert_data_error(e, path, 0, "inf")


def test_non_numeric_energy(tmp_path):
    comment = GOOD.replace("energy=-1.5", "energy=abc")
    path = write(tmp_path, "strenergy.xyz", frame([["H", 0, 0, 0, 0, 0, 0]], comment))
    with pytest.raises(DataError) as e:
        read_labelled(path)
    assert_data_error(e, path, 0, "not a number")


def test_wrong_forces_shape(tmp_path):
    comment = 'energy=1 pbc="F F F" Properties=species:S:1:pos:R:3:REF_forces:R:2'
    path = write(tmp_path, "shape.xyz", frame([["H", 0, 0, 0, 1, 2]], comment))
    with pytest.raises(DataError) as e:
        read_labelled(path, forces_key="REF_forces")
    assert_data_error(e, path, 0, "(1, 2)", "(1, 3)")


def test_nan_positions(tmp_path):
    good = frame([["H", 0, 0, 0]], 'pbc="F F F"')
    bad = frame([["H", "nan", 0, 0]], 'pbc="F F F"')
    path = write(tmp_path, "nanpos.xyz", good + bad)
    with pytest.raises(DataError) as e:
        read_structures(path)
    assert_data_error(e, path, 1, "positions")


def test_zero_atoms(tmp_path):
    path = write(tmp_path, "zero.xyz", frame([["H", 0, 0, 0]], 'pbc="F F F"') + "0\npbc=\"F F F\"\n")
    with pytest.raises(DataError) as e:
        read_structures(path)
    assert_data_error(e, path, 1, "zero atoms")


def test_unknown_element():
    structures = read_labelled(ACAC)
    check_elements(structures, {1, 6, 8}, ACAC)  # fine
    with pytest.raises(DataError) as e:
        check_elements(structures, {1, 6}, ACAC)
    assert_data_error(e, ACAC, 0, " O ", "not seen in training")
    mixed = [ase.Atoms("H2"), ase.Atoms("HXeKr")]
    with pytest.raises(DataError) as e:
        check_elements(mixed, {1}, "new.xyz")
    assert_data_error(e, "new.xyz", 1, "Kr, Xe")


# ---------------------------------------------------------------- E0s


def test_e0s_least_squares_recovers_known_values():
    rng = np.random.default_rng(0)
    true = {1: -13.6, 6: -1027.0, 8: -2038.0}
    structures = []
    for k in range(12):
        symbols = "".join(rng.choice(["H", "C", "O"], size=rng.integers(1, 8)))
        atoms = ase.Atoms(symbols)
        energy = sum(true[int(z)] for z in atoms.numbers)
        structures.append(Structure(atoms, energy, None, k, "synthetic"))
    fit = e0s_least_squares(structures)
    assert set(fit) == set(true)
    for z, e in true.items():
        assert fit[z] == pytest.approx(e, abs=1e-8)


def test_e0s_least_squares_single_composition():
    structures = [Structure(ase.Atoms("H2O"), -10.0 + 0.1 * k, None, k, "s") for k in range(3)]
    fit = e0s_least_squares(structures)
    assert 2 * fit[1] + fit[8] == pytest.approx(-9.9)
    assert all(np.isfinite(list(fit.values())))


def test_e0s_from_isolated_atoms_file():
    e0s = e0s_from_file(ACAC_E0)
    assert e0s == {
        1: pytest.approx(-13.568422178253735),
        6: pytest.approx(-1026.8538996116154),
        8: pytest.approx(-2037.796869412825),
    }


def test_e0s_file_with_molecule_is_an_error():
    with pytest.raises(DataError) as e:
        e0s_from_file(ACAC)
    assert_data_error(e, ACAC, 0, "single atoms")


def test_resolve_e0s():
    structures = read_labelled(ACAC)
    assert resolve_e0s(None, structures, "energy") == {1: 0.0, 6: 0.0, 8: 0.0}
    assert resolve_e0s(str(ACAC_E0), structures, "energy") == e0s_from_file(ACAC_E0)
    assert resolve_e0s("average", structures, "energy") == e0s_least_squares(structures)
    assert resolve_e0s({"H": 1, 6: 2, "O": 3}, structures, "energy") == {1: 1.0, 6: 2.0, 8: 3.0}
    si = read_labelled(SI)
    with pytest.raises(DataError) as e:
        resolve_e0s(ACAC_E0, si, "energy")
    assert_data_error(e, ACAC_E0, None, "Si")


# ---------------------------------------------------------------- graphs


def brute_force_edges(atoms, cutoff, n_images=None):
    """Set of (i, j, Sa, Sb, Sc) with |r_j - r_i + S @ cell| < cutoff, no self pair.

    Shifts range over enough images for a 3D cell, or -n_images..n_images if given.
    """
    pos, cell, pbc = atoms.positions, atoms.cell.array, atoms.pbc
    ranges = []
    for k in range(3):
        if not pbc[k]:
            ranges.append(range(1))
            continue
        if n_images is not None:
            ranges.append(range(-n_images, n_images + 1))
            continue
        normal = np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])
        height = abs(np.linalg.det(cell)) / np.linalg.norm(normal)
        spread = np.ptp(pos @ normal / np.linalg.norm(normal))
        n = int(np.ceil((cutoff + spread) / height)) + 1
        ranges.append(range(-n, n + 1))
    edges = set()
    for S in itertools.product(*ranges):
        d = np.linalg.norm(pos[None, :, :] - pos[:, None, :] + np.array(S) @ cell, axis=-1)
        for i, j in zip(*np.nonzero(d < cutoff)):
            if i != j or any(S):
                edges.add((int(i), int(j)) + S)
    return edges


def graph_edges(graph, cell):
    i, j = graph["edge_index"]
    S = np.rint(graph["shifts"] @ np.linalg.pinv(cell)).astype(int) if cell.any() else np.zeros((len(i), 3), int)
    np.testing.assert_allclose(S @ cell, graph["shifts"], atol=1e-9)
    return {(int(a), int(b)) + tuple(int(x) for x in s) for a, b, s in zip(i, j, S)}


def check_distances(graph, cutoff):
    i, j = graph["edge_index"]
    r = graph["positions"][j] - graph["positions"][i] + graph["shifts"]
    assert np.all(np.linalg.norm(r, axis=1) < cutoff)


def test_graph_open_system_vs_brute_force():
    atoms = ase.io.read(ACAC, 0)
    assert not atoms.pbc.any()
    g = build_graph(atoms, 3.0, index=7)
    assert g["positions"].dtype == np.float64 and g["numbers"].dtype == np.int64
    assert g["edge_index"].dtype == np.int64 and g["edge_index"].shape == (2, g["n_edges"][0])
    assert g["cell"].shape == (1, 3, 3) and not g["cell"].any()  # zeros when open
    assert g["pbc"].shape == (1, 3) and g["pbc"].dtype == bool
    assert g["n_atoms"].tolist() == [15] and g["structure_index"].tolist() == [7]
    assert not g["shifts"].any()
    assert "energy" not in g and "forces" not in g
    assert graph_edges(g, np.zeros((3, 3))) == brute_force_edges(atoms, 3.0)
    check_distances(g, 3.0)


def test_graph_periodic_vs_brute_force():
    atoms = ase.io.read(SI, 0)[:6]  # skewed triclinic cell, few atoms: many images
    assert atoms.pbc.all()
    g = build_graph(atoms, 5.0)
    edges = graph_edges(g, atoms.cell.array)
    assert edges == brute_force_edges(atoms, 5.0)
    assert len(edges) == g["n_edges"][0] > 0
    check_distances(g, 5.0)


def test_graph_small_cell_and_mixed_pbc():
    # cell much shorter than the cutoff: neighbours are periodic images
    atoms = ase.Atoms("Si", positions=[[0.1, 0.2, 0.3]], cell=np.diag([2.0, 2.5, 3.0]), pbc=True)
    g = build_graph(atoms, 4.0)
    assert graph_edges(g, atoms.cell.array) == brute_force_edges(atoms, 4.0)
    assert g["edge_index"].size and (g["edge_index"][0] == g["edge_index"][1]).all()
    # slab: periodic in a, b only, with a zero c vector
    rng = np.random.default_rng(3)
    slab = ase.Atoms("Si4", positions=rng.random((4, 3)) * [3, 3, 8], cell=np.diag([3.0, 3.0, 0.0]),
                     pbc=[True, True, False])
    g = build_graph(slab, 3.5)
    assert graph_edges(g, slab.cell.array) == brute_force_edges(slab, 3.5, n_images=3)
    assert (g["cell"][0] == slab.cell.array).all()  # mixed pbc keeps the cell
    assert np.abs(g["shifts"]).max() > 0
    # a non-periodic vector parallel to a periodic one must not matter
    junk = slab.copy()
    junk.cell = [[3.0, 0, 0], [0, 3.0, 0], [6.0, 0, 0]]
    h = build_graph(junk, 3.5)
    np.testing.assert_array_equal(h["edge_index"], g["edge_index"])
    np.testing.assert_allclose(h["shifts"], g["shifts"])


def test_graph_degenerate_periodic_cell_is_data_error():
    atoms = ase.Atoms("Si2", positions=[[0, 0, 0], [1, 1, 1]], cell=np.diag([3.0, 3.0, 0.0]), pbc=True)
    with pytest.raises(DataError) as e:
        build_graph(atoms, 3.0, index=4, source="cells.xyz")
    assert_data_error(e, "cells.xyz", 4, "zero volume")


def test_canonical_order_invariant_under_rotation():
    R = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    for atoms, cutoff in [(ase.io.read(ACAC, 1), 4.0), (ase.io.read(SI, 1)[:10], 4.5)]:
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ R.T
        rotated.cell = atoms.cell.array @ R.T
        g, h = build_graph(atoms, cutoff), build_graph(rotated, cutoff)
        np.testing.assert_array_equal(g["edge_index"], h["edge_index"])
        np.testing.assert_allclose(g["shifts"] @ R.T, h["shifts"], atol=1e-9)
        # canonical: sorted by (i, j, integer shift)
        S = np.rint(g["shifts"] @ np.linalg.pinv(atoms.cell.array)).astype(int) if atoms.pbc.any() else 0 * g["shifts"]
        keys = list(zip(*g["edge_index"], *S.T))
        assert keys == sorted(keys)


def test_graph_labels():
    (s,) = read_labelled(SI)[:1]
    g = build_graph(s.atoms, 3.0, energy=s.energy, forces=s.forces)
    assert g["energy"].tolist() == [s.energy] and g["energy"].dtype == np.float64
    np.testing.assert_array_equal(g["forces"], s.forces)


# ---------------------------------------------------------------- batching


def acac_graphs(n=3, cutoff=3.0, labels=True):
    structures = read_labelled(ACAC)[:n]
    return [
        build_graph(s.atoms, cutoff, index=s.index, energy=s.energy if labels else None,
                    forces=s.forces if labels else None)
        for s in structures
    ]


def test_collate_offsets_and_dtypes():
    graphs = acac_graphs(2) + [build_graph(ase.io.read(SI, 0), 3.0, index=10)]
    b = collate(graphs, dtype=torch.float64)
    n = [int(g["n_atoms"][0]) for g in graphs]
    e = [int(g["n_edges"][0]) for g in graphs]
    assert b["positions"].shape == (sum(n), 3) and b["positions"].dtype == torch.float64
    assert b["numbers"].dtype == torch.long and b["pbc"].dtype == torch.bool
    assert b["cell"].shape == (3, 3, 3) and b["pbc"].shape == (3, 3)
    assert b["n_atoms"].tolist() == n and b["n_edges"].tolist() == e
    assert b["structure_index"].tolist() == [0, 1, 10]
    assert b["batch"].tolist() == [0] * n[0] + [1] * n[1] + [2] * n[2]
    assert "energy" not in b and "forces" not in b  # the Si graph has no labels
    offsets = np.cumsum([0] + n[:-1])
    start = 0
    for g, off, ne in zip(graphs, offsets, e):
        np.testing.assert_array_equal(b["edge_index"][:, start:start + ne].numpy(), g["edge_index"] + off)
        start += ne
    # every edge joins atoms of the same graph
    assert torch.equal(b["batch"][b["edge_index"][0]], b["batch"][b["edge_index"][1]])


def test_collate_labels_and_float32():
    graphs = acac_graphs(3)
    b = collate(graphs)
    assert b["positions"].dtype == torch.float32 and b["forces"].dtype == torch.float32
    assert b["energy"].dtype == torch.float64  # totals of ~1e4 eV keep their meV in float64
    assert float(b["energy"][1]) == graphs[1]["energy"][0]
    assert b["energy"].shape == (3,) and b["forces"].shape == (45, 3)
    assert b["edge_index"].dtype == torch.long


def test_replicate_gives_identical_blocks():
    b = collate(acac_graphs(3))
    k = 4
    r = replicate(b, k)
    N, E, G = b["positions"].shape[0], b["edge_index"].shape[1], b["n_atoms"].shape[0]
    assert r["replica"].tolist() == sum([[c] * G for c in range(k)], [])
    assert r["structure_index"].tolist() == b["structure_index"].tolist() * k
    for c in range(k):
        atoms, edges, graphs = slice(c * N, (c + 1) * N), slice(c * E, (c + 1) * E), slice(c * G, (c + 1) * G)
        assert torch.equal(r["positions"][atoms], b["positions"])
        assert torch.equal(r["forces"][atoms], b["forces"])
        assert torch.equal(r["numbers"][atoms], b["numbers"])
        assert torch.equal(r["batch"][atoms], b["batch"] + c * G)
        assert torch.equal(r["edge_index"][:, edges], b["edge_index"] + c * N)
        assert torch.equal(r["shifts"][edges], b["shifts"])
        for key in ["cell", "pbc", "n_atoms", "n_edges", "energy"]:
            assert torch.equal(r[key][graphs], b[key])
    # the replicated batch is itself a valid batch: same as collating the graphs k times
    again = collate(acac_graphs(3) * k)
    for key in again:
        assert torch.equal(again[key], r[key]), key


def test_iterate_batches():
    assert list(iterate_batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iterate_batches([], 2)) == []
    with pytest.raises(ValueError):
        list(iterate_batches([1], 0))
