"""The temporally coherent backmapper: layout, frames, invariances, training, inference, files, bad input."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from openmm_backmap.backmap import BackmapperTrainer, TemporalBackmapper
from openmm_backmap._units import UnitLayout, kabsch, kabsch_residual, random_rotations
from openmm_backmap.data import AADataset


def _rotation(seed: int) -> np.ndarray:
    return random_rotations(1, torch.Generator().manual_seed(seed))[0].numpy()


# -- geometry ----------------------------------------------------------------------------------------------
def test_kabsch_recovers_a_known_rotation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    rot = random_rotations(1, gen)[0]
    q = kabsch(x, x @ rot.T)
    assert torch.allclose(q, rot, atol=1e-10)
    assert torch.linalg.det(q).item() == pytest.approx(1.0)


def test_kabsch_never_returns_a_reflection():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    mirrored = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    q = kabsch(x, mirrored)
    assert torch.linalg.det(q).item() == pytest.approx(1.0)


def test_random_rotations_are_proper_and_seeded():
    a = random_rotations(50, torch.Generator().manual_seed(4))
    b = random_rotations(50, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    assert torch.allclose(a @ a.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(a), torch.ones(50, dtype=torch.float64))


# -- layout ------------------------------------------------------------------------------------------------
def test_layout_of_alanine_dipeptide_is_one_unit(adp_mapping):
    layout = UnitLayout(adp_mapping)
    assert len(layout.kinds) == 1 and layout.kinds[0].n_units == 1
    assert layout.kinds[0].n_atoms == 22 and layout.kinds[0].n_beads == 6
    assert np.array_equal(layout.atoms, np.arange(22))
    # The unit's bead weights reproduce the mapping.
    w = layout.kinds[0].weights
    assert np.allclose(w, adp_mapping.position_matrix)


def test_layout_groups_identical_molecules_into_one_kind():
    from openmm_backmap import systems
    from openmm_backmap.mapping import CGMapping

    liq = systems.liquid("BENZ", n_molecules=6, seed=0, cutoff_nm=0.4, switch_nm=0.3)
    mapping = CGMapping.from_preset(liq.topology, "benzene-3bead")
    layout = UnitLayout(mapping)
    assert len(layout.kinds) == 1
    kind = layout.kinds[0]
    assert (kind.n_units, kind.n_atoms, kind.n_beads) == (6, 12, 3)
    # Every unit's atoms are one molecule, its beads the three beads of that molecule.
    assert sorted(kind.atom_index.ravel().tolist()) == list(range(72))
    assert np.array_equal(kind.bead_index, np.arange(18).reshape(6, 3))


def test_layout_by_residue_frames_each_residue_with_its_bonded_neighbours():
    from openmm_backmap import systems
    from openmm_backmap.mapping import CGMapping

    cln = systems.chignolin("obc2")  # GYDPETGTWG
    mapping = CGMapping.from_preset(cln.topology, "ca")
    layout = UnitLayout(mapping, "residue")
    names = [k.name.split(":")[1] for k in layout.kinds]
    assert names == ["GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "TRP", "GLY"]
    thr = layout.kinds[5]  # T6 and T8 share one network: same atoms, one bead on either side
    assert thr.n_units == 2 and np.array_equal(thr.bead_index.ravel(), [5, 7])
    assert np.array_equal(thr.frame_bead_index, [[4, 5, 6], [6, 7, 8]]) and np.array_equal(thr.own_beads, [1])
    first, last = layout.kinds[0], layout.kinds[-1]  # termini: one neighbour, other atoms than G7
    assert np.array_equal(first.frame_bead_index, [[0, 1]]) and np.array_equal(first.own_beads, [0])
    assert np.array_equal(last.frame_bead_index, [[8, 9]]) and np.array_equal(last.own_beads, [1])
    assert sorted(np.concatenate([k.atom_index.ravel() for k in layout.kinds]).tolist()) == list(range(138))
    for kind in layout.kinds:  # each unit is one residue with its own bead
        for atoms, bead in zip(kind.atom_index, kind.bead_index[:, 0]):
            members = set(atoms.tolist())
            residues = {a.residue.index for a in cln.topology.atoms() if a.index in members}
            assert residues == {int(bead)}
    # a bead over several residues cannot be backmapped residue by residue
    with pytest.raises(ValueError, match="spans 10 residues"):
        UnitLayout(CGMapping.from_preset(cln.topology, "molecule"), "residue")
    with pytest.raises(ValueError, match="units must be one of"):
        UnitLayout(mapping, "chain")


# -- model: invariances, determinism, files ------------------------------------------------------------------
def _frames(adp_aa_data, adp_mapping, n=40, start=100):
    with AADataset(adp_aa_data[1]) as ds:
        aa = ds.positions[start:start + n].astype(np.float64)
    return aa, adp_mapping.map_positions(aa)


def test_backmapping_is_equivariant_to_rigid_motions(tiny_backmapper, adp_aa_data, adp_mapping):
    aa, cg = _frames(adp_aa_data, adp_mapping, n=2)
    rot, shift = _rotation(7), np.array([1.5, -2.0, 0.7])
    chain_a = tiny_backmapper.chain(seed=5)
    chain_a.previous = aa[0]
    out_a = chain_a.step(cg[1])
    chain_b = tiny_backmapper.chain(seed=5)
    chain_b.previous = aa[0] @ rot.T + shift
    out_b = chain_b.step(cg[1] @ rot.T + shift)
    np.testing.assert_allclose(out_b, out_a @ rot.T + shift, atol=1e-5)


def test_periodic_images_do_not_change_the_result(tiny_backmapper, adp_aa_data, adp_mapping):
    aa, cg = _frames(adp_aa_data, adp_mapping, n=2)
    box = np.diag([4.0, 4.0, 4.0])
    chain_a = tiny_backmapper.chain(seed=2)
    chain_a.previous = aa[0]
    out_a = chain_a.step(cg[1], box)
    chain_b = tiny_backmapper.chain(seed=2)
    chain_b.previous = aa[0] + np.array([4.0, 0.0, -8.0])  # the previous frame in another image
    wrapped = cg[1].copy()
    wrapped[2] += np.array([0.0, 4.0, 0.0])  # one bead wrapped on its own, as OpenMM may write it
    out_b = chain_b.step(wrapped, box)
    np.testing.assert_allclose(out_b, out_a, atol=1e-5)


def test_same_seed_same_frames_other_seed_other_frames(tiny_backmapper, adp_aa_data, adp_mapping):
    _, cg = _frames(adp_aa_data, adp_mapping, n=10)
    a = tiny_backmapper.backmap_trajectory(cg, seed=3)
    b = tiny_backmapper.backmap_trajectory(cg, seed=3)
    c = tiny_backmapper.backmap_trajectory(cg, seed=4)
    assert np.array_equal(a, b)
    assert not np.allclose(a[1:], c[1:], atol=1e-4)  # stochastic: z differs


def test_replicas_are_batched_and_independent(tiny_backmapper, adp_aa_data, adp_mapping):
    aa, cg = _frames(adp_aa_data, adp_mapping, n=3)
    chain = tiny_backmapper.chain(seed=0, n_replicas=2)
    chain.previous = np.stack([aa[0], aa[1]])
    out = chain.step(np.stack([cg[1], cg[2]]))
    assert out.shape == (2, 22, 3)
    single = tiny_backmapper.chain(seed=0)
    single.previous = aa[0]
    # same z stream is consumed differently, so only check the replica placement: each near its own CG frame
    for r, frame in enumerate((cg[1], cg[2])):
        centroid_error = np.linalg.norm(adp_mapping.map_positions(out[r]).mean(0) - frame.mean(0))
        assert centroid_error < 0.05


def test_qcp_residual_equals_the_kabsch_superposition_residual():
    """Theobald's QCP gives the residual of the SVD-based optimal superposition, reflections excluded."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 4, 10):  # two points: the closed form
        src = torch.randn(600, n, 3, generator=g, dtype=torch.float64)
        src -= src.mean(1, keepdim=True)
        tgt = torch.randn(600, n, 3, generator=g, dtype=torch.float64)
        tgt -= tgt.mean(1, keepdim=True)
        rot = torch.as_tensor(_rotation(n), dtype=torch.float64)
        tgt[:200] = src[:200] @ rot.T + 1e-3 * torch.randn(200, n, 3, generator=g, dtype=torch.float64)  # near fit
        tgt[200:400] = src[200:400] * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # mirror images
        q = kabsch(src, tgt)
        expected = ((src @ q.transpose(-1, -2) - tgt) ** 2).sum(dim=(-1, -2))
        scale = (src ** 2).sum(dim=(-1, -2)) + (tgt ** 2).sum(dim=(-1, -2))
        got = kabsch_residual(src, tgt)
        if n == 2:  # |Ra - b| >= ||a| - |b||, reached by turning a onto b: the exact optimum, at or below the SVD's
            a, b = src[:, 0] - src[:, 1], tgt[:, 0] - tgt[:, 1]
            torch.testing.assert_close(got, 0.5 * (a.norm(dim=-1) - b.norm(dim=-1)) ** 2, rtol=1e-12, atol=1e-15)
            assert (got <= expected + 1e-12 * scale).all() and ((expected - got) / scale).max() < 1e-4
            continue
        assert ((got - expected).abs() / scale).max() < 1e-12
        if n > 3:  # three points are coplanar, so their mirror image is a rotation; more points' is not
            assert expected[200:400].mean() > 0.01 * scale[200:400].mean()


