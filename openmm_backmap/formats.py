"""AA trajectory files for backmapped frames: DCD, XTC, HDF5 (mdtraj layout) and multi-model PDB.

:class:`AATrajectoryWriter` picks the format from the file extension and flushes every frame, so a
crashed run keeps what it wrote and a viewer can follow a running one:

=========  ==================================================================================================
``.dcd``   CHARMM DCD written by ``openmm.app.DCDFile`` (float32, Å on disk). The header stores the first
           step, the step interval and the time step; frames must be written at a fixed step interval.
           A ``.pdb`` with the topology and the first frame is written next to it.
``.xtc``   GROMACS XTC written by mdtraj (compressed to 1e-3 nm). Every frame stores its step (int32), its
           time (ps, float32) and its box. A ``.pdb`` with the topology is written next to it.
``.h5``    The mdtraj HDF5 layout (``coordinates`` nm float32, ``time`` ps, ``cell_lengths``/``cell_angles``,
           ``topology`` JSON), written with h5py, plus a ``step`` dataset (int64) that mdtraj ignores.
           ``mdtraj.load`` reads it when PyTables is installed; :func:`read_frames` always does.
``.pdb``   Multi-model PDB (``openmm.app.PDBFile``, 1e-4 nm). No steps or times; no append.
=========  ==================================================================================================

Restarting a run from a checkpoint older than the last frame written: :func:`existing_steps` lists the steps
already in a file, :func:`truncate_after` drops the frames after a step (in place), :func:`last_frame` reads the
last stored frame, then an ``AATrajectoryWriter(..., append=True)`` continues the file.

:class:`LivePDB` keeps one PDB file holding the current frame, replaced atomically at every update.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import openmm.app as app
from openmm import Vec3, unit

from ._validation import as_box_vectors, as_coordinates

__all__ = [
    "FORMATS",
    "trajectory_format",
    "topology_pdb_path",
    "AATrajectoryWriter",
    "existing_steps",
    "last_frame",
    "read_frames",
    "truncate_after",
    "LivePDB",
]

#: File extension → format name.
FORMATS = {".dcd": "dcd", ".xtc": "xtc", ".h5": "h5", ".pdb": "pdb"}

_AKMA_PS = 0.04888821  # the DCD time unit (AKMA) in ps, as openmm.app.DCDFile uses it
_INT32_MAX = 2**31 - 1


def trajectory_format(path: str | os.PathLike) -> str:
    """The format name (``"dcd"``, ``"xtc"``, ``"h5"`` or ``"pdb"``) of a file, from its extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown trajectory format {suffix or '(no extension)'!r} of {path}; "
                         f"use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def topology_pdb_path(path: str | os.PathLike) -> Optional[Path]:
    """The PDB written next to a DCD or XTC trajectory (``traj.dcd`` → ``traj.pdb``); ``None`` for other formats."""
    path = Path(path)
    return path.with_suffix(".pdb") if trajectory_format(path) in ("dcd", "xtc") else None


def _with_box(topology: app.Topology, box_nm: Optional[np.ndarray]) -> app.Topology:
    """``topology``, or a shallow copy of it carrying ``box_nm`` as its periodic box (the caller's is not modified)."""
    if box_nm is None:
        return topology
    top = copy.copy(topology)
    top.setPeriodicBoxVectors(unit.Quantity([Vec3(*(float(x) for x in v)) for v in box_nm], unit.nanometer))
    return top


