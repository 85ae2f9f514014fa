"""BackmapReporter on real CG simulations (OpenMM Reference platform), next to OpenMM's own reporters."""
from __future__ import annotations

import csv
import warnings

import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)
import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import pytest

from openmm_backmap.data import CGDataset
from openmm_backmap.formats import existing_steps, read_frames
from openmm_backmap.mapping import map_dataset
from openmm_backmap.potential import ForceMatchingTrainer, create_cg_system
from openmm_backmap.reporters import BackmapReporter, _frame_seed

DT_PS = 0.002  # with INTERVAL: 0.1 ps between frames, the lag of the conftest backmapper
INTERVAL = 50


@pytest.fixture(scope="module")
def cg_setup(adp_aa_data, adp_mapping, tmp_path_factory):
    """(mapping, priors-only CG potential, a start frame in nm) from the conftest alanine-dipeptide data."""
    root = tmp_path_factory.mktemp("cgrep")
    cg = map_dataset(adp_aa_data[1], adp_mapping, root / "cg.h5", progress=False)
    potential = ForceMatchingTrainer(adp_mapping, cg, network=None, max_epochs=1, batch_size=256, dtype="float64",
                                     progress=False).fit()
    with CGDataset(cg) as ds:
        start = ds.positions[0].astype(np.float64)
    return adp_mapping, potential, start


def _simulation(cg_setup, backend="torch", seed=5):
    mapping, potential, start = cg_setup
    system = create_cg_system(mapping, potential, backend=backend)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, DT_PS * u.picosecond)
    integrator.setRandomNumberSeed(seed)
    sim = app.Simulation(mapping.to_openmm_topology(), system, integrator,
                         openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(start)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, seed)
    return sim


def _cg_frames(path, mapping):
    return mdtraj.load(str(path), top=mdtraj.Topology.from_openmm(mapping.to_openmm_topology()))


@pytest.mark.parametrize("backend,fmt", [("torch", "dcd"), ("python", "xtc")])
def test_one_aa_frame_per_interval_matching_the_cg_run(cg_setup, tiny_backmapper, tmp_path, backend, fmt):
    mapping = cg_setup[0]
    sim = _simulation(cg_setup, backend)
    path = tmp_path / f"aa.{fmt}"
    tiny_backmapper.save(tmp_path / "bm.pt")
    reporter = BackmapReporter(path, INTERVAL, tmp_path / "bm.pt", mode="library", live_pdb=tmp_path / "live.pdb")
    sim.reporters += [app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL),
                      app.StateDataReporter(str(tmp_path / "log.csv"), INTERVAL, step=True, time=True),
                      app.CheckpointReporter(str(tmp_path / "cg.chk"), 4 * INTERVAL), reporter]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the interval matches the backmapper's lag: no warning
        sim.step(1000)
    reporter.close()
    aa = read_frames(path, tiny_backmapper.topology)
    with open(tmp_path / "log.csv") as handle:
        log = list(csv.reader(handle))[1:]
    assert aa["step"].tolist() == [int(row[0]) for row in log] == list(range(INTERVAL, 1001, INTERVAL))
    np.testing.assert_allclose(aa["time"], [float(row[1]) for row in log], rtol=1e-6)
    cg = _cg_frames(tmp_path / "cg.dcd", mapping)
    assert cg.n_frames == len(aa["xyz"]) == 20
    # the AA frames map back onto the CG frames (library lookups superposed onto the beads)
    error = np.linalg.norm(mapping.map_positions(aa["xyz"]) - cg.xyz, axis=-1)
    assert error.max() < 0.05, error.max()
    # every frame differs (the chain follows the CG motion)
    assert np.all(np.abs(np.diff(aa["xyz"], axis=0)).max(axis=(1, 2)) > 1e-3)
    live = mdtraj.load(str(tmp_path / "live.pdb"))
    assert live.n_frames == 1
    np.testing.assert_allclose(live.xyz[0], aa["xyz"][-1], atol=1e-3)
    topology_pdb = mdtraj.load(str(tmp_path / "aa.pdb"))
    assert topology_pdb.n_atoms == tiny_backmapper.n_atoms == 22