def test_library_lookup_picks_by_the_svd_superposition_residual(tiny_backmapper, tiny_residue_backmapper,
                                                               monkeypatch):
    """The QCP lookup picks the same library frames as the SVD residual did."""
    import openmm_backmap.backmap.model as model_module

    g = torch.Generator().manual_seed(3)
    for kind in list(tiny_backmapper.kinds) + list(tiny_residue_backmapper.kinds):
        lib = kind.library_beads.double()
        query = lib[torch.randint(len(lib), (20,), generator=g)] + 0.01 * torch.randn(
            20, *lib.shape[1:], generator=g, dtype=torch.float64)
        fast = kind.library_lookup(query, None, torch.Generator().manual_seed(0))
        with monkeypatch.context() as m:
            m.setattr(model_module, "kabsch_residual",
                      lambda s, t: ((s @ kabsch(s, t).transpose(-1, -2) - t) ** 2).sum(dim=(-1, -2)))
            reference = kind.library_lookup(query, None, torch.Generator().manual_seed(0))
        torch.testing.assert_close(fast, reference, rtol=0, atol=1e-9)


def test_library_lookup_returns_the_library_frame_for_its_own_cg(tiny_backmapper):
    kind = tiny_backmapper.kinds[0]
    atoms = kind.library_atoms[17].double()
    beads = kind.library_beads[17].double()
    rot, shift = torch.as_tensor(_rotation(3)), torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    query = (beads @ rot.T + shift)[None]
    out = kind.library_lookup(query, None, torch.Generator().manual_seed(0))[0]
    expected = atoms @ rot.T + shift
    # The lookup may pick a near-identical frame; the picked frame must superpose onto the query beads.
    assert torch.sqrt(((out - expected) ** 2).sum(-1).mean()) < 0.02