def _write_pdb_atomic(path: Path, topology: app.Topology, xyz_nm: np.ndarray, box_nm: Optional[np.ndarray]) -> None:
    """Write a one-model PDB to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            app.PDBFile.writeFile(_with_box(topology, box_nm), unit.Quantity(xyz_nm, unit.nanometer), handle)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_frame(xyz: Any, n_atoms: int, box: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    xyz = as_coordinates(xyz, n_atoms, name="AA positions", allow_batch=False)
    if box is not None:
        box = as_box_vectors(box, name="box_vectors_nm", allow_batch=False)
        if not np.isfinite(box).all():
            raise ValueError(f"box_vectors_nm must be finite, got {box.tolist()}")
    return xyz, box


# ----------------------------------------------------------------------------------------------------
# DCD: header parsing (files written by openmm.app.DCDFile: little-endian CHARMM layout)
# ----------------------------------------------------------------------------------------------------


@dataclass
class _DCDHeader:
    n_frames: int  # complete frames on disk (and counted in the header)
    n_header: int  # frame count in the header
    first_step: int
    interval: int
    dt_ps: float
    has_box: bool
    n_atoms: int
    header_size: int
    frame_size: int

    @property
    def steps(self) -> np.ndarray:
        return self.first_step + self.interval * np.arange(self.n_frames, dtype=np.int64)


def _dcd_header(path: Path) -> _DCDHeader:
    with open(path, "rb") as handle:
        head = handle.read(100)
        if len(head) < 100 or struct.unpack("<i", head[:4])[0] != 84 or head[4:8] != b"CORD":
            raise ValueError(f"{path} is not a DCD file written by OpenMM (little-endian CHARMM header expected)")
        n_header, first_step, interval = struct.unpack("<3i", head[8:20])
        dt = struct.unpack("<f", head[44:48])[0] * _AKMA_PS
        has_box = struct.unpack("<i", head[48:52])[0] != 0
        title_bytes = struct.unpack("<i", head[92:96])[0]
        handle.seek(104 + title_bytes)
        n_atoms = struct.unpack("<i", handle.read(4))[0]
    header_size = 112 + title_bytes
    frame_size = (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)
    complete = max(0, (path.stat().st_size - header_size) // frame_size)
    return _DCDHeader(min(n_header, complete), n_header, first_step, max(1, interval), dt, has_box, n_atoms,
                      header_size, frame_size)


def _dcd_frame(path: Path, header: _DCDHeader, index: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Positions (nm, float64) and box vectors (nm) of frame ``index`` of a DCD file."""
    from mdtraj.utils import lengths_and_angles_to_box_vectors

    n = header.n_atoms
    with open(path, "rb") as handle:
        handle.seek(header.header_size + index * header.frame_size)
        box = None
        if header.has_box:
            a, cos_gamma, b, cos_beta, cos_alpha, c = struct.unpack("<6d", handle.read(56)[4:52])
            angles = np.degrees(np.arccos(np.clip([cos_alpha, cos_beta, cos_gamma], -1.0, 1.0)))
            box = np.array(lengths_and_angles_to_box_vectors(a / 10, b / 10, c / 10, *angles), dtype=np.float64)
        xyz = np.empty((3, n), dtype=np.float64)
        for dim in range(3):
            record = np.frombuffer(handle.read(8 + 4 * n), dtype="<f4", offset=4, count=n)
            xyz[dim] = record
    return xyz.T / 10.0, box


def _dcd_set_frame_count(path: Path, header: _DCDHeader, n_frames: int) -> None:
    """Keep the first ``n_frames`` frames: header count first, then the file is cut (a crash in between leaves a
    file whose extra frames are not counted, which readers here ignore)."""
    with open(path, "r+b") as handle:
        handle.seek(8)
        handle.write(struct.pack("<i", n_frames))
        handle.seek(20)
        handle.write(struct.pack("<i", header.first_step + max(0, n_frames - 1) * header.interval))
    os.truncate(path, header.header_size + n_frames * header.frame_size)


# ----------------------------------------------------------------------------------------------------
# XTC: per-frame headers (XDR, big-endian)
# ----------------------------------------------------------------------------------------------------


