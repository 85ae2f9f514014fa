"""Tests of openmm_backmap.mapping: hand-computed bead positions, forces, presets, PBC, topology, I/O."""
from __future__ import annotations

import warnings

import mdtraj as md
import numpy as np
import pytest
import yaml
from openmm import app, unit

from openmm_backmap.mapping import Bead, CGMapping, available_presets

M_H, M_C, M_N, M_O = 1.007947, 12.01078, 14.00672, 15.99943  # element masses (OpenMM, mdtraj), amu


# ---------------------------------------------------------------------- topology builders
@pytest.fixture(scope="module")
def amber():
    return app.ForceField("amber14-all.xml")


@pytest.fixture(scope="module")
def charmm():
    return app.ForceField("charmm36.xml")


def from_templates(forcefield, resnames, link=("C", "N"), reverse=False):
    """A one-chain topology of force-field residue templates, consecutive residues joined C-N.

    ``reverse`` adds each residue's atoms in reverse template order.
    """
    top = app.Topology()
    chain = top.addChain()
    previous = None
    for resname in resnames:
        template = forcefield._templates[resname]
        residue = top.addResidue(resname, chain)
        order = range(len(template.atoms))[::-1] if reverse else range(len(template.atoms))
        by_index = {k: top.addAtom(template.atoms[k].name, template.atoms[k].element, residue) for k in order}
        for i, j in template.bonds:
            top.addBond(by_index[i], by_index[j])
        by_name = {a.name: a for a in by_index.values()}
        if previous is not None and link[0] in previous and link[1] in by_name:
            top.addBond(previous[link[0]], by_name[link[1]])
        previous = by_name
    return top


def small_molecule(elements, bonds, resname="MOL", n_copies=1):
    """Hand-made molecule(s): atoms named by element and index."""
    top = app.Topology()
    chain = top.addChain()
    for _ in range(n_copies):
        residue = top.addResidue(resname, chain)
        atoms = [
            top.addAtom(f"{symbol}{k}", app.Element.getBySymbol(symbol), residue) for k, symbol in enumerate(elements)
        ]
        for i, j in bonds:
            top.addBond(atoms[i], atoms[j])
    return top


def atom_index(top, resname, name):
    return next(a.index for a in top.atoms() if a.residue.name == resname and a.name == name)


@pytest.fixture(scope="module")
def adp(amber):
    return from_templates(amber, ["ACE", "ALA", "NME"])


@pytest.fixture(scope="module")
def adp_hbonds(amber, adp):
    return amber.createSystem(adp, constraints=app.HBonds)


def benzene_positions():
    """Ideal benzene in BENZ atom order (ring CG, CD1, CE1, CZ, CE2, CD2 at 60-degree steps), nm."""
    ring = ["CG", "CD1", "CE1", "CZ", "CE2", "CD2"]
    hydrogen = {"CG": "HG", "CD1": "HD1", "CE1": "HE1", "CZ": "HZ", "CE2": "HE2", "CD2": "HD2"}
    xyz = {}
    for k, carbon in enumerate(ring):
        direction = np.array([np.cos(k * np.pi / 3), np.sin(k * np.pi / 3), 0.0])
        xyz[carbon] = 0.14 * direction
        xyz[hydrogen[carbon]] = 0.248 * direction
    names = ["CG", "HG", "CD1", "HD1", "CD2", "HD2", "CE1", "HE1", "CE2", "HE2", "CZ", "HZ"]
    return np.array([xyz[n] for n in names])


def is_lattice_vector(delta, box):
    frac = np.linalg.solve(box.T, delta.T).T
    return np.allclose(frac, np.round(frac), atol=1e-9)


def wrap(xyz, box):
    """Put every atom into the (triclinic) unit cell on its own: splits molecules at the boundary."""
    frac = xyz @ np.linalg.inv(box)
    return (frac - np.floor(frac)) @ box