def test_first_frame_comes_from_the_library_by_cg_rmsd(tiny_backmapper, adp_aa_data, adp_mapping):
    aa, cg = _frames(adp_aa_data, adp_mapping, n=1)
    out = tiny_backmapper.chain(seed=0).step(cg[0])
    bead_rmsd = np.sqrt(((adp_mapping.map_positions(out) - cg[0]) ** 2).sum(-1).mean())
    assert bead_rmsd < 0.03  # a superposed library frame sits on the beads (nm)


def test_latent_mixture_is_a_distribution(tiny_backmapper):
    kind = tiny_backmapper.kinds[0]
    assert kind.mixture_weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (kind.mixture_weights >= 0).all()
    assert len(kind.mixture_weights) == 10


def test_save_load_round_trip_gives_identical_frames(tiny_backmapper, adp_aa_data, adp_mapping, tmp_path):
    _, cg = _frames(adp_aa_data, adp_mapping, n=6)
    path = tmp_path / "bm.pt"
    tiny_backmapper.save(path)
    loaded = TemporalBackmapper.load(path, adp_mapping)
    np.testing.assert_array_equal(loaded.backmap_trajectory(cg, seed=1), tiny_backmapper.backmap_trajectory(cg, seed=1))
    assert loaded.lag_ps == pytest.approx(tiny_backmapper.lag_ps)
    assert loaded.metadata["pairs"] == tiny_backmapper.metadata["pairs"]


