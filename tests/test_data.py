"""AA reference data: HDF5 writer, reporter, simulate_reference, lazy reader, splits."""
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import pytest

from openmm_backmap import systems
from openmm_backmap.data import (
    AADataReporter,
    AADataset,
    CGDataset,
    TrajectoryWriter,
    block_split,
    simulate_reference,
)

KJ_NM = u.kilojoule_per_mole / u.nanometer


@pytest.fixture(scope="module")
def adp():
    return systems.alanine_dipeptide("obc2")


@pytest.fixture(scope="module")
def water_box():
    ff = app.ForceField("amber14/tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, boxSize=openmm.Vec3(1.4, 1.4, 1.4) * u.nanometer)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.6 * u.nanometer,
                             constraints=app.HBonds)
    return modeller.topology, system, modeller.positions


@pytest.fixture(scope="module")
def adp_run(adp, tmp_path_factory):
    path = tmp_path_factory.mktemp("adp") / "adp.h5"
    simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=400, report_interval=20,
                       dtype="float64", platform="Reference", progress=False, seed=3)
    return path


def _fresh_state(system, positions, box=None, groups=-1):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(positions)
    state = context.getState(getForces=True, getEnergy=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(KJ_NM))


def test_stored_forces_equal_fresh_openmm_forces(adp, adp_run):
    with AADataset(adp_run) as ds:
        assert ds.n_frames == 20
        assert ds.n_atoms == 22
        np.testing.assert_array_equal(ds.step, np.arange(20, 401, 20))
        np.testing.assert_allclose(ds.time, ds.step * 0.002)
        stored_system = ds.system  # the force field description travels with the data
        for i in (0, 7, 19):
            frame = ds.frame(i)
            energy, forces = _fresh_state(adp.system, frame["positions"])
            np.testing.assert_allclose(frame["forces"], forces, rtol=1e-9, atol=1e-9)
            assert frame["potential_energy"] == pytest.approx(energy, rel=1e-9)
            # and the stored System reproduces them too
            energy2, forces2 = _fresh_state(stored_system, frame["positions"])
            np.testing.assert_allclose(forces2, forces, rtol=1e-9, atol=1e-9)
        # metadata
        settings = ds.settings
        assert settings["temperature_K"] == 300.0 and settings["timestep_ps"] == 0.002
        assert settings["report_interval"] == 20 and settings["platform"] == "Reference"
        assert "openmm" in ds.package_versions
        assert [r.name for r in ds.topology.residues()] == ["ACE", "ALA", "NME"]


def test_periodic_box_and_float32_forces(water_box, tmp_path):
    top, system, pos = water_box
    path = simulate_reference(tmp_path / "w.h5", top, system, pos, n_steps=40, report_interval=10,
                              platform="Reference", progress=False)
    with AADataset(path) as ds:
        assert ds.periodic and ds.positions.dtype == np.float32
        frame = ds.frame(2)
        np.testing.assert_allclose(frame["box_vectors"], np.diag([1.4, 1.4, 1.4]), atol=1e-12)
        _, forces = _fresh_state(system, frame["positions"].astype(np.float64), frame["box_vectors"])
        # float32 storage: positions rounded at ~1e-7 relative; compare with a relative tolerance on |F|
        scale = np.abs(forces).max()
        assert np.abs(frame["forces"] - forces).max() < 1e-4 * scale


