"""AA trajectory files: round trips through mdtraj, steps and times, append, truncation, live PDB."""
from __future__ import annotations

import importlib.util

import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)
import mdtraj
import numpy as np
import pytest

from openmm_backmap import systems
from openmm_backmap.formats import (AATrajectoryWriter, LivePDB, existing_steps, last_frame, read_frames,
                                    topology_pdb_path, truncate_after)

# Position tolerance of each format (nm): DCD float32 Å, XTC 1e-3 nm grid, HDF5 float32 nm, PDB 1e-3 Å.
TOL = {"dcd": 1e-5, "xtc": 5.1e-4, "h5": 1e-6, "pdb": 6e-5}
BOX = np.array([[3.0, 0.0, 0.0], [0.0, 3.1, 0.0], [0.2, 0.1, 3.2]])


@pytest.fixture(scope="module")
def adp():
    """(openmm topology, 6 distinct frames in nm) of alanine dipeptide."""
    built = systems.alanine_dipeptide()
    x0 = np.asarray(built.positions_nm, dtype=np.float64)
    rng = np.random.default_rng(0)
    return built.topology, np.array([x0 + 0.02 * rng.standard_normal(x0.shape) for _ in range(6)])


def _write(path, top, frames, steps, dt_ps=0.002, box=None, **kwargs):
    with AATrajectoryWriter(path, top, dt_ps=dt_ps, **kwargs) as writer:
        for xyz, step in zip(frames, steps):
            writer.write(xyz, step, step * dt_ps, box)
    return writer


def _mdtraj_load(path, fmt):
    if fmt in ("dcd", "xtc"):
        return mdtraj.load(str(path), top=str(topology_pdb_path(path)))
    return mdtraj.load(str(path))


@pytest.mark.parametrize("fmt", ["dcd", "xtc", "h5", "pdb"])
@pytest.mark.parametrize("periodic", [False, True])
def test_round_trip_through_mdtraj(adp, tmp_path, fmt, periodic):
    top, frames = adp
    path = tmp_path / f"traj.{fmt}"
    steps = [100, 200, 300, 400, 500]
    box = BOX if periodic else None
    writer = _write(path, top, frames[:5], steps, box=box)
    assert writer.n_frames == 5 and writer.last_step == 500
    if fmt == "h5" and importlib.util.find_spec("tables") is None:
        traj = None  # mdtraj reads HDF5 through PyTables; read_frames below checks the same content
    else:
        traj = _mdtraj_load(path, fmt)
        assert traj.n_atoms == 22 and traj.n_frames == 5
        np.testing.assert_allclose(traj.xyz, frames[:5], atol=TOL[fmt])
        if periodic:
            np.testing.assert_allclose(traj.unitcell_vectors[-1], BOX, atol=1e-3 if fmt == "pdb" else 1e-5)
        else:
            assert traj.unitcell_vectors is None
        if fmt in ("xtc", "h5"):  # times stored per frame
            np.testing.assert_allclose(traj.time, np.array(steps) * 0.002, rtol=1e-6)
    data = read_frames(path, top)
    np.testing.assert_allclose(data["xyz"], frames[:5], atol=TOL[fmt])
    if fmt != "pdb":
        assert existing_steps(path).tolist() == steps
        np.testing.assert_allclose(data["time"], np.array(steps) * 0.002, rtol=1e-6)  # DCD: header dt x step
        np.testing.assert_allclose(last_frame(path, top), frames[4], atol=TOL[fmt])
    if periodic:
        np.testing.assert_allclose(data["box"][0], BOX, atol=1e-3 if fmt == "pdb" else 1e-5)
    # DCD and XTC get the topology as a PDB (first frame) next to them; the others don't
    pdb = tmp_path / "traj.pdb"
    if fmt in ("dcd", "xtc"):
        first = mdtraj.load(str(pdb))
        assert first.n_frames == 1 and [a.name for a in first.topology.atoms] == [a.name for a in top.atoms()]
        np.testing.assert_allclose(first.xyz[0], frames[0], atol=TOL["pdb"])
        assert first.topology.n_bonds == top.getNumBonds()
    elif fmt != "pdb":
        assert not pdb.exists()


@pytest.mark.parametrize("fmt", ["dcd", "xtc", "h5"])
def test_truncate_then_append_continues_without_duplicates(adp, tmp_path, fmt):
    top, frames = adp
    path = tmp_path / f"traj.{fmt}"
    _write(path, top, frames[:5], [50, 100, 150, 200, 250])
    assert truncate_after(path, top, 175) == 3  # a run restarting from a checkpoint at step 175
    assert existing_steps(path).tolist() == [50, 100, 150]
    np.testing.assert_allclose(last_frame(path, top), frames[2], atol=TOL[fmt])
    with AATrajectoryWriter(path, top, append=True, dt_ps=0.002, interval_steps=50) as writer:
        assert writer.appending and writer.n_frames == 3
        with pytest.raises(ValueError, match="not after the last stored step 150"):
            writer.write(frames[5], 150, 0.3)
        for k, step in enumerate([200, 250, 300]):
            writer.write(frames[3 + k % 3], step, step * 0.002)
    data = read_frames(path, top)
    assert data["step"].tolist() == [50, 100, 150, 200, 250, 300]
    np.testing.assert_allclose(data["time"], data["step"] * 0.002, rtol=1e-6)
    np.testing.assert_allclose(data["xyz"], frames[[0, 1, 2, 3, 4, 5]], atol=TOL[fmt])
    assert truncate_after(path, top, 1000) == 6  # nothing after: untouched
    assert truncate_after(path, top, 10) == 0
    assert existing_steps(path).size == 0
    _write(path, top, frames[:2], [60, 120], append=True)  # an emptied file starts afresh
    assert existing_steps(path).tolist() == [60, 120]