def test_load_refuses_code_corrupt_files_newer_versions_and_other_mappings(tiny_backmapper, tmp_path):
    import json
    import pickle

    from openmm_backmap import systems
    from openmm_backmap.mapping import CGMapping

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a readable"):
        TemporalBackmapper.load(evil)
    corrupt = tmp_path / "corrupt.pt"
    good = tmp_path / "good.pt"
    tiny_backmapper.save(good)
    corrupt.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable"):
        TemporalBackmapper.load(corrupt)
    blob = torch.load(good, weights_only=True)
    header = json.loads(blob["header"])
    header["format_version"] = 99
    blob["header"] = json.dumps(header)
    newer = tmp_path / "newer.pt"
    torch.save(blob, newer)
    with pytest.raises(ValueError, match="newer"):
        TemporalBackmapper.load(newer)
    with pytest.raises(FileNotFoundError):
        TemporalBackmapper.load(tmp_path / "missing.pt")
    other = CGMapping.from_preset(systems.alanine_dipeptide("obc2").topology, "ca")
    with pytest.raises(ValueError, match="another mapping"):
        TemporalBackmapper.load(good, other)


def test_bad_inputs_are_refused(tiny_backmapper):
    chain = tiny_backmapper.chain()
    with pytest.raises(ValueError, match="6"):
        chain.step(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN|finite"):
        chain.step(np.full((6, 3), np.nan))
    with pytest.raises(ValueError):
        chain.previous = np.zeros((21, 3))
    with pytest.raises(ValueError, match="mode"):
        tiny_backmapper.chain(mode="nearest")
    with pytest.raises(ValueError, match="particles"):
        tiny_backmapper.check_cg(7)
    with pytest.raises(ValueError, match="named"):
        tiny_backmapper.check_cg(6, ["X"] * 6)


# -- training -------------------------------------------------------------------------------------------------
def test_training_improves_reconstruction_and_records_a_log(tiny_backmapper, adp_aa_data, adp_mapping, tmp_path):
    from openmm_backmap.backmap.trainer import BackmapperTrainer

    log = tmp_path / "log.csv"
    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=15, batch_size=32, library_size=50,
                                architecture={"hidden": 64, "latent_dim": 4, "n_layers": 2}, n_blocks=5,
                                rollout_steps=0, energy=None, progress=False, log=log, seed=0)
    model = trainer.fit()
    rows = log.read_text().strip().splitlines()
    assert len(rows) == 17 and rows[0].startswith("epoch,")
    history = trainer.history
    assert history[0]["epoch"] == 0  # the untrained model
    # Local geometry (bond/1-3 distances) and the distance matrix improve by large factors on held-out frames.
    assert history[-1]["val_bonded"] < 0.1 * history[0]["val_bonded"]
    assert history[-1]["val_distance"] < 0.85 * history[0]["val_distance"]
    assert model.metadata["pairs"]["train"] > 0
    # frames are 0.1 ps apart in the fixture
    assert model.lag_ps == pytest.approx(0.1, rel=1e-3)