def test_integration_force_groups_only(adp, tmp_path):
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(adp.system))
    for force in system.getForces():
        force.setForceGroup(0 if isinstance(force, openmm.HarmonicBondForce) else 1)
    integrator = openmm.VerletIntegrator(0.0005)
    integrator.setIntegrationForceGroups({0})
    sim = app.Simulation(adp.topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(adp.positions)
    sim.reporters.append(AADataReporter(tmp_path / "g.h5", 5, dtype="float64"))
    sim.step(10)
    sim.reporters[0].close()
    with AADataset(tmp_path / "g.h5") as ds:
        frame = ds.frame(1)
        energy, forces = _fresh_state(system, frame["positions"], groups={0})
        np.testing.assert_allclose(frame["forces"], forces, rtol=1e-9, atol=1e-9)
        assert frame["potential_energy"] == pytest.approx(energy)


def test_append_continues_without_duplicates(adp, adp_run, tmp_path):
    path = tmp_path / "cont.h5"
    kw = dict(report_interval=20, dtype="float64", platform="Reference", progress=False, seed=3)
    simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=200, **kw)
    simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=400, append=True, **kw)
    before = path.read_bytes()
    with AADataset(path):  # a run already that long is left byte for byte as it was, even while being read
        simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=400, append=True, **kw)
        simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=300, append=True, **kw)
    assert path.read_bytes() == before
    with AADataset(path) as ds, AADataset(adp_run) as ref:
        np.testing.assert_array_equal(ds.step, np.arange(20, 401, 20))
        assert np.all(np.diff(ds.time) > 0)
        # the first half is the same trajectory as an uninterrupted run with the same seed
        np.testing.assert_allclose(ds.positions[:10], ref.positions[:10])
        # continuation starts from the last stored frame: the first new frame is close to it
        step = np.linalg.norm(ds.positions[10] - ds.positions[9], axis=-1).max()
        assert step < 0.2
    with pytest.raises(ValueError, match="report_interval"):
        simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=800, append=True,
                           **{**kw, "report_interval": 40})


def test_checkpoint_restart_drops_abandoned_frames(adp, tmp_path):
    def make_sim():
        integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.002 * u.picosecond)
        integrator.setRandomNumberSeed(7)
        return app.Simulation(adp.topology, adp.system, integrator, openmm.Platform.getPlatformByName("Reference"))

    path = tmp_path / "r.h5"
    sim = make_sim()
    sim.context.setPositions(adp.positions)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    sim.reporters.append(AADataReporter(path, 10, dtype="float64"))
    sim.step(50)
    sim.saveCheckpoint(str(tmp_path / "chk"))
    sim.step(50)
    sim.reporters[0].close()
    with AADataset(path) as ds:
        original = ds.positions[:]

    sim2 = make_sim()
    sim2.loadCheckpoint(str(tmp_path / "chk"))
    sim2.reporters.append(AADataReporter(path, 10, append=True, dtype="float64"))
    with pytest.warns(UserWarning, match="dropping 5 stored frame"):
        sim2.step(70)
    sim2.reporters[0].close()
    with AADataset(path) as ds:
        np.testing.assert_array_equal(ds.step, np.arange(10, 121, 10))
        # Reference platform + checkpointed RNG state: the re-run reproduces the abandoned frames exactly
        np.testing.assert_allclose(ds.positions[:10], original, atol=1e-12)