def test_dcd_header_interval_and_time_step(adp, tmp_path):
    top, frames = adp
    path = tmp_path / "traj.dcd"
    # interval not given: taken from the first two frames (the header is rewritten once); dt from time / step
    with AATrajectoryWriter(path, top) as writer:
        writer.write(frames[0], 30, 0.12)
        writer.write(frames[1], 50, 0.2)
        with pytest.raises(ValueError, match="fixed step interval.*expected step 70, got 80"):
            writer.write(frames[2], 80, 0.32)
        writer.write(frames[2], 70, 0.28)
    data = read_frames(path, top)
    assert data["step"].tolist() == [30, 50, 70]
    np.testing.assert_allclose(data["time"], [0.12, 0.2, 0.28], rtol=1e-6)
    np.testing.assert_allclose(data["xyz"], frames[:3], atol=TOL["dcd"])
    # a one-frame file continued later: its placeholder interval is settled by the second frame
    one = tmp_path / "one.dcd"
    _write(one, top, frames[:1], [100])
    _write(one, top, frames[1:3], [150, 200], append=True)
    assert existing_steps(one).tolist() == [100, 150, 200]
    np.testing.assert_allclose(mdtraj.load(str(one), top=str(tmp_path / "one.pdb")).xyz, frames[:3],
                               atol=TOL["dcd"])
    with pytest.raises(ValueError, match="every 50 steps, not every 20"):
        AATrajectoryWriter(one, top, append=True, interval_steps=20)


def test_crash_leftover_partial_dcd_frame_is_dropped(adp, tmp_path):
    top, frames = adp
    path = tmp_path / "traj.dcd"
    _write(path, top, frames[:3], [10, 20, 30])
    with open(path, "ab") as handle:  # a frame cut off mid-write (header count already raised, as DCDFile does)
        handle.write(b"\0" * 100)
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write((4).to_bytes(4, "little"))
    assert existing_steps(path).tolist() == [10, 20, 30]
    with pytest.warns(UserWarning, match="incomplete last frame"):
        _write(path, top, frames[3:4], [40], append=True)
    np.testing.assert_allclose(mdtraj.load(str(path), top=str(tmp_path / "traj.pdb")).xyz, frames[:4],
                               atol=TOL["dcd"])


def test_refusals(adp, tmp_path):
    top, frames = adp
    with pytest.raises(ValueError, match="unknown trajectory format '.gro'.*use one of .dcd, .xtc, .h5, .pdb"):
        AATrajectoryWriter(tmp_path / "x.gro", top)
    _write(tmp_path / "x.pdb", top, frames[:2], [1, 2])
    with pytest.raises(ValueError, match="cannot append to the PDB file.*.dcd, .xtc or .h5"):
        AATrajectoryWriter(tmp_path / "x.pdb", top, append=True)
    with pytest.raises(ValueError, match="PDB files store no steps"):
        existing_steps(tmp_path / "x.pdb")
    with pytest.raises(ValueError, match="cannot truncate the PDB file"):
        truncate_after(tmp_path / "x.pdb", top, 1)
    with pytest.raises(FileNotFoundError):
        existing_steps(tmp_path / "missing.dcd")
    other_top = _subset_topology(top)  # 10 atoms
    for fmt in ("dcd", "xtc", "h5"):
        path = tmp_path / f"x.{fmt}"
        _write(path, top, frames[:2], [10, 20])
        with pytest.raises(ValueError, match="cannot append .* holds 22 atoms"):
            AATrajectoryWriter(path, other_top, append=True)
        with pytest.raises(ValueError, match="holds 22 atoms but the topology has"):
            truncate_after(path, other_top, 10)
    with AATrajectoryWriter(tmp_path / "y.h5", top) as writer:
        with pytest.raises(ValueError, match="has 21 particles but 22 were expected"):
            writer.write(frames[0][:21], 1, 0.002)
        with pytest.raises(ValueError, match="NaN"):
            writer.write(np.full((22, 3), np.nan), 1, 0.002)
        writer.write(frames[0], 1, 0.002, BOX)
        with pytest.raises(ValueError, match="all frames must agree"):
            writer.write(frames[1], 2, 0.004)  # box dropped mid-file


def _subset_topology(top):
    import openmm.app as app

    sub = app.Topology()
    chain = sub.addChain()
    residue = sub.addResidue("ALA", chain)
    for atom in list(top.atoms())[:10]:
        sub.addAtom(atom.name, atom.element, residue)
    return sub


def test_live_pdb_is_replaced_atomically(adp, tmp_path):
    top, frames = adp
    path = tmp_path / "live.pdb"
    live = LivePDB(path, top)
    live.update(frames[0])
    old_text = path.read_text()
    with open(path) as reader:  # a viewer that has the file open while the next frame arrives
        live.update(frames[1], BOX)
        assert reader.read() == old_text  # it still sees the whole previous frame: the file was replaced
    now = mdtraj.load(str(path))
    assert now.n_frames == 1 and live.n_updates == 2
    np.testing.assert_allclose(now.xyz[0], frames[1], atol=TOL["pdb"])
    np.testing.assert_allclose(now.unitcell_vectors[0], BOX, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.pdb"]  # no temporary file left behind
    with pytest.raises(ValueError, match="particles"):
        live.update(frames[0][:5])
    assert mdtraj.load(str(path)).n_frames == 1  # a refused frame leaves the file as it was
    with pytest.raises(ValueError, match="does not end in .pdb"):
        LivePDB(tmp_path / "live.xyz", top)