def test_energy_term_uses_the_users_system(adp_aa_data, adp_mapping):
    """The reference energies the trainer computes equal OpenMM's for the same frames."""
    import openmm
    from openmm import unit

    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=1, progress=False)
    data = trainer._load()
    model = TemporalBackmapper(adp_mapping, hidden=8, latent_dim=2, n_layers=1, library_size=0)
    trainer._atoms = model.atom_indices
    energy = trainer._energy_model(data, model)
    values = trainer._reference_energies(energy, data, np.array([5, 50]))["values"]
    context = openmm.Context(adp_aa_data[0].system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    for i in (5, 50):
        context.setPositions(data["positions"][i])
        expected = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert values[i] == pytest.approx(expected, abs=1e-3 * max(1.0, abs(expected)))


def test_checkpoint_resume_continues_the_history(adp_aa_data, adp_mapping, tmp_path):
    kwargs = dict(max_epochs=2, batch_size=64, library_size=20, architecture={"hidden": 16, "latent_dim": 2,
                  "n_layers": 1}, n_blocks=5, rollout_steps=0, energy=None, progress=False,
                  checkpoint=tmp_path / "ckpt.pt", seed=0)
    BackmapperTrainer(adp_mapping, adp_aa_data[1], **kwargs).fit()
    resumed = BackmapperTrainer(adp_mapping, adp_aa_data[1], **{**kwargs, "max_epochs": 3})
    resumed.fit(resume=True)
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2, 3]