def test_model_mode_frames_follow_the_beads(cg_setup, tiny_backmapper, tmp_path):
    mapping = cg_setup[0]
    sim = _simulation(cg_setup)
    reporter = BackmapReporter(tmp_path / "aa.h5", INTERVAL, tiny_backmapper, seed=3)
    sim.reporters += [app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL), reporter]
    sim.step(500)
    reporter.close()
    aa = read_frames(tmp_path / "aa.h5")
    assert aa["step"].tolist() == list(range(INTERVAL, 501, INTERVAL))
    cg = _cg_frames(tmp_path / "cg.dcd", mapping).xyz.astype(np.float64)
    error = np.linalg.norm(mapping.map_positions(aa["xyz"]) - cg, axis=-1)
    assert error.mean() < 0.1, error.mean()  # a tiny, briefly trained model: loose
    # offline, the same CG frames through a chain with the same per-step seeds give the same AA frames
    chain = tiny_backmapper.chain(seed=3)
    offline = []
    for step, frame in zip(aa["step"], cg):
        chain.generator.manual_seed(_frame_seed(3, int(step)))
        offline.append(chain.step(frame))
    np.testing.assert_allclose(aa["xyz"], offline, atol=1e-4)
    assert reporter.chain.n_steps == 10


def test_relaxed_frames_are_written_and_condition_the_chain(cg_setup, tiny_backmapper, adp_aa_data, tmp_path):
    """relax=<AA System>: the written frames are relaxed (OpenMM energies below those of the unrelaxed frames of the
    same CG run), stay on the beads, and the chain goes on from them. (That the relaxed frame is the next step's
    condition is checked exactly in test_relax.py; here the minimiser's path would amplify the float32 rounding
    of the stored CG frames.)"""
    mapping, system = cg_setup[0], adp_aa_data[0].system
    paths, reporters = {}, {}
    for tag, relax in (("raw", None), ("relaxed", system)):
        sim = _simulation(cg_setup)
        paths[tag] = tmp_path / f"{tag}.h5"
        reporters[tag] = BackmapReporter(paths[tag], INTERVAL, tiny_backmapper, seed=3, relax=relax)
        sim.reporters += [app.DCDReporter(str(tmp_path / f"{tag}.dcd"), INTERVAL), reporters[tag]]
        sim.step(5 * INTERVAL)
        reporters[tag].close()
    aa = {tag: read_frames(path)["xyz"].astype(np.float64) for tag, path in paths.items()}
    cg = _cg_frames(tmp_path / "relaxed.dcd", mapping).xyz.astype(np.float64)
    np.testing.assert_allclose(cg, _cg_frames(tmp_path / "raw.dcd", mapping).xyz, atol=1e-6)  # the same CG run
    assert reporters["relaxed"].chain.relaxer is not None and reporters["raw"].chain.relaxer is None
    np.testing.assert_allclose(reporters["relaxed"].chain.previous[0], aa["relaxed"][-1], atol=1e-5)
    assert np.linalg.norm(mapping.map_positions(aa["relaxed"]) - cg, axis=-1).max() < 0.02
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energy = {}
    for tag, frames in aa.items():
        energy[tag] = []
        for xyz in frames:
            context.setPositions(xyz)
            energy[tag].append(context.getState(getEnergy=True).getPotentialEnergy()._value)
    assert np.all(np.array(energy["relaxed"]) < np.array(energy["raw"])), energy


@pytest.mark.parametrize("fmt", ["dcd", "h5"])
def test_append_after_checkpoint_restart_equals_an_uninterrupted_run(cg_setup, tiny_backmapper, tmp_path, fmt):
    # the uninterrupted run
    sim = _simulation(cg_setup)
    full = BackmapReporter(tmp_path / f"full.{fmt}", INTERVAL, tiny_backmapper, seed=7)
    sim.reporters.append(full)
    sim.step(600)
    full.close()
    # the same run, checkpointed at step 260, then going elsewhere (new velocities) until it stops at step 300 ...
    sim = _simulation(cg_setup)
    path = tmp_path / f"restart.{fmt}"
    first = BackmapReporter(path, INTERVAL, tiny_backmapper, seed=7)
    sim.reporters += [first, app.CheckpointReporter(str(tmp_path / "run.chk"), 130)]
    sim.step(260)
    sim.context.setVelocitiesToTemperature(600 * u.kelvin, 11)
    sim.step(40)
    first.close()
    abandoned = read_frames(path)
    assert abandoned["step"].tolist() == list(range(50, 301, 50))
    assert np.abs(abandoned["xyz"][-1] - read_frames(tmp_path / f"full.{fmt}")["xyz"][5]).max() > 1e-3
    # ... then restarted from the checkpoint: frame 300 belongs to the abandoned continuation
    sim = _simulation(cg_setup, seed=99)
    sim.loadCheckpoint(str(tmp_path / "run.chk"))
    assert sim.currentStep == 260
    second = BackmapReporter(path, INTERVAL, tiny_backmapper, seed=7, append=True)
    sim.reporters.append(second)
    with pytest.warns(UserWarning, match="1 frame\\(s\\) after step 260.*dropped"):
        sim.step(340)
    second.close()
    full_frames, restarted = read_frames(tmp_path / f"full.{fmt}"), read_frames(path)
    assert restarted["step"].tolist() == full_frames["step"].tolist() == list(range(50, 601, 50))
    np.testing.assert_allclose(restarted["time"], full_frames["time"], rtol=1e-6)
    # the chain continued from the stored frame at step 250 with per-step random numbers: identical frames
    np.testing.assert_allclose(restarted["xyz"], full_frames["xyz"], atol=1e-4)


