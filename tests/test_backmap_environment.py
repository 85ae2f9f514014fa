"""Local-environment conditioning of the backmapper (liquids): neighbour search, invariances, size transfer."""
import numpy as np
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.backmap import TemporalBackmapper
from openmm_backmap.mapping import CGMapping


@pytest.fixture(scope="module")
def benzene_box():
    liq = systems.liquid("BENZ", n_molecules=24, seed=3, cutoff_nm=0.6, switch_nm=0.5)
    box = np.array(liq.topology.getPeriodicBoxVectors().value_in_unit(__import__("openmm").unit.nanometer))
    return liq, np.asarray(liq.positions_nm), box


def _randomize(model, seed=0):
    """Random weights everywhere (the decoder's last layer starts at zero, which would hide the condition)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _model(liq, preset, cutoff=0.5, previous=True, k=48):
    mapping = CGMapping.from_preset(liq.topology, preset)
    model = TemporalBackmapper(mapping, hidden=32, latent_dim=4, n_layers=2, library_size=0,
                               environment_cutoff_nm=cutoff, environment_neighbors=k, environment_dim=16,
                               condition_on_previous=previous)
    # templates from the first molecule, so local frames are well defined
    xyz = torch.as_tensor(liq.positions_nm)
    kind = model.kinds[0]
    unit = xyz[model.layout.kinds[0].atom_index[0]]
    w = kind.bead_weights.double()
    tpl = unit - (w @ unit).mean(0)
    kind.atom_template.copy_(tpl.float())
    kind.bead_template.copy_((w @ tpl).float())
    return _randomize(model), mapping


def _brute_neighbors(centres, points, box, cutoff, point_unit, units):
    out = []
    for c, u in zip(centres, units):
        d = points - c
        d -= np.round(d / np.diag(box)) * np.diag(box)
        r = np.linalg.norm(d, axis=1)
        out.append({j for j in np.flatnonzero(r <= cutoff) if point_unit[j] != u})
    return out


@pytest.mark.parametrize("preset", ["molecule", "benzene-3bead"])
def test_neighbor_search_finds_every_point_of_other_molecules_within_the_cutoff(benzene_box, preset):
    liq, xyz, box = benzene_box
    model, mapping = _model(liq, preset, k=200)
    env = model.environment_index
    beads = mapping.map_positions(xyz[None])[0]
    atoms = xyz[model.atom_indices]
    points = np.concatenate([beads, atoms])
    point_unit = np.concatenate([env.bead_unit, env.atom_unit])
    kind = model.layout.kinds[0]
    centres = beads[kind.bead_index].mean(axis=1) + np.array([3.1, -7.4, 12.2])  # any image of the centres
    found = env._search(centres, points + 5 * np.diag(box), box, env.unit_ids[0], point_unit)
    expected = _brute_neighbors(centres, points, box, env.cutoff, point_unit, env.unit_ids[0])
    for row, exp in zip(found, expected):
        assert {j for j in row if j >= 0} == exp  # fewer than max_neighbors here: all of them
        assert len(exp) > 0
    # with fewer slots than neighbours, the nearest ones are kept
    env.max_neighbors = 8
    few = env._search(centres, points, box, env.unit_ids[0], point_unit)
    for row, c in zip(few, centres):
        d = points - c
        d -= np.round(d / np.diag(box)) * np.diag(box)
        r = np.linalg.norm(d, axis=1)
        kept = r[row[row >= 0]]
        assert len(kept) == 8 and np.all(np.diff(kept) >= -1e-12)
    env.max_neighbors = 200
    # the triclinic fallback (chunked minimum image) agrees with the periodic k-d tree
    brute = env._brute_force(centres, points, box, found.shape[1] + 20)
    for row, b in zip(found, brute):
        assert {j for j in row if j >= 0} <= {j for j in b if j >= 0}


def _decode_conditions(model, beads, previous, box):
    """Condition vectors of every unit (deterministic part of the decoder input), in unit order."""
    b = torch.as_tensor(beads)[None]
    p = torch.as_tensor(previous)[None]
    bx = torch.as_tensor(box)[None] if box is not None else None
    kind = model.kinds[0]
    ub, up = model.gather(0, b, p)
    ubox = bx.repeat_interleave(ub.shape[0], dim=0) if bx is not None else None
    origin, rot, lb, lp = kind.local_frames(ub, up, ubox)
    env = model.environment(0, origin, rot, b, p, bx)
    with torch.no_grad():
        return kind.condition(lb.float(), lp.float(), model.length_scale, env).numpy(), env


@pytest.mark.parametrize("preset", ["molecule", "benzene-3bead"])
def test_environment_condition_is_invariant_to_translation_and_wrapping(benzene_box, preset):
    liq, xyz, box = benzene_box
    model, mapping = _model(liq, preset)
    beads = mapping.map_positions(xyz[None])[0]
    prev = xyz[model.atom_indices]
    cond_a, env_a = _decode_conditions(model, beads, prev, box)
    assert env_a.weight.gt(0).sum(dim=1).min() > 0  # every molecule has neighbours in a liquid
    shift = np.array([0.37, -1.1, 2.9])
    L = np.diag(box)
    # translate everything and wrap beads and atoms independently into the box: same conditions
    cond_b, _ = _decode_conditions(model, np.mod(beads + shift, L), np.mod(prev + shift, L), box)
    np.testing.assert_allclose(cond_b, cond_a, atol=2e-4)


def test_environment_condition_sees_near_molecules_and_ignores_far_ones(benzene_box):
    liq, xyz, box = benzene_box
    model, mapping = _model(liq, "benzene-3bead", cutoff=0.45)
    beads = mapping.map_positions(xyz[None])[0]
    prev = xyz[model.atom_indices].copy()
    cond_a, env = _decode_conditions(model, beads, prev, box)
    kind = model.layout.kinds[0]
    centres = beads[kind.bead_index].mean(axis=1)
    d = centres - centres[0]
    d -= np.round(d / np.diag(box)) * np.diag(box)
    dist = np.linalg.norm(d, axis=1)
    far = int(np.argmax(dist))
    near = int(np.argsort(dist)[1])
    assert dist[far] > 0.45 + 0.5 and dist[near] < 0.7
    # move the far molecule a little: unit 0's condition does not change; move the nearest: it does
    for unit, changes in ((far, False), (near, True)):
        b2, p2 = beads.copy(), prev.copy()
        b2[kind.bead_index[unit]] += np.array([0.03, 0.0, 0.0])
        p2[model.layout.output_index[kind.atom_index[unit]]] += np.array([0.03, 0.0, 0.0])
        cond_b, _ = _decode_conditions(model, b2, p2, box)
        assert np.allclose(cond_b[0], cond_a[0], atol=1e-6) != changes


def test_a_larger_box_of_the_same_liquid_gives_every_copy_the_same_environment(benzene_box):
    """Size transfer: tiling the box 2x2x2 changes nothing any molecule sees (no per-box state)."""
    import openmm.app as app
    from openmm import unit

    liq, xyz, box = benzene_box
    model, mapping = _model(liq, "molecule")
    L = np.diag(box)
    shifts = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)]) * L
    big_xyz = np.concatenate([xyz + s for s in shifts])
    top = app.Topology()
    for _ in shifts:
        for chain in liq.topology.chains():
            c = top.addChain()
            for res in chain.residues():
                r = top.addResidue(res.name, c)
                amap = {a: top.addAtom(a.name, a.element, r) for a in res.atoms()}
                for bond in res.bonds():
                    top.addBond(amap[bond[0]], amap[bond[1]])
    top.setPeriodicBoxVectors(np.diag(2 * L) * unit.nanometer)
    big_mapping = CGMapping.from_preset(top, "molecule")
    big = TemporalBackmapper(big_mapping, hidden=32, latent_dim=4, n_layers=2, library_size=0,
                             environment_cutoff_nm=0.5, environment_neighbors=48, environment_dim=16)
    big.load_state_dict(model.state_dict())
    cond_small, _ = _decode_conditions(model, mapping.map_positions(xyz[None])[0], xyz, box)
    cond_big, _ = _decode_conditions(big, big_mapping.map_positions(big_xyz[None])[0], big_xyz, np.diag(2 * L))
    n = len(cond_small)
    for copy in range(8):
        np.testing.assert_allclose(cond_big[copy * n:(copy + 1) * n], cond_small, atol=2e-4)


def test_environment_model_saves_and_loads(benzene_box, tmp_path):
    liq, xyz, box = benzene_box
    model, mapping = _model(liq, "benzene-3bead")
    model.save(tmp_path / "env.pt")
    loaded = TemporalBackmapper.load(tmp_path / "env.pt", mapping)
    assert loaded.config["environment_cutoff_nm"] == 0.5
    beads = mapping.map_positions(xyz[None])[0]
    cond_a, _ = _decode_conditions(model, beads, xyz, box)
    cond_b, _ = _decode_conditions(loaded, beads, xyz, box)
    np.testing.assert_allclose(cond_a, cond_b)


def test_environment_cutoff_larger_than_half_the_box_is_refused(benzene_box):
    liq, xyz, box = benzene_box
    model, mapping = _model(liq, "molecule", cutoff=0.49 * 10)
    beads = mapping.map_positions(xyz[None])[0]
    with pytest.raises(ValueError, match="twice the environment cutoff"):
        _decode_conditions(model, beads, xyz, box)


@pytest.mark.parametrize("periodic", [False, True])
def test_one_search_for_all_kinds_equals_one_search_per_kind(periodic):
    """Residue units of chignolin (9 kinds): the batched search of every kind's environment at once (used per frame
    in inference and training) gives exactly each kind's own search: same points, types, weights, local frames."""
    from openmm_backmap._units import random_rotations

    cln = systems.chignolin("obc2")
    mapping = CGMapping.from_preset(cln.topology, "ca")
    model = TemporalBackmapper(mapping, hidden=16, latent_dim=4, n_layers=1, library_size=0, units="residue",
                               environment_cutoff_nm=0.6, environment_neighbors=40, environment_dim=8)
    index = model.environment_index
    assert len(model.kinds) == 9
    xyz = np.asarray(cln.positions.value_in_unit(__import__("openmm").unit.nanometer))[model.atom_indices]
    rng = np.random.default_rng(4)
    atoms = torch.as_tensor(np.stack([xyz, xyz + 0.02 * rng.standard_normal(xyz.shape)]))
    box = None
    if periodic:  # a box cutting through the molecule, atoms wrapped independently
        box = torch.as_tensor(np.diag([3.0, 3.2, 3.4])).expand(2, 3, 3).clone()
        atoms = atoms + torch.as_tensor([1.3, -0.4, 2.9])
        atoms = atoms - torch.floor(atoms / torch.diagonal(box, dim1=1, dim2=2)[:, None]) * torch.diagonal(
            box, dim1=1, dim2=2)[:, None]
    beads = torch.stack([torch.as_tensor(mapping.map_positions(np.asarray(a)[None] if not periodic else
                                                               _whole_chain(np.asarray(a), box[0].numpy()))[0])
                         for a in atoms])
    g = torch.Generator().manual_seed(0)
    centres = [beads[:, model._unit_beads[k]].mean(2).flatten(0, 1) for k in range(len(model.kinds))]
    rots = [random_rotations(len(c), g) for c in centres]
    together = index.neighbors_all(centres, rots, beads, atoms, box)
    for k in range(len(model.kinds)):
        alone = index.neighbors(k, centres[k], rots[k], beads, atoms, box)
        assert (alone.weight > 0).any()
        for a, b in zip(alone, together[k]):
            assert torch.equal(a, b)


def _whole_chain(xyz, box):
    """Atoms of one chain made whole again (each atom at the minimum image of its predecessor)."""
    out = xyz.copy()
    for i in range(1, len(out)):
        d = out[i] - out[i - 1]
        out[i] = out[i - 1] + d - np.round(d / np.diag(box)) * np.diag(box)
    return out[None]