# ---------------------------------------------------------------------- hand-computed maps
def test_com_and_cog_of_water_by_hand():
    top = small_molecule(["O", "H", "H"], [(0, 1), (0, 2)], resname="HOH")
    xyz = np.array([[0.0, 0.0, 0.0], [0.09572, 0.0, 0.0], [-0.02399, 0.09266, 0.0]])
    com = CGMapping(top, [Bead("W", [0, 1, 2])])
    cog = CGMapping(top, [Bead("W", "all")], weights="cog")
    total = M_O + 2 * M_H
    expected_com = [M_H * (0.09572 - 0.02399) / total, M_H * 0.09266 / total, 0.0]
    assert np.allclose(com.map_positions(xyz), [expected_com], atol=1e-6)
    assert np.allclose(cog.map_positions(xyz), [[(0.09572 - 0.02399) / 3, 0.09266 / 3, 0.0]])
    assert np.array_equal(cog.force_matrix, [[1.0, 1.0, 1.0]]) and np.array_equal(com.force_matrix, [[1.0, 1.0, 1.0]])
    assert np.allclose(com.bead_masses, [total], atol=1e-4)
    assert np.allclose(com.position_matrix, [[M_O / total, M_H / total, M_H / total]], atol=1e-5)
    assert com.bead_types == ["W"] and com.bead_names == ["W"]


def test_shared_atom_positions_forces_and_masses_by_hand():
    # C0-O1-N2 chain, two beads sharing O1: each gets half its mass and half its force.
    top = small_molecule(["C", "O", "N"], [(0, 1), (1, 2)])
    mapping = CGMapping(top, [Bead("A", [0, 1], type="X"), Bead("B", [1, 2], type="X")])
    xyz = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.1, 0.1, 0.0]])
    forces = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [-4.0, 0.0, 4.0]])

    bead_a = (M_O / 2 * 0.1) / (M_C + M_O / 2)
    bead_b = np.array([0.1, (M_N * 0.1) / (M_O / 2 + M_N), 0.0])
    assert np.allclose(mapping.map_positions(xyz), [[bead_a, 0, 0], bead_b], atol=1e-7)
    assert np.allclose(mapping.map_forces(forces), [[6.0, 12.0, 18.0], [1.0, 10.0, 19.0]])
    assert np.allclose(mapping.bead_masses, [M_C + M_O / 2, M_O / 2 + M_N], atol=1e-4)
    assert np.allclose(mapping.position_matrix.sum(axis=1), 1.0)
    np.testing.assert_array_equal(mapping.position_matrix_sparse.toarray(), mapping.position_matrix)
    assert np.allclose(mapping.force_matrix, [[1, 0.5, 0], [0, 0.5, 1]])
    assert mapping.bead_types == ["X", "X"]
    # Overlapping beads with net-force shares are not an MS-CG-consistent force map.
    assert not mapping.is_force_map_consistent

    explicit = CGMapping(top, [Bead("A", [0, 1], shares=[1.0, 0.25]), Bead("B", [1, 2], shares=[0.75, 1.0])])
    assert np.allclose(explicit.map_forces(forces), [[3.5, 7.0, 10.5], [3.5, 15.0, 26.5]])
    assert np.allclose(explicit.bead_masses, [M_C + M_O / 4, 0.75 * M_O + M_N], atol=1e-4)


def test_batched_maps_match_single_frames_and_accept_quantities(adp):
    mapping = CGMapping.from_preset(adp, "residue")
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(4, 22, 3))
    batched = mapping.map_positions(xyz)
    assert batched.shape == (4, 3, 3)
    for frame in range(4):
        assert np.allclose(batched[frame], mapping.map_positions(xyz[frame]))
    assert np.allclose(mapping.map_positions(xyz[0] * 10 * unit.angstrom), batched[0])
    quantity = xyz[0] * 1000 * unit.kilojoule_per_mole / unit.micrometer  # = 1 kJ/mol/nm per unit of xyz
    assert np.allclose(mapping.map_forces(quantity), mapping.map_forces(xyz[0]))