def test_restart_without_the_previous_frame_warns_and_seeds_from_the_library(cg_setup, tiny_backmapper, tmp_path):
    sim = _simulation(cg_setup)
    path = tmp_path / "aa.xtc"
    first = BackmapReporter(path, INTERVAL, tiny_backmapper)
    sim.reporters.append(first)
    sim.step(200)
    first.close()
    sim.reporters.clear()
    sim.step(100)  # 100 steps nobody backmapped: the file misses steps 250 and 300
    second = BackmapReporter(path, INTERVAL, tiny_backmapper, append=True)
    sim.reporters.append(second)
    with pytest.warns(UserWarning, match="no frame at step 300 .*last is at step 200.*library"):
        sim.step(100)
    second.close()
    assert existing_steps(path).tolist() == [50, 100, 150, 200, 350, 400]


def test_first_frame_conditions_the_first_report(cg_setup, tiny_backmapper, adp_aa_data, tmp_path):
    from openmm_backmap.data import AADataset

    with AADataset(adp_aa_data[1]) as ds:
        aa0 = ds.positions[0].astype(np.float64)
    frames = {}
    for name, first_frame in (("given", aa0), ("library", None)):
        sim = _simulation(cg_setup)
        reporter = BackmapReporter(tmp_path / f"{name}.h5", INTERVAL, tiny_backmapper, first_frame=first_frame)
        sim.reporters.append(reporter)
        sim.step(INTERVAL)
        reporter.close()
        frames[name] = read_frames(tmp_path / f"{name}.h5")["xyz"][0]
        state = sim.context.getState(getPositions=True)
    cg = state.getPositions(asNumpy=True).value_in_unit(u.nanometer)
    chain = tiny_backmapper.chain()
    chain.previous = aa0
    chain.generator.manual_seed(_frame_seed(0, INTERVAL))
    np.testing.assert_allclose(frames["given"], chain.step(cg), atol=1e-5)
    assert np.abs(frames["given"] - frames["library"]).max() > 1e-3


def test_periodic_cg_run_stores_the_box(cg_setup, tiny_backmapper, tmp_path):
    mapping = cg_setup[0]
    sim = _simulation(cg_setup)
    box = np.diag([2.5, 2.6, 2.7])
    periodic = openmm.CustomNonbondedForce("0")  # makes the system periodic without changing its forces
    periodic.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    periodic.setCutoffDistance(1.0)
    for _ in range(sim.system.getNumParticles()):
        periodic.addParticle([])
    system = sim.system
    system.addForce(periodic)
    system.setDefaultPeriodicBoxVectors(*box)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, DT_PS * u.picosecond)
    integrator.setRandomNumberSeed(5)
    sim = app.Simulation(sim.topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    start = cg_setup[2] + [2.5 - cg_setup[2][:, 0].mean(), 0.0, 0.0]  # centred on the box edge: wrapping would split it
    assert (start[:, 0] > 2.5).any() and (start[:, 0] < 2.5).any()
    sim.context.setPositions(start)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 2)
    reporter = BackmapReporter(tmp_path / "aa.dcd", INTERVAL, tiny_backmapper, mode="library",
                               live_pdb=tmp_path / "live.pdb")
    sim.reporters += [app.DCDReporter(str(tmp_path / "cg.dcd"), INTERVAL, enforcePeriodicBox=False), reporter]
    sim.step(300)
    reporter.close()
    aa = read_frames(tmp_path / "aa.dcd")
    np.testing.assert_allclose(aa["box"], np.broadcast_to(box, (6, 3, 3)), atol=1e-5)
    assert mdtraj.load(str(tmp_path / "aa.dcd"), top=str(tmp_path / "aa.pdb")).unitcell_lengths[0] == \
        pytest.approx([2.5, 2.6, 2.7], abs=1e-5)
    np.testing.assert_allclose(mdtraj.load(str(tmp_path / "live.pdb")).unitcell_lengths[0], [2.5, 2.6, 2.7], atol=1e-3)
    cg = _cg_frames(tmp_path / "cg.dcd", mapping).xyz  # unwrapped, as the reporter asks for them
    error = np.linalg.norm(mapping.map_positions(aa["xyz"]) - cg, axis=-1)
    assert error.max() < 0.05, error.max()
    assert (cg[:, :, 0] > 2.5).any() and (cg[:, :, 0] < 2.5).any()  # the molecule did straddle the box edge