def test_trainer_refuses_bad_data(adp_aa_data, adp_mapping, tmp_path):
    from openmm_backmap import systems
    from openmm_backmap.data import TrajectoryWriter
    from openmm_backmap.mapping import CGMapping

    other = CGMapping.from_preset(systems.peptide("AA").topology, "backbone-cb")
    with pytest.raises(ValueError, match="does not hold the AA system"):
        BackmapperTrainer(other, adp_aa_data[1], progress=False).fit()
    with AADataset(adp_aa_data[1]) as ds:
        xyz = ds.positions[:200].astype(np.float64)
    bad = tmp_path / "nan.h5"
    adp = adp_aa_data[0]
    with TrajectoryWriter(bad, adp.topology, fields=("positions",), system=adp.system,
                          settings={"temperature_K": 300.0}) as writer:
        for k, frame in enumerate(xyz):
            writer.append(step=k, time_ps=0.1 * k, positions=frame)
    import h5py

    with h5py.File(bad, "r+") as handle:  # the writer refuses NaN, so corrupt the file afterwards
        handle["positions"][150, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        BackmapperTrainer(adp_mapping, bad, n_blocks=5, progress=False).fit()
    with pytest.raises(ValueError, match="architecture"):
        BackmapperTrainer(adp_mapping, adp_aa_data[1], architecture={"width": 3})
    with pytest.raises(ValueError, match="lag_frames"):
        BackmapperTrainer(adp_mapping, adp_aa_data[1], lag_frames=0)


# -- offline backmapping ---------------------------------------------------------------------------------------
def test_offline_backmap_of_a_cg_dataset_keeps_time_stamps(tiny_backmapper, adp_aa_data, adp_mapping, tmp_path):
    import mdtraj as md

    from openmm_backmap.backmap import backmap
    from openmm_backmap.mapping import map_dataset

    cg_path = tmp_path / "cg.h5"
    map_dataset(adp_aa_data[1], adp_mapping, cg_path, progress=False)
    out = backmap(cg_path, tiny_backmapper, tmp_path / "aa.dcd", seed=0, stride=10, progress=False)
    traj = md.load(str(out), top=str(tmp_path / "aa.pdb"))
    with AADataset(adp_aa_data[1]) as ds:
        times = ds.time[::10]
        n = ds.n_frames
    assert traj.n_frames == len(range(0, n, 10)) and traj.n_atoms == 22
    from openmm_backmap.formats import read_frames

    stored = read_frames(out, dt_ps=0.002)  # DCD keeps first step, interval and dt in its header
    np.testing.assert_allclose(stored["time"], times, rtol=1e-4)
    # Bead atoms of the backmapped frames sit on the CG beads (exact consistency, DCD precision).
    with AADataset(adp_aa_data[1]) as ds:
        cg = adp_mapping.map_positions(ds.positions[::10].astype(np.float64))
    np.testing.assert_allclose(adp_mapping.map_positions(traj.xyz.astype(np.float64))[1:], cg[1:], atol=2e-3)
    # The same engine and seed as a chain over the array give the same frames.
    direct = tiny_backmapper.backmap_trajectory(cg, seed=0)
    np.testing.assert_allclose(traj.xyz, direct, atol=2e-3)


def test_offline_backmap_refuses_a_cg_file_of_another_size(tiny_backmapper, tmp_path):
    from openmm_backmap.backmap import backmap

    with pytest.raises(ValueError, match="6 beads"):
        backmap(np.zeros((3, 5, 3)), tiny_backmapper, tmp_path / "aa.pdb", progress=False)


def test_energy_loss_is_huber_near_agreement_and_bounded_for_clashes():
    from openmm_backmap.backmap.trainer import _robust_energy_loss

    x = torch.tensor([0.5, 3.0, 49.0, 1e10], dtype=torch.float64, requires_grad=True)
    per = [float(_robust_energy_loss(v.reshape(1), 1.0)) for v in x.detach()]
    assert per[0] == pytest.approx(0.125) and per[1] == pytest.approx(2.5) and per[2] == pytest.approx(48.5)
    assert per[3] < 50 * 30  # logarithmic growth: a 1e10 kT clash costs about 1e3, not 1e10
    (grad,) = torch.autograd.grad(_robust_energy_loss(x, 1.0) * 4, x)
    assert grad[3].item() == pytest.approx(50 / 1e10)  # relative gradient past the cap
    # continuous at the cap
    below = float(_robust_energy_loss(torch.tensor([50.0 - 1e-6]), 1.0))
    above = float(_robust_energy_loss(torch.tensor([50.0 + 1e-6]), 1.0))
    assert abs(above - below) < 1e-5


def test_sample_draws_different_valid_frames_for_one_cg_frame(tiny_backmapper, adp_aa_data, adp_mapping):
    aa, cg = _frames(adp_aa_data, adp_mapping, n=2)
    samples = tiny_backmapper.sample(cg[1], aa[0], n=50, seed=4)
    assert samples.shape == (50, 22, 3)
    np.testing.assert_allclose(adp_mapping.map_positions(samples), np.broadcast_to(cg[1], (50, 6, 3)), atol=1e-5)
    placed = np.flatnonzero(adp_mapping.position_matrix.max(axis=0) == 0)  # atoms no bead pins down
    spread = samples[:, placed].std(axis=0).max(axis=-1)
    assert spread.max() > 1e-3  # stochastic: the latent draws give different frames
    bonds = np.array([[b[0].index, b[1].index] for b in adp_mapping.aa_topology.bonds])
    ref = np.linalg.norm(aa[1][bonds[:, 0]] - aa[1][bonds[:, 1]], axis=-1)
    lengths = np.linalg.norm(samples[:, bonds[:, 0]] - samples[:, bonds[:, 1]], axis=-1)
    assert np.median(np.abs(lengths / ref - 1)) < 0.1  # valid: bonded atoms stay at bond lengths
    np.testing.assert_array_equal(tiny_backmapper.sample(cg[1], aa[0], n=50, seed=4), samples)
    # one sample is one chain step from the same previous frame
    chain = tiny_backmapper.chain(seed=4)
    chain.previous = aa[0]
    np.testing.assert_allclose(tiny_backmapper.sample(cg[1], aa[0], n=1, seed=4)[0], chain.step(cg[1]), atol=1e-12)
    with pytest.raises(ValueError, match="previous"):
        tiny_backmapper.sample(cg[1])
    with pytest.raises(ValueError, match="one CG frame"):
        tiny_backmapper.sample(cg, aa[0])
    with pytest.raises(ValueError, match="n must"):
        tiny_backmapper.sample(cg[1], aa[0], n=0)


def test_residue_units_are_equivariant_consistent_and_saved(tiny_residue_backmapper, adp_aa_data, adp_mapping,
                                                            tmp_path):
    """One unit per residue: rigid motions and periodic images of the input (also of the previous frame, atom by
    atom) move the output alike, the beads are reproduced exactly, and the file keeps the units."""
    bm = tiny_residue_backmapper
    assert bm.config["units"] == "residue" and [k.n_units for k in bm.layout.kinds] == [1, 1, 1]
    assert [k.n_frame_beads for k in bm.layout.kinds] == [5, 6, 5]
    aa, cg = _frames(adp_aa_data, adp_mapping, n=4)
    chain = bm.chain(seed=5)
    chain.previous = aa[0]
    out = chain.step(cg[1])
    np.testing.assert_allclose(adp_mapping.map_positions(out), cg[1], atol=1e-5)
    rot, shift = _rotation(7), np.array([1.5, -2.0, 0.7])
    moved = bm.chain(seed=5)
    moved.previous = aa[0] @ rot.T + shift
    np.testing.assert_allclose(moved.step(cg[1] @ rot.T + shift), out @ rot.T + shift, atol=1e-5)
    box = np.diag([3.0, 3.0, 3.0])
    plain, imaged = bm.chain(seed=2), bm.chain(seed=2)
    plain.previous = aa[0]
    wrapped = aa[0].copy()
    wrapped[::3] += np.array([3.0, 0.0, -6.0])  # every third atom in another image, as a wrapped file has it
    imaged.previous = wrapped
    np.testing.assert_allclose(imaged.step(cg[1] + np.array([0.0, 3.0, 0.0]), box) - np.array([0.0, 3.0, 0.0]),
                               plain.step(cg[1], box), atol=1e-5)
    path = tmp_path / "residue.pt"
    bm.save(path)
    loaded = TemporalBackmapper.load(path, adp_mapping)
    assert loaded.config["units"] == "residue"
    np.testing.assert_array_equal(loaded.backmap_trajectory(cg, seed=1), bm.backmap_trajectory(cg, seed=1))


def test_residue_units_train_the_bonds_between_them(tiny_residue_backmapper, adp_mapping, tiny_backmapper):
    """The bonds and angles that cross residue units (the peptide bonds) enter the bonded loss on the assembled
    frame; molecule units have none."""
    top = adp_mapping.aa_topology
    ci, cj = tiny_residue_backmapper.cross_pairs
    atoms = tiny_residue_backmapper.layout.atoms
    names = {tuple(sorted(f"{top.atom(int(atoms[a])).residue.name}-{top.atom(int(atoms[a])).name}" for a in pair))
             for pair in zip(ci.tolist(), cj.tolist())}
    assert ("ACE-C", "ALA-N") in names and ("ALA-C", "NME-N") in names  # the two peptide bonds
    assert ("ACE-O", "ALA-N") in names and ("ALA-CA", "NME-N") in names  # angles across them
    assert len(names) == len(ci) == 10  # 5 pairs within two bonds across each junction
    assert all(top.atom(int(atoms[a])).residue.index != top.atom(int(atoms[b])).residue.index
               for a, b in zip(ci.tolist(), cj.tolist()))
    assert len(tiny_backmapper.cross_pairs[0]) == 0


def _link_deviation(bm, frames):
    """Per pair, mean |d - μ| / σ over the bonds and angles between residue units, ``frames`` (F, n_atoms, 3) nm."""
    ci, cj = bm.cross_pairs
    d = np.linalg.norm(frames[:, cj.numpy()] - frames[:, ci.numpy()], axis=-1)
    mean, std = bm.link_geometry[:, 0].numpy(), bm.link_geometry[:, 1].numpy()
    return np.mean(np.abs(d - mean) / std, axis=0)


def test_link_geometry_is_fitted_from_the_training_frames(tiny_residue_backmapper, adp_aa_data):
    """The trainer fits the mean and spread of every distance between units on its training frames; refitting on
    the whole dataset gives the same values within sampling error, and the numbers are those of numpy."""
    from openmm_backmap.data import AADataset

    bm = tiny_residue_backmapper
    assert bm.has_link_geometry and bm.link_geometry.shape == (10, 2)
    with AADataset(adp_aa_data[1]) as ds:
        xyz = ds.positions[:].astype(np.float64)[:, bm.atom_indices]
    ci, cj = (c.numpy() for c in bm.cross_pairs)
    d = np.linalg.norm(xyz[:, cj] - xyz[:, ci], axis=-1)
    fitted = bm.link_geometry.numpy().copy()
    np.testing.assert_allclose(fitted[:, 0], d.mean(0), atol=3 * d.std(0).max() / np.sqrt(100))
    refit = TemporalBackmapper.load  # noqa: F841  (keep the fixture untouched: fit a copy)
    import copy

    other = copy.deepcopy(bm)
    other.fit_link_geometry(xyz)
    np.testing.assert_allclose(other.link_geometry[:, 0].numpy(), d.mean(0), rtol=1e-12)
    np.testing.assert_allclose(other.link_geometry[:, 1].numpy(), d.std(0, ddof=1), rtol=1e-10)
    # bonds are stiffer than the angles across the junction
    names = [frozenset((int(a), int(b))) for a, b in zip(ci, cj)]
    assert len(set(names)) == 10
    assert fitted[:, 1].min() < 0.01 and fitted[:, 0].min() > 0.1


def test_candidates_repair_the_bonds_between_residue_units(tiny_residue_backmapper, adp_aa_data, adp_mapping):
    """Several latent draws per residue, one kept along the chain by the bonds to the residue before it, bring the
    peptide bonds and angles closer to the data than one draw (the worst pair of this barely trained model most);
    each residue stays consistent with its beads, and the same seed gives the same frames."""
    from openmm_backmap.data import AADataset

    bm = tiny_residue_backmapper
    with AADataset(adp_aa_data[1]) as ds:
        xyz = ds.positions[-200:].astype(np.float64)
    cg = adp_mapping.map_positions(xyz)
    first = xyz[0][bm.atom_indices]
    one = bm.backmap_trajectory(cg, seed=2, first_frame_nm=first, candidates=1)[1:]
    many = bm.backmap_trajectory(cg, seed=2, first_frame_nm=first, candidates=32)[1:]
    dev_one, dev_many = _link_deviation(bm, one), _link_deviation(bm, many)
    assert dev_many.max() < 0.75 * dev_one.max() and dev_many.mean() < dev_one.mean()
    np.testing.assert_allclose(adp_mapping.map_positions(many), cg[1:], atol=1e-4)
    np.testing.assert_array_equal(bm.backmap_trajectory(cg[:20], seed=2, first_frame_nm=first, candidates=16),
                                  bm.backmap_trajectory(cg[:20], seed=2, first_frame_nm=first, candidates=16))


def test_candidates_need_linked_units_and_fitted_geometry(tiny_residue_backmapper, tiny_backmapper, adp_aa_data,
                                                          adp_mapping, tmp_path):
    """candidates > 1 is refused for molecule units (nothing links them), for a model without fitted link geometry
    (files of format version 3) and for non-integer or zero counts; a version-3 file loads and backmaps as before
    (one draw by default). Fitted residue units default to DEFAULT_CANDIDATES, molecule units to 1."""
    import json

    with pytest.raises(ValueError, match="units"):
        tiny_backmapper.chain(candidates=4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="candidates"):
            tiny_residue_backmapper.chain(candidates=bad)
    path = tmp_path / "v4.pt"
    tiny_residue_backmapper.save(path)
    loaded = TemporalBackmapper.load(path, adp_mapping)
    assert torch.equal(loaded.link_geometry, tiny_residue_backmapper.link_geometry)
    blob = torch.load(path, weights_only=True)
    header = json.loads(blob["header"])
    header["format_version"] = 3
    state = {k: v for k, v in blob["state_dict"].items() if k != "link_geometry"}
    torch.save({"header": json.dumps(header), "state_dict": state}, tmp_path / "v3.pt")
    old = TemporalBackmapper.load(tmp_path / "v3.pt", adp_mapping)
    assert not old.has_link_geometry
    with pytest.raises(ValueError, match="fit_link_geometry"):
        old.chain(candidates=4)
    cg = np.asarray(adp_mapping.map_positions(np.asarray(adp_aa_data[0].positions_nm)[None]))
    np.testing.assert_array_equal(old.backmap_trajectory(np.repeat(cg, 3, 0), seed=1),
                                  tiny_residue_backmapper.backmap_trajectory(np.repeat(cg, 3, 0), seed=1, candidates=1))
    assert old.chain().candidates == 1 and tiny_backmapper.chain().candidates == 1
    assert tiny_residue_backmapper.chain().candidates == TemporalBackmapper.DEFAULT_CANDIDATES > 1