@pytest.mark.parametrize("preset", ["residue", "molecule"])
def test_force_conservation_when_every_atom_is_mapped_once(adp, preset):
    mapping = CGMapping.from_preset(adp, preset)
    forces = np.random.default_rng(1).normal(size=(5, 22, 3))
    assert np.allclose(mapping.map_forces(forces).sum(axis=1), forces.sum(axis=1))
    assert mapping.is_force_map_consistent


# ---------------------------------------------------------------------- constraint-aware forces
def test_backbone_cb_forces_without_constraints_are_the_bead_atoms_own(adp):
    mapping = CGMapping.from_preset(adp, "backbone-cb")
    forces = np.random.default_rng(2).normal(size=(22, 3))
    atoms = [b.atoms[0] for b in mapping.beads]
    assert np.allclose(mapping.map_forces(forces), forces[atoms])


def test_backbone_cb_forces_with_hbond_constraints(adp, adp_hbonds):
    mapping = CGMapping.from_preset(adp, "backbone-cb", system=adp_hbonds)
    forces = np.random.default_rng(3).normal(size=(22, 3))
    f = {(a.residue.name, a.name): forces[a.index] for a in adp.atoms()}
    expected = [
        f["ACE", "C"],
        f["ALA", "N"] + f["ALA", "H"],
        f["ALA", "CA"] + f["ALA", "HA"],
        f["ALA", "CB"] + f["ALA", "HB1"] + f["ALA", "HB2"] + f["ALA", "HB3"],
        f["ALA", "C"],
        f["NME", "N"] + f["NME", "H"],
    ]
    assert np.allclose(mapping.map_forces(forces), expected)
    assert mapping.is_force_map_consistent
    assert len(mapping.constraints) == adp_hbonds.getNumConstraints()

    # Atoms in no bead and not constrained to one (O, ACE and NME methyls) do not leak in.
    dropped = np.zeros((22, 3))
    for a in adp.atoms():
        if a.name in ("O", "CH3", "HH31", "HH32", "HH33"):
            dropped[a.index] = 1.0
    assert np.allclose(mapping.map_forces(dropped), 0.0)

    late = CGMapping.from_preset(adp, "backbone-cb").with_constraints(adp_hbonds)
    assert np.array_equal(late.force_matrix, mapping.force_matrix)


def test_constraint_cluster_touching_two_beads_splits_and_warns():
    # X0 - H1 - X2 with both bonds constrained; H1 is in no bead.
    top = small_molecule(["C", "H", "C"], [(0, 1), (1, 2)])
    mapping = CGMapping(top, [Bead("A", [0]), Bead("B", [2])])
    with pytest.warns(UserWarning, match="constraint forces"):
        constrained = mapping.with_constraints([(0, 1), (1, 2)])
    assert np.allclose(constrained.force_matrix, [[1, 0.5, 0], [0, 0.5, 1]])
    assert not constrained.is_force_map_consistent
    assert np.allclose(mapping.force_matrix, [[1, 0, 0], [0, 0, 1]])  # the original is unchanged


def test_all_bonds_constraints_across_beads_warn(amber, adp):
    system = amber.createSystem(adp, constraints=app.AllBonds)
    with pytest.warns(UserWarning, match="constrained atoms"):
        mapping = CGMapping.from_preset(adp, "backbone-cb", system=system)
    assert not mapping.is_force_map_consistent