def test_mismatched_cg_system_is_refused(cg_setup, tiny_backmapper, tmp_path):
    mapping, potential, start = cg_setup
    system = create_cg_system(mapping, potential, n_copies=2)  # 12 particles
    sim = app.Simulation(mapping.to_openmm_topology(), system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(np.concatenate([start, start + 3.0]))
    sim.reporters.append(BackmapReporter(tmp_path / "aa.dcd", 5, tiny_backmapper))
    with pytest.raises(ValueError, match="the simulation's CG system has 12 particles but the backmapper was "
                                         "trained for 6 beads"):
        sim.step(5)
    # right particle count, wrong bead names
    sim = _simulation(cg_setup)
    next(iter(sim.topology.atoms())).name = "XX"
    sim.reporters.append(BackmapReporter(tmp_path / "aa2.dcd", 5, tiny_backmapper))
    with pytest.raises(ValueError, match="particle 0 is named 'XX'"):
        sim.step(5)
    assert not (tmp_path / "aa.dcd").exists() and not (tmp_path / "aa2.dcd").exists()


def test_describe_next_report_asks_only_for_positions(cg_setup, tiny_backmapper, tmp_path):
    sim = _simulation(cg_setup)
    reporter = BackmapReporter(tmp_path / "aa.dcd", INTERVAL, tiny_backmapper)
    assert reporter.describeNextReport(sim) == {"steps": INTERVAL, "periodic": False, "include": ["positions"]}
    sim.step(20)
    assert reporter.describeNextReport(sim)["steps"] == INTERVAL - 20


def test_bad_arguments_and_lag_mismatch(cg_setup, tiny_backmapper, tmp_path):
    with pytest.raises(ValueError, match="cannot append to the PDB file"):
        BackmapReporter(tmp_path / "aa.pdb", 10, tiny_backmapper, append=True)
    with pytest.raises(ValueError, match="unknown trajectory format '.trr'"):
        BackmapReporter(tmp_path / "aa.trr", 10, tiny_backmapper)
    with pytest.raises(ValueError, match="reportInterval"):
        BackmapReporter(tmp_path / "aa.dcd", 0, tiny_backmapper)
    with pytest.raises(ValueError, match="mode"):
        BackmapReporter(tmp_path / "aa.dcd", 10, tiny_backmapper, mode="vae")
    with pytest.raises(TypeError, match="TemporalBackmapper"):
        BackmapReporter(tmp_path / "aa.dcd", 10, object())
    with pytest.raises(ValueError, match="first_frame has 5 particles but 22"):
        BackmapReporter(tmp_path / "aa.dcd", 10, tiny_backmapper, first_frame=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="live_pdb .* would overwrite"):
        BackmapReporter(tmp_path / "aa.dcd", 10, tiny_backmapper, live_pdb=tmp_path / "aa.pdb")
    with pytest.raises(ValueError, match="candidates > 1 needs units joined by bonds"):
        BackmapReporter(tmp_path / "aa.dcd", 10, tiny_backmapper, candidates=8)
    # frames 0.05 ps apart for a backmapper trained at 0.1 ps: one warning, at the first report
    sim = _simulation(cg_setup)
    reporter = BackmapReporter(tmp_path / "aa.pdb", INTERVAL // 2, tiny_backmapper)
    sim.reporters.append(reporter)
    with pytest.warns(UserWarning, match="0.05 ps apart .* trained on frames 0.1 ps apart") as record:
        sim.step(2 * INTERVAL)
    assert sum("apart" in str(w.message) for w in record) == 1
    reporter.close()
    assert mdtraj.load(str(tmp_path / "aa.pdb")).n_frames == 4