def test_crash_loses_at_most_the_frame_in_flight(water_box, tmp_path):
    path = tmp_path / "crash.h5"
    script = textwrap.dedent(f"""
        import os, numpy as np, openmm.app as app, openmm, openmm.unit as u
        from openmm_backmap.data import TrajectoryWriter
        ff = app.ForceField("amber14/tip3p.xml")
        m = app.Modeller(app.Topology(), [])
        m.addSolvent(ff, boxSize=openmm.Vec3(1.4, 1.4, 1.4) * u.nanometer)
        w = TrajectoryWriter({str(path)!r}, m.topology, fields=("positions",))
        x = np.asarray(m.positions.value_in_unit(u.nanometer))
        for i in range(7):
            w.append(step=i, time_ps=0.1 * i, positions=x + i, box_vectors=np.eye(3) * 1.4)
        w._file["positions"].resize(8, axis=0)   # a frame in flight: positions written, step not yet
        w._file["positions"][7] = x
        os._exit(1)                              # crash: no close(), no atexit
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    with AADataset(path) as ds:
        assert ds.n_frames == 7
        np.testing.assert_allclose(ds.positions[6] - ds.positions[0], 6.0, atol=1e-5)
    # appending after the crash discards the partial frame and continues
    top = water_box[0]
    with pytest.warns(UserWarning, match="not closed by its writer"), TrajectoryWriter(path, top, append=True) as w:
        assert w.n_frames == 7 and w.last_step == 6
        w.append(step=7, time_ps=0.7, positions=np.zeros((top.getNumAtoms(), 3)), box_vectors=np.eye(3) * 1.4)
    with AADataset(path) as ds:
        np.testing.assert_array_equal(ds.step, np.arange(8))
        assert ds.positions.shape == (8, top.getNumAtoms(), 3)


def test_lazy_indexing_matches_numpy(adp_run):
    with AADataset(adp_run) as ds:
        full = ds.positions[:]
        assert isinstance(full, np.ndarray) and full.shape == (20, 22, 3)
        for index in (3, -1, slice(2, 9, 3), slice(None, None, -2), [5, 1, 5, 0], np.arange(20) % 3 == 0):
            np.testing.assert_array_equal(ds.positions[index], full[index])
        np.testing.assert_array_equal(np.asarray(ds.forces), ds.forces[:])
        with pytest.raises(IndexError):
            ds.positions[20]
        traj = ds.to_mdtraj([0, 5])
        assert traj.n_atoms == 22 and traj.n_frames == 2
        np.testing.assert_allclose(traj.xyz, full[[0, 5]], rtol=1e-6)


def test_torch_dataset_reads_stored_frames(adp_run):
    import torch

    with AADataset(adp_run) as ds:
        train, val, test = ds.split(n_blocks=5)
        frames = ds.torch_dataset(val, dtype=torch.float64)
        assert len(frames) == len(val)
        item = frames[1]
        np.testing.assert_array_equal(item["forces"].numpy(), ds.forces[val[1]])
        batch = next(iter(torch.utils.data.DataLoader(frames, batch_size=3)))
        assert batch["positions"].shape == (3, 22, 3)


def test_block_split_is_contiguous_disjoint_and_reproducible():
    parts = block_split(103, (0.8, 0.1, 0.1), n_blocks=10, seed=4)
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(103))
    assert [len(p) > 0 for p in parts] == [True] * 3
    blocks = np.array_split(np.arange(103), 10)
    block_of = {int(i): b for b, blk in enumerate(blocks) for i in blk}
    for part in parts:  # every set is a union of whole blocks
        used = {block_of[int(i)] for i in part}
        assert sum(len(blocks[b]) for b in used) == len(part)
    assert len({block_of[int(i)] for i in parts[1]}) == 1 and len({block_of[int(i)] for i in parts[2]}) == 1
    for a, b in zip(parts, block_split(103, (0.8, 0.1, 0.1), n_blocks=10, seed=4)):
        np.testing.assert_array_equal(a, b)
    others = block_split(103, (0.8, 0.1, 0.1), n_blocks=10, seed=5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, others))
    with pytest.raises(ValueError):
        block_split(5, n_blocks=10)
    with pytest.raises(ValueError):
        block_split(100, (0.5, -0.5))


@pytest.fixture(scope="module")
def benzene_box():
    # 30 benzene molecules: a 1.65 nm box, so a 0.7 nm cutoff
    return systems.liquid("BENZ", 30, seed=0, cutoff_nm=0.7, switch_nm=0.6)


def test_npt_equilibration_then_nvt_production(benzene_box, tmp_path):
    liq = benzene_box
    n_forces = liq.system.getNumForces()
    start_box = np.asarray(liq.topology.getPeriodicBoxVectors().value_in_unit(u.nanometer))
    path = tmp_path / "benz.h5"
    kw = dict(report_interval=20, equilibration_steps=400, pressure_bar=1.0, barostat_interval=5, platform="CPU",
              progress=False, seed=1)
    simulate_reference(path, liq.topology, liq.system, liq.positions, n_steps=100, **kw)
    assert liq.system.getNumForces() == n_forces  # the caller's System gets no barostat
    with AADataset(path) as ds:
        settings = ds.settings
        boxes = ds.box_vectors[:]
        assert not any(isinstance(f, openmm.MonteCarloBarostat) for f in ds.system.getForces())
    assert settings["pressure_bar"] == 1.0 and settings["equilibration_ensemble"] == "NPT"
    assert settings["npt_box_samples"] == 10  # second half (200 steps) sampled every 20 steps
    box = np.asarray(settings["production_box_nm"])
    assert not np.allclose(box, start_box, atol=1e-6)  # the barostat changed the volume
    np.testing.assert_allclose(boxes, np.broadcast_to(box, boxes.shape), atol=1e-12)  # NVT: one box throughout
    mass = sum(liq.system.getParticleMass(i).value_in_unit(u.dalton) for i in range(liq.system.getNumParticles()))
    density = mass / 6.02214076e23 / (np.linalg.det(box) * 1e-21)
    assert settings["production_density_g_cm3"] == pytest.approx(density)
    assert 0.6 < settings["npt_density_g_cm3"] < 1.2
    assert abs(settings["npt_density_g_cm3"] - density) < 3 * settings["npt_density_std_g_cm3"] + 1e-9

    # append continues NVT in the stored box (no second equilibration) and keeps the recorded settings
    simulate_reference(path, liq.topology, liq.system, liq.positions, n_steps=140, append=True, **kw)
    with AADataset(path) as ds:
        np.testing.assert_array_equal(ds.step, np.arange(20, 141, 20))
        np.testing.assert_allclose(ds.box_vectors[:], np.broadcast_to(box, (7, 3, 3)), atol=1e-12)
        assert ds.settings == settings


def test_npt_is_refused_without_a_box_or_equilibration(adp, benzene_box, tmp_path):
    with pytest.raises(ValueError, match="periodic"):
        simulate_reference(tmp_path / "a.h5", adp.topology, adp.system, adp.positions, n_steps=20,
                           report_interval=10, equilibration_steps=100, pressure_bar=1.0, progress=False)
    liq = benzene_box
    with pytest.raises(ValueError, match="equilibration_steps > 0"):
        simulate_reference(tmp_path / "b.h5", liq.topology, liq.system, liq.positions, n_steps=20,
                           report_interval=10, pressure_bar=1.0, progress=False)
    with pytest.raises(ValueError, match="barostat_interval"):
        simulate_reference(tmp_path / "b.h5", liq.topology, liq.system, liq.positions, n_steps=20,
                           report_interval=10, equilibration_steps=10, pressure_bar=1.0, barostat_interval=0,
                           progress=False)
    npt = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(liq.system))
    npt.addForce(openmm.MonteCarloBarostat(1 * u.bar, 300 * u.kelvin))
    with pytest.raises(ValueError, match="already has a barostat"):
        simulate_reference(tmp_path / "b.h5", liq.topology, npt, liq.positions, n_steps=20,
                           report_interval=10, equilibration_steps=10, pressure_bar=1.0, progress=False)
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_bad_input_is_refused_and_files_untouched(adp, adp_run, water_box, tmp_path):
    with pytest.raises(FileNotFoundError):
        AADataset(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        AADataset(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not an openmm-backmap trajectory"):
        AADataset(foreign)
    with pytest.raises(ValueError, match="open it with AADataset"):
        CGDataset(adp_run)
    newer = tmp_path / "newer.h5"
    newer.write_bytes(adp_run.read_bytes())
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="newer than this"):
        AADataset(newer)

    before = adp_run.read_bytes()
    top, system, pos = water_box
    with pytest.raises(ValueError, match="different topology"):
        simulate_reference(adp_run, top, system, pos, n_steps=20, report_interval=10, append=True, progress=False)
    with pytest.raises(ValueError, match="different topology"):
        TrajectoryWriter(adp_run, top, append=True)
    assert adp_run.read_bytes() == before

    bad = np.asarray(adp.positions.value_in_unit(u.nanometer)).copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        simulate_reference(tmp_path / "nan.h5", adp.topology, adp.system, bad, n_steps=20, report_interval=10)
    with pytest.raises(ValueError, match="22 were expected"):
        simulate_reference(tmp_path / "shape.h5", adp.topology, adp.system, bad[:10], n_steps=20, report_interval=10)
    with pytest.raises(ValueError, match="multiple of report_interval"):
        simulate_reference(tmp_path / "x.h5", adp.topology, adp.system, adp.positions, n_steps=25, report_interval=10)
    with pytest.raises(ValueError, match="topology has"):
        simulate_reference(tmp_path / "x.h5", top, adp.system, adp.positions, n_steps=20, report_interval=10)
    for name in ("nan.h5", "shape.h5", "x.h5"):
        assert not (tmp_path / name).exists()

    with TrajectoryWriter(tmp_path / "w.h5", adp.topology) as w:
        with pytest.raises(ValueError, match="NaN"):
            w.append(step=1, time_ps=0.0, positions=bad, forces=bad, velocities=bad)
        with pytest.raises(ValueError, match="forces"):
            w.append(step=1, time_ps=0.0, positions=np.zeros((22, 3)))
        assert w.n_frames == 0
    with pytest.raises(ValueError, match="reportInterval"):
        AADataReporter(tmp_path / "r.h5", 0)


def test_reads_across_chunk_boundaries_and_live_refresh(tmp_path):
    """Regression: h5py's Dataset.refresh() twice corrupted SWMR reads past the first chunk (1024 steps)."""
    top = app.Topology()
    residue = top.addResidue("ARG", top.addChain())
    top.addAtom("AR", app.Element.getBySymbol("Ar"), residue)
    path = tmp_path / "long.h5"
    with TrajectoryWriter(path, top, fields=("positions",)) as writer:
        writer.append_frames(step=np.arange(1, 1501), time_ps=np.arange(1, 1501) * 0.1,
                             positions=np.arange(1500.0)[:, None, None] * np.ones((1500, 1, 3)))
        with AADataset(path) as live:
            assert live.n_frames == 1500
            writer.append(step=1501, time_ps=150.1, positions=np.zeros((1, 3)))
            live.refresh()
            for _ in range(3):  # repeated access must keep returning the right values
                assert live.n_frames == 1501
                np.testing.assert_array_equal(live.step, np.arange(1, 1502))
                np.testing.assert_array_equal(live.positions[1020:1030, 0, 0], np.arange(1020.0, 1030.0))


def test_the_default_seed_reproduces_a_run(tmp_path):
    """seed=0 (the default) gives the same trajectory twice: OpenMM reads a seed of 0 as "random", so the seed is
    mapped to a fixed non-zero one (this was a bug: default runs were not reproducible)."""
    from openmm_backmap._physics import openmm_seed

    adp = systems.alanine_dipeptide("obc2")
    xyz = []
    for name in ("a.h5", "b.h5"):
        simulate_reference(tmp_path / name, adp.topology, adp.system, adp.positions, n_steps=100, report_interval=50,
                           equilibration_steps=20, platform="Reference", progress=False)
        with AADataset(tmp_path / name) as ds:
            xyz.append(ds.positions[:])
    np.testing.assert_array_equal(xyz[0], xyz[1])
    assert openmm_seed(0) != 0 and openmm_seed(-1) > 0 and openmm_seed(2**31 - 2) == 2**31 - 1
    assert len({openmm_seed(s) for s in range(1000)}) == 1000