def test_cumene_hydrogen_follows_the_shared_ch_group(charmm):
    top = from_templates(charmm, ["CUME"])
    system = charmm.createSystem(top, constraints=app.HBonds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapping = CGMapping.from_preset(top, "cumene-3bead", system=system)
    h41, c4 = atom_index(top, "CUME", "H41"), atom_index(top, "CUME", "C4")
    assert np.allclose(mapping.force_matrix[:, [c4, h41]], [[0.5, 0.5], [0, 0], [0.5, 0.5]])


# ---------------------------------------------------------------------- periodic boundaries
ORTHORHOMBIC = np.diag([2.0, 2.5, 3.0])
TRICLINIC = np.array([[3.0, 0.0, 0.0], [1.0, 2.8, 0.0], [-1.2, 1.0, 2.6]])


@pytest.mark.parametrize("box", [ORTHORHOMBIC, TRICLINIC], ids=["orthorhombic", "triclinic"])
def test_split_molecules_map_to_the_same_beads(charmm, box):
    top = from_templates(charmm, ["BENZ", "BENZ"])
    top.setPeriodicBoxVectors(box * unit.nanometer)
    mapping = CGMapping.from_preset(top, "benzene-3bead")
    cg_box = mapping.to_openmm_topology().getPeriodicBoxVectors().value_in_unit(unit.nanometer)
    assert np.allclose(np.array(cg_box), box)
    one = benzene_positions()
    whole = np.concatenate([one + 0.02, one + box[0] + box[1] + box[2] - 0.03])  # both across corners
    split = wrap(whole, box)
    assert not np.allclose(split, whole)

    beads_whole = mapping.map_positions(whole)
    beads_split = mapping.map_positions(split, box)
    for bead in range(mapping.n_beads):
        assert is_lattice_vector(beads_split[bead] - beads_whole[bead], box)
    # Bead geometry inside each molecule is exact: an equilateral triangle around the ring centre.
    triangle = beads_split[:3] - beads_split[:3].mean(axis=0)
    assert np.allclose(np.linalg.norm(triangle, axis=1), np.linalg.norm(beads_whole[0] - whole[:12].mean(axis=0)))

    restored = mapping.make_molecules_whole(split, box)
    for a, b in top.bonds():
        assert np.isclose(
            np.linalg.norm(restored[a.index] - restored[b.index]), np.linalg.norm(whole[a.index] - whole[b.index])
        )
    for molecule in (slice(0, 12), slice(12, 24)):
        shift = restored[molecule] - whole[molecule]
        assert np.allclose(shift, shift[0]) and is_lattice_vector(shift[0], box)


def test_pbc_per_frame_boxes(charmm):
    top = from_templates(charmm, ["BENZ"])
    mapping = CGMapping.from_preset(top, "benzene-3bead")
    boxes = np.stack([ORTHORHOMBIC, TRICLINIC])
    whole = np.stack([benzene_positions() + 0.01, benzene_positions() - 0.01])
    split = np.stack([wrap(whole[k], boxes[k]) for k in range(2)])
    beads = mapping.map_positions(split, boxes)
    reference = mapping.map_positions(whole)
    for k in range(2):
        for bead in range(3):
            assert is_lattice_vector(beads[k, bead] - reference[k, bead], boxes[k])
    with pytest.raises(ValueError, match="frames"):
        mapping.map_positions(split[:1], boxes)


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("reverse", [False, True], ids=["template-order", "reversed-atoms"])
def test_backbone_cb_preset_on_alanine_dipeptide(amber, reverse):
    adp = from_templates(amber, ["ACE", "ALA", "NME"], reverse=reverse)
    mapping = CGMapping.from_preset(adp, "backbone-cb")
    expected = [("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "CB"), ("ALA", "C"), ("NME", "N")]
    assert [b.atoms for b in mapping.beads] == [(atom_index(adp, *key),) for key in expected]
    assert mapping.bead_names == ["C", "N", "CA", "CB", "C", "N"]
    assert mapping.bead_types == ["C", "N", "CA", "CB", "C", "N"]
    assert np.array_equal(mapping.position_matrix, mapping.force_matrix)
    assert np.allclose(mapping.bead_masses, [M_C, M_N, M_C, M_C, M_C, M_N], atol=1e-4)

    cg = mapping.cg_topology
    assert [r.name for r in cg.residues] == ["ACE", "ALA", "NME"]
    assert [a.element.symbol for a in cg.atoms] == ["C", "N", "C", "C", "C", "N"]
    assert sorted((b[0].index, b[1].index) for b in cg.bonds) == [(0, 1), (1, 2), (2, 3), (2, 4), (4, 5)]


def test_ca_and_backbone_cb_presets_on_a_peptide(amber):
    top = from_templates(amber, ["ACE", "ALA", "GLY", "SER", "NME"])
    ca = CGMapping.from_preset(top, "ca")
    assert ca.bead_types == ["ALA", "GLY", "SER"] and ca.bead_names == ["CA"] * 3
    assert [b.atoms[0] for b in ca.beads] == [atom_index(top, r, "CA") for r in ("ALA", "GLY", "SER")]
    assert sorted((b[0].index, b[1].index) for b in ca.cg_topology.bonds) == [(0, 1), (1, 2)]

    bb = CGMapping.from_preset(top, "backbone-cb")
    assert bb.bead_names == ["C", "N", "CA", "CB", "C", "N", "CA", "C", "N", "CA", "CB", "C", "N"]
    bonds = sorted((b[0].index, b[1].index) for b in bb.cg_topology.bonds)
    assert bonds == [(0, 1), (1, 2), (2, 3), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10), (9, 11),
                     (11, 12)]


def test_molecule_preset_on_a_small_box(charmm):
    top = small_molecule(["O", "H", "H"], [(0, 1), (0, 2)], resname="HOH", n_copies=2)
    chain = top.addChain()
    template = charmm._templates["BENZ"]
    residue = top.addResidue("BENZ", chain)
    atoms = [top.addAtom(a.name, a.element, residue) for a in template.atoms]
    for i, j in template.bonds:
        top.addBond(atoms[i], atoms[j])
    mapping = CGMapping.from_preset(top, "molecule")
    assert [b.atoms for b in mapping.beads] == [(0, 1, 2), (3, 4, 5), tuple(range(6, 18))]
    assert mapping.bead_types == ["HOH", "HOH", "BENZ"]
    assert np.allclose(mapping.bead_masses, [M_O + 2 * M_H] * 2 + [6 * (M_C + M_H)], atol=1e-3)
    assert mapping.cg_topology.n_bonds == 0
    assert [c.n_atoms for c in mapping.cg_topology.chains] == [2, 1]


def test_benzene_three_bead_preset(charmm):
    top = from_templates(charmm, ["BENZ"])
    mapping = CGMapping.from_preset(top, "benzene-3bead")
    assert mapping.n_beads == 3 and all(len(b.atoms) == 4 for b in mapping.beads)
    assert np.allclose(mapping.force_matrix.sum(axis=0), 1.0)  # every atom exactly once
    assert mapping.bead_types == ["B", "B", "B"]
    assert sorted((b[0].index, b[1].index) for b in mapping.cg_topology.bonds) == [(0, 1), (0, 2), (1, 2)]
    # Bead 1 = CG, HG, CD1, HD1 (ring atoms 0 and 1 at 0 and 60 degrees).
    xyz = benzene_positions()
    half = np.array([np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0]) * np.cos(np.pi / 6)
    expected = half * (M_C * 0.14 + M_H * 0.248) / (M_C + M_H)
    assert np.allclose(mapping.map_positions(xyz)[0], expected, atol=1e-7)


def test_cumene_preset_shares_the_ch_group(charmm):
    top = from_templates(charmm, ["CUME"])
    mapping = CGMapping.from_preset(top, "cumene-3bead")
    c4, h41 = atom_index(top, "CUME", "C4"), atom_index(top, "CUME", "H41")
    a1, b, a2 = mapping.beads
    assert (a1.type, b.type, a2.type) == ("A", "B", "A")
    for bead in (a1, a2):
        assert dict(zip(bead.atoms, bead.shares))[c4] == 0.5 and dict(zip(bead.atoms, bead.shares))[h41] == 0.5
    assert c4 not in b.atoms
    assert np.allclose(mapping.force_matrix.sum(axis=0), 1.0)
    ch3, ch = M_C + 3 * M_H, M_C + M_H
    assert np.allclose(mapping.bead_masses, [ch3 + ch / 2, 6 * M_C + 5 * M_H, ch3 + ch / 2], atol=1e-3)
    assert mapping.cg_topology.n_bonds == 3


@pytest.mark.parametrize("preset, n_beads", [("hexane-2bead", 2), ("hexane-3bead", 3)])
def test_hexane_presets_cover_every_atom_once(charmm, preset, n_beads):
    top = from_templates(charmm, ["HEXA"])
    mapping = CGMapping.from_preset(top, preset)
    assert mapping.n_beads == n_beads and mapping.cg_topology.n_bonds == n_beads - 1
    assert np.allclose(mapping.force_matrix.sum(axis=0), 1.0)


def test_available_presets_lists_builtins_and_shipped_files():
    names = available_presets()
    assert names[:4] == ["ca", "backbone-cb", "residue", "molecule"]
    assert {"benzene-3bead", "cumene-3bead", "hexane-3bead"} <= set(names)


def test_mdtraj_topology_input_and_cg_outputs(adp, tmp_path):
    from_openmm = CGMapping.from_preset(adp, "backbone-cb")
    from_mdtraj = CGMapping.from_preset(md.Topology.from_openmm(adp), "backbone-cb")
    assert from_mdtraj.topology_fingerprint == from_openmm.topology_fingerprint
    assert np.array_equal(from_mdtraj.position_matrix, from_openmm.position_matrix)

    omm = from_openmm.to_openmm_topology()
    assert omm.getNumAtoms() == 6 and omm.getNumBonds() == 5
    path = tmp_path / "cg.pdb"
    md.Trajectory(np.zeros((1, 6, 3)), from_openmm.cg_topology).save_pdb(str(path))
    back = md.load(str(path)).topology
    assert [a.name for a in back.atoms] == from_openmm.bead_names
    assert [a.element.symbol for a in back.atoms] == ["C", "N", "C", "C", "C", "N"]


# ---------------------------------------------------------------------- YAML I/O
def test_yaml_round_trip(adp, adp_hbonds, charmm, tmp_path):
    mapping = CGMapping.from_preset(adp, "backbone-cb", system=adp_hbonds)
    path = tmp_path / "adp.yaml"
    mapping.save(path)
    doc = yaml.safe_load(path.read_text())
    assert doc["format"] == "openmm-backmap-mapping" and doc["format_version"] == 1 and doc["n_atoms"] == 22
    loaded = CGMapping.load(path, adp)
    assert np.array_equal(loaded.position_matrix, mapping.position_matrix)
    assert np.array_equal(loaded.force_matrix, mapping.force_matrix)
    assert loaded.bead_names == mapping.bead_names and loaded.bead_types == mapping.bead_types

    cumene = from_templates(charmm, ["CUME"])
    shared = CGMapping.from_preset(cumene, "cumene-3bead", weights="cog")
    shared.save(tmp_path / "cume.yaml")
    again = CGMapping.load(tmp_path / "cume.yaml", cumene)
    assert again.weights == "cog"
    assert np.array_equal(again.position_matrix, shared.position_matrix)
    assert np.array_equal(again.force_matrix, shared.force_matrix)


def test_loading_for_another_molecule_fails(adp, amber, tmp_path):
    path = tmp_path / "adp.yaml"
    CGMapping.from_preset(adp, "backbone-cb").save(path)
    other = from_templates(amber, ["ACE", "GLY", "NME"])
    with pytest.raises(ValueError, match="another topology"):
        CGMapping.load(path, other)
    same_size = from_templates(amber, ["ACE", "ALA", "NME"])
    next(same_size.residues()).name = "XYZ"
    with pytest.raises(ValueError, match="fingerprint"):
        CGMapping.load(path, same_size)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda text: text.replace("format_version: 1", "format_version: 99"), "format_version"),
        (lambda text: text.replace("openmm-backmap-mapping", "something-else"), "format"),
        (lambda text: text + "\n  - [unclosed", "YAML"),
        (lambda text: "- just a list\n", "mapping"),
        (lambda text: text.replace("atoms: [4]", "atoms: [400]"), "out of range"),
        (lambda text: text.replace("weights: com\n", ""), "lacks weights"),
    ],
)
def test_corrupted_mapping_files_are_refused(adp, tmp_path, edit, message):
    path = tmp_path / "adp.yaml"
    CGMapping.from_preset(adp, "backbone-cb").save(path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ValueError, match=message):
        CGMapping.load(path, adp)