def _xtc_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Byte offsets, steps, times of every frame, and the atom count (0 for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0
    from mdtraj.formats import XTCTrajectoryFile

    with XTCTrajectoryFile(str(path), "r") as xtc:
        offsets = np.asarray(xtc.offsets, dtype=np.int64)
    steps, times, n_atoms = [], [], 0
    with open(path, "rb") as handle:
        for off in offsets:
            handle.seek(int(off))
            magic, n_atoms, step, time = struct.unpack(">iiif", handle.read(16))
            if magic != 1995:
                raise ValueError(f"{path}: corrupt XTC frame header at byte {off}")
            steps.append(step)
            times.append(time)
    return offsets, np.asarray(steps, dtype=np.int64), np.asarray(times, dtype=np.float64), n_atoms


# ----------------------------------------------------------------------------------------------------
# HDF5 (mdtraj layout)
# ----------------------------------------------------------------------------------------------------


def _h5_topology_json(topology: app.Topology) -> bytes:
    import mdtraj
    from mdtraj.formats import HDF5TrajectoryFile

    top = mdtraj.Topology.from_openmm(topology)
    return json.dumps(HDF5TrajectoryFile.convert_topology_to_dict(top)).encode("ascii")


def _h5_steps(f, path: Path, dt_ps: Optional[float]) -> np.ndarray:
    n = f["coordinates"].shape[0]
    if "step" in f and f["step"].shape[0] == n:
        return f["step"][:].astype(np.int64)
    if "time" not in f:
        raise ValueError(f"{path} stores neither steps nor times")
    if not dt_ps:
        raise ValueError(f"{path} stores no steps: give dt_ps to compute them from the stored times")
    return np.rint(f["time"][:n] / dt_ps).astype(np.int64)


def _open_h5(path: Path, mode: str):
    import h5py

    try:
        return h5py.File(path, mode)
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file ({exc})") from exc


# ----------------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------------


class AATrajectoryWriter:
    """Write AA frames to a DCD, XTC, HDF5 or PDB file, chosen by the extension, flushing every frame.

    Parameters
    ----------
    path
        Output file: ``.dcd``, ``.xtc``, ``.h5`` or ``.pdb``.
    topology
        ``openmm.app.Topology`` of the atoms written.
    append
        Continue an existing file (DCD, XTC, HDF5; not PDB). Its atom count must match, and new frames must
        come after its last step (drop later frames first with :func:`truncate_after`). A missing file is
        created.
    dt_ps
        Integrator time step (ps): stored in the DCD header; default time / step of the first frame.
    first_step
        DCD: step of the first frame (default: the step of the first :meth:`write`).
    interval_steps
        DCD: steps between frames (default: from the first two frames).

    Notes
    -----
    DCD and XTC also get ``<name>.pdb`` with the topology and the first frame (not when appending to an existing
    file). Box vectors given to :meth:`write` are stored as the unit cell of the frame (PDB: the first frame's
    box only, as CRYST1).
    """

    def __init__(self, path: str | os.PathLike, topology: app.Topology, *, append: bool = False,
                 dt_ps: Optional[float] = None, first_step: Optional[int] = None,
                 interval_steps: Optional[int] = None) -> None:
        self.path = Path(path)
        self.format = trajectory_format(self.path)
        if not isinstance(topology, app.Topology):
            raise TypeError(f"topology must be an openmm.app.Topology, got {type(topology).__name__}")
        if dt_ps is not None and not float(dt_ps) > 0:
            raise ValueError(f"dt_ps must be positive, got {dt_ps}")
        if interval_steps is not None and int(interval_steps) < 1:
            raise ValueError(f"interval_steps must be a positive number of steps, got {interval_steps}")
        if append and self.format == "pdb":
            raise ValueError(f"cannot append to the PDB file {self.path}: PDB stores no steps; "
                             "write the backmapped trajectory as .dcd, .xtc or .h5 to continue it after a restart")
        self.topology = topology
        self.n_atoms = topology.getNumAtoms()
        self.dt_ps = float(dt_ps) if dt_ps is not None else None
        self._first_step = int(first_step) if first_step is not None else None
        self._interval = int(interval_steps) if interval_steps is not None else None
        self.n_frames = 0
        self.last_step: Optional[int] = None
        self._has_box: Optional[bool] = None  # fixed by the first frame (or by the existing file)
        self._handle = None  # file object (dcd, xtc, pdb) or h5py.File
        self._dcd = None
        self._dcd_interval = 0
        # DCD frame 0 while the step interval is unknown (settled by the second frame)
        self._dcd_pending: Optional[tuple[np.ndarray, Optional[np.ndarray]]] = None
        self._tmpdir: Optional[str] = None
        self._closed = False
        self.appending = bool(append) and self.path.exists() and self.path.stat().st_size > 0
        if append and not self.path.exists():
            warnings.warn(f"append=True but {self.path} does not exist: starting a new file", stacklevel=2)
        if self.appending:
            getattr(self, f"_open_existing_{self.format}")()  # may find nothing to continue: appending = False
        if not self.appending:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self.path.unlink()  # start afresh
        #: The topology PDB written next to a DCD/XTC file (with the first frame), or ``None``.
        self.topology_pdb = topology_pdb_path(self.path) if not self.appending else None

    # -- opening existing files --------------------------------------------------------------------------
    def _open_existing_dcd(self) -> None:
        header = _dcd_header(self.path)
        if header.n_atoms != self.n_atoms:
            raise ValueError(f"cannot append to {self.path}: it holds {header.n_atoms} atoms, the topology "
                             f"{self.n_atoms}")
        if header.n_frames != header.n_header or header.header_size + header.n_frames * header.frame_size \
                != self.path.stat().st_size:
            warnings.warn(f"{self.path}: dropping an incomplete last frame (crash?)", stacklevel=3)
            _dcd_set_frame_count(self.path, header, header.n_frames)
        if header.n_frames == 0:  # only a header: begin afresh with the real first step and interval
            self.appending = False
            self.path.unlink()
            return
        self._has_box = header.has_box
        self._first_step = header.first_step
        if self.dt_ps is None:
            self.dt_ps = header.dt_ps
        self.n_frames = header.n_frames
        self.last_step = int(header.steps[-1])
        if header.n_frames == 1 and self._interval != header.interval:
            # one frame: its header interval may be a placeholder; settled (file rewritten) at the next write
            self._dcd_pending = _dcd_frame(self.path, header, 0)
            self._open_dcd(self._dcd_pending[1], header.interval, append=True)
            return
        if self._interval is not None and self._interval != header.interval:
            raise ValueError(f"cannot append to {self.path}: it stores a frame every {header.interval} steps, "
                             f"not every {self._interval}")
        self._open_dcd(np.eye(3) if header.has_box else None, header.interval, append=True)

    def _open_existing_xtc(self) -> None:
        offsets, steps, _, n_atoms = _xtc_index(self.path)
        if len(offsets) and n_atoms != self.n_atoms:
            raise ValueError(f"cannot append to {self.path}: it holds {n_atoms} atoms, the topology {self.n_atoms}")
        self.n_frames = len(steps)
        self.last_step = int(steps[-1]) if len(steps) else None
        self._handle = open(self.path, "ab")
        self._tmpdir = tempfile.mkdtemp(prefix="openmm-backmap-xtc-")

    def _open_existing_h5(self) -> None:
        f = _open_h5(self.path, "a")
        try:
            if "coordinates" not in f:
                raise ValueError(f"cannot append to {self.path}: no 'coordinates' dataset (not an mdtraj HDF5 file)")
            shape = f["coordinates"].shape
            if shape[1] != self.n_atoms:
                raise ValueError(f"cannot append to {self.path}: it holds {shape[1]} atoms, "
                                 f"the topology {self.n_atoms}")
            if f["coordinates"].maxshape[0] is not None:
                raise ValueError(f"cannot append to {self.path}: its coordinates dataset cannot grow")
            n = shape[0]
            steps = _h5_steps(f, self.path, self.dt_ps)
            if "step" not in f:
                ds = f.create_dataset("step", shape=(n,), maxshape=(None,), dtype="int64", chunks=(1024,))
                ds[:] = steps
            elif f["step"].shape[0] != n:
                f["step"].resize((n,))
                f["step"][:] = steps
            if "time" not in f:
                raise ValueError(f"cannot append to {self.path}: it stores no times")
            self._has_box = "cell_lengths" in f if n else None
        except Exception:
            f.close()
            raise
        self._handle = f
        self.n_frames = n
        self.last_step = int(steps[-1]) if n else None

    def _open_existing_pdb(self) -> None:  # pragma: no cover - refused in __init__
        raise AssertionError

    # -- creating ----------------------------------------------------------------------------------------
    def _open_dcd(self, box: Optional[np.ndarray], interval: int, *, append: bool) -> None:
        dt = self.dt_ps if self.dt_ps is not None else 0.0
        self._handle = open(self.path, "r+b" if append else "wb")
        self._dcd = app.DCDFile(self._handle, _with_box(self.topology, box), dt * unit.picosecond,
                                self._first_step, interval, append)
        self._dcd_interval = interval

    def _create(self, xyz: np.ndarray, step: int, time_ps: float, box: Optional[np.ndarray]) -> None:
        self._has_box = box is not None
        if self.format == "dcd":
            if self._first_step is None:
                self._first_step = step
            if self.dt_ps is None and step:
                self.dt_ps = time_ps / step
            self._open_dcd(box, self._interval or 1, append=False)
        elif self.format == "xtc":
            self._handle = open(self.path, "wb")
            self._tmpdir = tempfile.mkdtemp(prefix="openmm-backmap-xtc-")
        elif self.format == "h5":
            f = _open_h5(self.path, "w")
            try:
                import mdtraj

                f.attrs["conventions"] = "Pande"
                f.attrs["conventionVersion"] = "1.1"
                f.attrs["program"] = "openmm-backmap"
                f.attrs["programVersion"] = mdtraj.__version__
                f.attrs["title"] = "backmapped trajectory"
                f.attrs["application"] = "openmm-backmap"
                data = _h5_topology_json(self.topology)
                f.create_dataset("topology", data=np.array([data], dtype=f"S{len(data)}"))
                n = self.n_atoms
                chunk = max(1, min(64, (1 << 20) // (12 * n)))
                ds = f.create_dataset("coordinates", shape=(0, n, 3), maxshape=(None, n, 3), dtype="float32",
                                      chunks=(chunk, n, 3))
                ds.attrs["units"] = "nanometers"
                ds = f.create_dataset("time", shape=(0,), maxshape=(None,), dtype="float64", chunks=(1024,))
                ds.attrs["units"] = "picoseconds"
                ds = f.create_dataset("step", shape=(0,), maxshape=(None,), dtype="int64", chunks=(1024,))
                ds.attrs["units"] = "steps"
            except Exception:
                f.close()
                raise
            self._handle = f
        else:  # pdb
            self._handle = open(self.path, "w")
            app.PDBFile.writeHeader(_with_box(self.topology, box), self._handle)
        if self.topology_pdb is not None:
            _write_pdb_atomic(self.topology_pdb, self.topology, xyz, box)

    # -- writing -----------------------------------------------------------------------------------------
    def write(self, xyz_nm: Any, step: int, time_ps: float, box_vectors_nm: Any = None) -> None:
        """Append one frame: positions ``(n_atoms, 3)`` nm, its step, its time (ps), optional box ``(3, 3)`` nm."""
        if self._closed:
            raise ValueError(f"{self.path} was closed")
        xyz, box = _check_frame(xyz_nm, self.n_atoms, box_vectors_nm)
        if unit.is_quantity(time_ps):
            time_ps = time_ps.value_in_unit(unit.picosecond)
        step, time_ps = int(step), float(time_ps)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"{self.path}: frame at step {step} is not after the last stored step {self.last_step}"
                             + (" (drop the later frames first with truncate_after)" if self.appending else ""))
        if self._has_box is not None and (box is not None) != self._has_box:
            have = "box vectors" if self._has_box else "no box"
            raise ValueError(f"{self.path}: the file stores {have} for its frames, this frame "
                             f"{'has' if box is not None else 'has none'}; all frames must agree")
        if self._handle is None:
            self._create(xyz, step, time_ps, box)
        getattr(self, f"_write_{self.format}")(xyz, step, time_ps, box)
        if self.format == "dcd" and self.n_frames == 0 and self._interval is None:
            self._dcd_pending = (xyz, box)  # the header interval is a placeholder until the second frame
        self.n_frames += 1
        self.last_step = step

    def _write_dcd(self, xyz, step, time_ps, box) -> None:
        if self._dcd_pending is not None:  # second frame: the interval is now known
            interval = self._interval if self._interval is not None else step - self._first_step
            if interval != self._dcd_interval:
                first_xyz, first_box = self._dcd_pending
                self._handle.close()
                self._open_dcd(first_box, interval, append=False)
                self._dcd.writeModel(first_xyz, periodicBoxVectors=first_box)
            self._dcd_pending = None
        expected = self._first_step + self.n_frames * self._dcd_interval
        if step != expected:
            raise ValueError(f"{self.path}: DCD stores frames at a fixed step interval (first step "
                             f"{self._first_step}, every {self._dcd_interval} steps): expected step {expected}, "
                             f"got {step}")
        if step > _INT32_MAX:
            raise ValueError(f"{self.path}: step {step} does not fit the DCD header (32-bit)")
        self._dcd.writeModel(xyz, periodicBoxVectors=box)

    def _write_xtc(self, xyz, step, time_ps, box) -> None:
        from mdtraj.formats import XTCTrajectoryFile

        if step > _INT32_MAX:
            raise ValueError(f"{self.path}: step {step} does not fit an XTC frame header (32-bit)")
        tmp = os.path.join(self._tmpdir, "frame.xtc")
        with XTCTrajectoryFile(tmp, "w") as xtc:  # one self-contained XTC frame, appended byte for byte
            xtc.write(xyz[None].astype(np.float32), time=np.array([time_ps], dtype=np.float32),
                      step=np.array([step], dtype=np.int32),
                      box=None if box is None else box[None].astype(np.float32))
        with open(tmp, "rb") as frame:
            self._handle.write(frame.read())
        self._handle.flush()

    def _write_h5(self, xyz, step, time_ps, box) -> None:
        from mdtraj.utils import box_vectors_to_lengths_and_angles

        f, n = self._handle, self.n_frames
        if box is not None and "cell_lengths" not in f:  # an appended file that had no frames yet
            for name, units in (("cell_lengths", "nanometers"), ("cell_angles", "degrees")):
                f.create_dataset(name, shape=(0, 3), maxshape=(None, 3), dtype="float32", chunks=(1024, 3))
                f[name].attrs["units"] = units
        rows = {"coordinates": xyz.astype(np.float32), "time": time_ps}
        if box is not None:
            a, b, c, alpha, beta, gamma = box_vectors_to_lengths_and_angles(box[0], box[1], box[2])
            rows["cell_lengths"] = (a, b, c)
            rows["cell_angles"] = (alpha, beta, gamma)
        rows["step"] = step  # last: a frame counts once its step is on disk
        for name, value in rows.items():
            ds = f[name]
            ds.resize((n + 1,) + ds.shape[1:])
            ds[n] = value
        f.flush()

    def _write_pdb(self, xyz, step, time_ps, box) -> None:
        app.PDBFile.writeModel(self.topology, unit.Quantity(xyz, unit.nanometer), self._handle,
                               modelIndex=self.n_frames + 1)
        self._handle.flush()

    # -- closing -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Finish the file (PDB: END record) and release it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._handle is not None:
                if self.format == "pdb":
                    app.PDBFile.writeFooter(self.topology, self._handle)
                self._handle.close()
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> "AATrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"AATrajectoryWriter({str(self.path)!r}, format={self.format!r}, n_frames={self.n_frames})"


# ----------------------------------------------------------------------------------------------------
# Reading and truncating
# ----------------------------------------------------------------------------------------------------


def _existing(path: str | os.PathLike) -> tuple[Path, str]:
    path = Path(path)
    fmt = trajectory_format(path)
    if not path.exists():
        raise FileNotFoundError(f"no such trajectory file: {path}")
    return path, fmt


def _check_atoms(path: Path, n_file: int, topology: Optional[app.Topology]) -> None:
    if topology is not None and n_file != topology.getNumAtoms():
        raise ValueError(f"{path} holds {n_file} atoms but the topology has {topology.getNumAtoms()}")


def existing_steps(path: str | os.PathLike, dt_ps: Optional[float] = None) -> np.ndarray:
    """Steps (int64) of the frames already in a trajectory file.

    DCD: first step + k × interval from the header (complete frames only); XTC: the steps stored per frame;
    HDF5: the ``step`` dataset, or ``round(time / dt_ps)`` for files without one. PDB files store no steps
    (``ValueError``).
    """
    path, fmt = _existing(path)
    if fmt == "dcd":
        return _dcd_header(path).steps
    if fmt == "xtc":
        return _xtc_index(path)[1]
    if fmt == "h5":
        with _open_h5(path, "r") as f:
            return _h5_steps(f, path, dt_ps)
    raise ValueError(f"{path}: PDB files store no steps; use .dcd, .xtc or .h5")


def read_frames(path: str | os.PathLike, topology: Optional[app.Topology] = None,
                dt_ps: Optional[float] = None) -> dict[str, Any]:
    """All frames of a trajectory file written here (handy for ``.h5`` without PyTables).

    Returns a dict with ``xyz`` ``(n_frames, n_atoms, 3)`` nm, ``step`` (``None`` for PDB), ``time`` ps (DCD:
    step × the header's time step; ``None`` for PDB) and ``box`` ``(n_frames, 3, 3)`` nm or ``None``.
    """
    path, fmt = _existing(path)
    if fmt == "dcd":
        header = _dcd_header(path)
        _check_atoms(path, header.n_atoms, topology)
        frames = [_dcd_frame(path, header, k) for k in range(header.n_frames)]
        xyz = np.array([f[0] for f in frames]).reshape(-1, header.n_atoms, 3)
        box = np.array([f[1] for f in frames]) if header.has_box else None
        return {"xyz": xyz, "step": header.steps, "time": header.steps * header.dt_ps, "box": box}
    if fmt == "xtc":
        from mdtraj.formats import XTCTrajectoryFile

        _, steps, _, n_atoms = _xtc_index(path)
        if not len(steps):
            n = topology.getNumAtoms() if topology is not None else 0
            return {"xyz": np.zeros((0, n, 3)), "step": steps, "time": np.zeros(0), "box": None}
        _check_atoms(path, n_atoms, topology)
        with XTCTrajectoryFile(str(path), "r") as xtc:
            xyz, time, step, box = xtc.read()
        has_box = box is not None and np.abs(box).sum() > 0
        return {"xyz": xyz.astype(np.float64), "step": step.astype(np.int64), "time": time.astype(np.float64),
                "box": box.astype(np.float64) if has_box else None}
    if fmt == "h5":
        from mdtraj.utils import lengths_and_angles_to_box_vectors

        with _open_h5(path, "r") as f:
            xyz = f["coordinates"][:].astype(np.float64)
            _check_atoms(path, xyz.shape[1], topology)
            steps = _h5_steps(f, path, dt_ps) if ("step" in f or dt_ps) else None
            time = f["time"][: len(xyz)].astype(np.float64) if "time" in f else None
            box = None
            if "cell_lengths" in f:
                lengths, angles = f["cell_lengths"][: len(xyz)], f["cell_angles"][: len(xyz)]
                box = np.stack(lengths_and_angles_to_box_vectors(*lengths.T.astype(np.float64),
                                                                 *angles.T.astype(np.float64)), axis=1)
        return {"xyz": xyz, "step": steps, "time": time, "box": box}
    pdb = app.PDBFile(str(path))
    _check_atoms(path, pdb.topology.getNumAtoms(), topology)
    xyz = np.array([pdb.getPositions(asNumpy=True, frame=k).value_in_unit(unit.nanometer)
                    for k in range(pdb.getNumFrames())])
    vectors = pdb.topology.getPeriodicBoxVectors()
    box = None if vectors is None else np.broadcast_to(vectors.value_in_unit(unit.nanometer), (len(xyz), 3, 3))
    return {"xyz": xyz, "step": None, "time": None, "box": box}


def last_frame(path: str | os.PathLike, topology: Optional[app.Topology] = None) -> np.ndarray:
    """Positions (nm, ``(n_atoms, 3)`` float64) of the last frame stored in a trajectory file.

    ``topology``, if given, must have the file's atom count (checked).
    """
    path, fmt = _existing(path)
    if fmt == "dcd":
        header = _dcd_header(path)
        _check_atoms(path, header.n_atoms, topology)
        if header.n_frames == 0:
            raise ValueError(f"{path} holds no frames")
        return _dcd_frame(path, header, header.n_frames - 1)[0]
    if fmt == "xtc":
        from mdtraj.formats import XTCTrajectoryFile

        offsets, _, _, n_atoms = _xtc_index(path)
        if not len(offsets):
            raise ValueError(f"{path} holds no frames")
        _check_atoms(path, n_atoms, topology)
        with XTCTrajectoryFile(str(path), "r") as xtc:
            xtc.seek(len(offsets) - 1)
            return xtc.read(1)[0][0].astype(np.float64)
    if fmt == "h5":
        with _open_h5(path, "r") as f:
            coords = f["coordinates"]
            _check_atoms(path, coords.shape[1], topology)
            if coords.shape[0] == 0:
                raise ValueError(f"{path} holds no frames")
            return coords[coords.shape[0] - 1].astype(np.float64)
    pdb = app.PDBFile(str(path))
    _check_atoms(path, pdb.topology.getNumAtoms(), topology)
    return pdb.getPositions(asNumpy=True, frame=pdb.getNumFrames() - 1).value_in_unit(unit.nanometer)


def truncate_after(path: str | os.PathLike, topology: Optional[app.Topology], step: int,
                   dt_ps: Optional[float] = None) -> int:
    """Drop, in place, the frames of a DCD, XTC or HDF5 file whose step is after ``step``; returns the number of
    frames kept.

    Used when a run restarts from a checkpoint older than the last frame written. Steps must increase along the
    file (as written by :class:`AATrajectoryWriter`). ``topology``, if given, must match the file's atom count.
    """
    path, fmt = _existing(path)
    step = int(step)
    if fmt == "pdb":
        raise ValueError(f"cannot truncate the PDB file {path}: PDB stores no steps; use .dcd, .xtc or .h5")
    if fmt == "dcd":
        header = _dcd_header(path)
        _check_atoms(path, header.n_atoms, topology)
        keep = int(np.searchsorted(header.steps, step, side="right"))
        if keep < header.n_frames or header.n_header != header.n_frames:
            _dcd_set_frame_count(path, header, keep)
        return keep
    if fmt == "xtc":
        offsets, steps, _, n_atoms = _xtc_index(path)
        if len(steps):
            _check_atoms(path, n_atoms, topology)
        keep = int(np.searchsorted(steps, step, side="right"))
        if keep < len(steps):
            os.truncate(path, int(offsets[keep]))
        return keep
    with _open_h5(path, "a") as f:
        n = f["coordinates"].shape[0]
        _check_atoms(path, f["coordinates"].shape[1], topology)
        keep = int(np.searchsorted(_h5_steps(f, path, dt_ps), step, side="right"))
        if keep < n:
            for name in list(f):  # every per-frame dataset (mdtraj's velocities, energies, ... too)
                ds = f[name]
                if getattr(ds, "maxshape", None) and ds.maxshape[0] is None and ds.shape[0] == n:
                    ds.resize((keep,) + ds.shape[1:])
        return keep


# ----------------------------------------------------------------------------------------------------
# Live view
# ----------------------------------------------------------------------------------------------------


class LivePDB:
    """A PDB file that always holds the latest frame, replaced atomically so a viewer never reads half a file.

    Parameters
    ----------
    path
        The PDB file.
    topology
        ``openmm.app.Topology`` of the atoms.
    """

    def __init__(self, path: str | os.PathLike, topology: app.Topology) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".pdb":
            raise ValueError(f"LivePDB writes PDB files; {self.path} does not end in .pdb")
        self.topology = topology
        self.n_atoms = topology.getNumAtoms()
        self.n_updates = 0

    def update(self, xyz_nm: Any, box: Any = None) -> None:
        """Replace the file's content with this frame (positions nm, optional box vectors nm as CRYST1)."""
        xyz, box = _check_frame(xyz_nm, self.n_atoms, box)
        _write_pdb_atomic(self.path, self.topology, xyz, box)
        self.n_updates += 1