def test_fragment_files_and_dicts(charmm, tmp_path):
    top = from_templates(charmm, ["BENZ"])
    spec = {"residues": {"BENZ": [{"name": "R", "atoms": ["CG", "CD1", "CD2", "CE1", "CE2", "CZ"]}]}}
    ring = CGMapping.from_fragments(top, spec, weights="cog")
    assert ring.n_beads == 1 and np.allclose(ring.map_positions(benzene_positions()), 0.0)
    path = tmp_path / "frag.yaml"
    path.write_text(yaml.safe_dump({"format": "openmm-backmap-fragments", "format_version": 2, **spec}))
    with pytest.raises(ValueError, match="format_version"):
        CGMapping.from_fragments(top, path)
    with pytest.raises(ValueError, match=r"\['XX'\] not in residue"):
        CGMapping.from_fragments(top, {"residues": {"BENZ": [{"name": "R", "atoms": ["CG", "XX"]}]}})
    with pytest.raises(ValueError, match="none of the residues"):
        CGMapping.from_fragments(top, {"residues": {"TOLU": [{"name": "R", "atoms": ["CG"]}]}})


# ---------------------------------------------------------------------- bad input
def test_bad_bead_definitions(amber, adp, adp_hbonds):
    with pytest.raises(ValueError, match=r"'CZ'.*resname TRP.*matches no atom"):
        CGMapping(adp, [Bead("CZ", "resname TRP")])
    with pytest.raises(ValueError, match="invalid selection"):
        CGMapping(adp, [Bead("X", "name CA and and")])
    with pytest.raises(ValueError, match="atom index 22 out of range"):
        CGMapping(adp, [Bead("X", [0, 22])])
    with pytest.raises(ValueError, match="has no atoms"):
        CGMapping(adp, [Bead("X", [])])
    with pytest.raises(ValueError, match="at least one bead"):
        CGMapping(adp, [])
    with pytest.raises(ValueError, match="more than once"):
        CGMapping(adp, [Bead("X", [1, 1])])
    with pytest.raises(ValueError, match="add up to"):
        CGMapping(adp, [Bead("X", [1], shares=[0.8]), Bead("Y", [1], shares=[0.8])])
    with pytest.raises(ValueError, match="shares must lie"):
        CGMapping(adp, [Bead("X", [1], shares=[1.5])])
    with pytest.raises(ValueError, match="weights"):
        CGMapping(adp, [Bead("X", [1])], weights="mass")
    with pytest.raises(ValueError, match="unknown mapping preset"):
        CGMapping.from_preset(adp, "martini")
    with pytest.raises(ValueError, match="atom index pairs"):
        CGMapping(adp, [Bead("X", [1])]).with_constraints([0, 1, 2])
    with pytest.raises(ValueError, match="constraint atom indices"):
        CGMapping(adp, [Bead("X", [1])]).with_constraints([(0, 22)])
    with pytest.raises(ValueError, match="system has 22 particles"):
        CGMapping.from_preset(from_templates(amber, ["ACE", "GLY", "NME"]), "ca", system=adp_hbonds)


def test_bad_coordinates_forces_and_boxes(adp):
    mapping = CGMapping.from_preset(adp, "backbone-cb")
    xyz = np.zeros((22, 3))
    with pytest.raises(ValueError, match="21 particles but 22"):
        mapping.map_positions(xyz[:21])
    nan = xyz.copy()
    nan[5, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mapping.map_positions(nan)
    with pytest.raises(ValueError, match="forces has 20 particles"):
        mapping.map_forces(np.zeros((3, 20, 3)))
    with pytest.raises(ValueError, match="forces must have shape"):
        mapping.map_forces(np.zeros((22, 2)))
    with pytest.raises(ValueError, match="reduced form"):
        mapping.map_positions(xyz, np.array([[2.0, 0.1, 0], [0, 2, 0], [0, 0, 2]]))
    with pytest.raises(ValueError, match="box_vectors must have shape"):
        mapping.map_positions(xyz, np.eye(2))
