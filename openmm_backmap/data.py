"""Reference trajectories with forces, stored in HDF5.

One file holds one trajectory: per frame the positions (nm), forces (kJ/mol/nm), velocities (nm/ps),
potential energy (kJ/mol), box vectors (nm), time (ps) and step; and once, the topology, the
serialized ``openmm.System``, the run settings and the package versions.

Layout (``format = "openmm-backmap-trajectory"``, ``format_version = 1``)::

    /                attrs: format, format_version, kind ("aa" or "cg"), n_atoms, created,
                     package_versions (JSON), settings (JSON: temperature_K, timestep_ps, ...),
                     topology_fingerprint
    /topology        JSON string (see openmm_backmap._topology)
    /system          XML of the openmm.System (optional)
    /step            (n_frames,) int64          <- written last for every frame: defines n_frames
    /time            (n_frames,) float64, ps
    /positions       (n_frames, n_atoms, 3), nm
    /forces          (n_frames, n_atoms, 3), kJ/mol/nm   (optional)
    /velocities      (n_frames, n_atoms, 3), nm/ps       (optional)
    /potential_energy (n_frames,) float64, kJ/mol        (optional)
    /box_vectors     (n_frames, 3, 3), nm                 (periodic systems only)

Files are written in HDF5 single-writer/multiple-reader (SWMR) mode and flushed after every frame, so a
crash loses at most the frame in flight and the file can be read while a run is still writing it.
Positions are stored unwrapped (as OpenMM integrates them), so molecules stay whole and frame-to-frame
displacements are physical.
"""
from __future__ import annotations

import datetime
import json
import os
import platform as _platform
import sys
import warnings
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ._physics import openmm_seed
from ._topology import topology_fingerprint, topology_from_json, topology_to_json
from ._validation import as_box_vectors, as_coordinates, check_finite
from .platforms import choose_platform

FORMAT = "openmm-backmap-trajectory"
FORMAT_VERSION = 1

_AVOGADRO = 6.02214076e23  # 1/mol

_FRAME_FIELDS = ("positions", "forces", "velocities")
_UNITS = {
    "positions": "nm",
    "forces": "kJ/mol/nm",
    "velocities": "nm/ps",
    "potential_energy": "kJ/mol",
    "box_vectors": "nm",
    "time": "ps",
    "step": "1",
}

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TrajectoryWriter",
    "AADataReporter",
    "simulate_reference",
    "TrajectoryDataset",
    "AADataset",
    "CGDataset",
    "block_split",
    "package_versions",
]


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers in a file (read without importing them)."""
    out = {"python": sys.version.split()[0]}
    for dist in ("openmm-backmap", "openmm", "openmmtorch", "torch", "numpy", "h5py", "mdtraj"):
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            pass
    return out


def _q(value: Any, target: unit.Unit) -> float:
    """Plain float in ``target`` units from a number or an OpenMM Quantity."""
    if isinstance(value, unit.Quantity):
        return float(value.value_in_unit(target))
    return float(value)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


class TrajectoryWriter:
    """Append frames to an HDF5 trajectory file, flushing after each one.

    Parameters
    ----------
    path
        Output file (``.h5``).
    topology
        Topology of the particles stored (AA atoms or CG beads).
    append
        Continue an existing file instead of creating a new one.  The file's topology must match; a
        partly written last frame (from a crash) is discarded.
    fields
        Per-frame arrays to store, a subset of ``("positions", "forces", "velocities")``; positions are
        always stored.  Potential energy, time, step and (for periodic topologies) box vectors are always
        stored.
    dtype
        Storage precision of the per-frame arrays: ``"float32"`` (default, like DCD/XTC) or ``"float64"``.
    kind
        ``"aa"`` or ``"cg"``: what the particles are.
    system
        Optional ``openmm.System`` stored as XML (the force field description).
    settings
        JSON-serialisable run settings (temperature, time step, force field files, ...).
    extra
        Additional string datasets stored once (e.g. ``{"mapping": yaml_text}``).
    restart_step
        With ``append``: the step the run restarts from.  Stored frames after it belong to an abandoned
        continuation (a restart from an older checkpoint) and are dropped with a warning, so the file holds
        one continuous trajectory without duplicated steps.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        topology: app.Topology,
        *,
        append: bool = False,
        fields: Sequence[str] = _FRAME_FIELDS,
        dtype: str = "float32",
        kind: str = "aa",
        system: openmm.System | None = None,
        settings: dict[str, Any] | None = None,
        extra: dict[str, str] | None = None,
        restart_step: int | None = None,
    ) -> None:
        unknown = set(fields) - set(_FRAME_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; choose from {_FRAME_FIELDS}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
        if kind not in ("aa", "cg"):
            raise ValueError(f"kind must be 'aa' or 'cg', not {kind!r}")
        self.path = Path(path)
        self.n_atoms = topology.getNumAtoms()
        self.periodic = topology.getPeriodicBoxVectors() is not None
        self._fingerprint = topology_fingerprint(topology)
        if append and self.path.exists():
            self._file = self._open_existing(kind, restart_step)
        else:
            if append:
                warnings.warn(f"append=True but {self.path} does not exist: starting a new file", stacklevel=2)
            fields = tuple(dict.fromkeys(("positions", *fields)))
            self._file = self._create(topology, fields, dtype, kind, system, settings or {}, extra or {})
        self.fields = tuple(f for f in _FRAME_FIELDS if f in self._file)
        # Hot path state: low-level dataset ids, frame count and last step kept in memory.
        names = (*self.fields, "potential_energy", "time") + (("box_vectors",) if self.periodic else ()) + ("step",)
        self._ids = {name: self._file[name].id for name in names}
        self._n = int(self._file["step"].shape[0])
        self._last_step = int(self._file["step"][self._n - 1]) if self._n else None
        self._file.swmr_mode = True

    # -- file set-up ---------------------------------------------------------------------------------
    def _create(self, topology, fields, dtype, kind, system, settings, extra) -> h5py.File:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w", libver="latest")
        try:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["kind"] = kind
            f.attrs["n_atoms"] = self.n_atoms
            f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            f.attrs["package_versions"] = json.dumps(package_versions())
            f.attrs["machine"] = json.dumps(
                {"processor": _platform.processor() or _platform.machine(), "cpu_count": os.cpu_count()}
            )
            f.attrs["settings"] = json.dumps(settings)
            f.attrs["topology_fingerprint"] = self._fingerprint
            str_dt = h5py.string_dtype()
            f.create_dataset("topology", data=topology_to_json(topology), dtype=str_dt)
            if system is not None:
                f.create_dataset("system", data=openmm.XmlSerializer.serialize(system), dtype=str_dt)
            for key, text in extra.items():
                f.create_dataset(key, data=text, dtype=str_dt)
            n = self.n_atoms
            chunk_frames = max(1, min(64, (1 << 20) // max(1, n * 3 * np.dtype(dtype).itemsize)))
            for name in fields:
                ds = f.create_dataset(
                    name, shape=(0, n, 3), maxshape=(None, n, 3), dtype=dtype, chunks=(chunk_frames, n, 3)
                )
                ds.attrs["units"] = _UNITS[name]
            scalars = {"potential_energy": "float64", "time": "float64", "step": "int64"}
            for name, dt in scalars.items():
                ds = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
                ds.attrs["units"] = _UNITS[name]
            if self.periodic:
                ds = f.create_dataset(
                    "box_vectors", shape=(0, 3, 3), maxshape=(None, 3, 3), dtype="float64", chunks=(256, 3, 3)
                )
                ds.attrs["units"] = _UNITS["box_vectors"]
        except Exception:
            f.close()
            self.path.unlink(missing_ok=True)
            raise
        return f

    def _open_existing(self, kind: str, restart_step: int | None) -> h5py.File:
        _check_header(self.path)  # raises on foreign/corrupt files before anything is modified
        try:
            f = h5py.File(self.path, "a", libver="latest")
        except OSError as exc:
            if "already open for write" not in str(exc):
                raise
            _recover_after_crash(self.path)  # a writer died without closing: clear the SWMR-write flag
            f = h5py.File(self.path, "a", libver="latest")
        try:
            if f.attrs["topology_fingerprint"] != self._fingerprint or int(f.attrs["n_atoms"]) != self.n_atoms:
                raise ValueError(
                    f"cannot append to {self.path}: it holds a trajectory of a different topology "
                    f"({int(f.attrs['n_atoms'])} particles)"
                )
            if f.attrs["kind"] != kind:
                raise ValueError(f"cannot append {kind!r} frames to {self.path}, which holds {f.attrs['kind']!r} data")
            n = f["step"].shape[0]  # frames whose step was written are complete
            if restart_step is not None and n and f["step"][n - 1] > restart_step:
                keep = int(np.searchsorted(f["step"][:n], restart_step, side="right"))
                warnings.warn(
                    f"{self.path}: the run restarts at step {restart_step}; dropping {n - keep} stored "
                    f"frame(s) after that step",
                    stacklevel=4,
                )
                n = keep
            for name in (*_FRAME_FIELDS, "potential_energy", "time", "box_vectors", "step"):
                if name in f and f[name].shape[0] != n:
                    f[name].resize(n, axis=0)
        except Exception:
            f.close()
            raise
        return f

    # -- frames --------------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return self._n

    @property
    def last_step(self) -> int | None:
        return self._last_step

    def append(
        self,
        *,
        step: int,
        time_ps: float,
        positions: np.ndarray,
        forces: np.ndarray | None = None,
        velocities: np.ndarray | None = None,
        potential_energy: float = np.nan,
        box_vectors: np.ndarray | None = None,
    ) -> None:
        """Write one frame and flush it to disk.

        Arrays are in nm, kJ/mol/nm and nm/ps; ``potential_energy`` in kJ/mol; ``box_vectors`` (3, 3) in nm,
        required for periodic topologies.
        """
        self.append_frames(
            step=[step],
            time_ps=[time_ps],
            positions=np.asarray(positions)[None],
            forces=None if forces is None else np.asarray(forces)[None],
            velocities=None if velocities is None else np.asarray(velocities)[None],
            potential_energy=[potential_energy],
            box_vectors=None if box_vectors is None else np.asarray(box_vectors)[None],
        )

    def append_frames(
        self,
        *,
        step: Sequence[int],
        time_ps: Sequence[float],
        positions: np.ndarray,
        forces: np.ndarray | None = None,
        velocities: np.ndarray | None = None,
        potential_energy: Sequence[float] | None = None,
        box_vectors: np.ndarray | None = None,
    ) -> None:
        """Write a block of ``k`` frames (arrays with a leading frame axis) and flush once.

        Everything is validated before anything is written, so a bad block leaves the file unchanged.
        """
        step = np.asarray(step, dtype=np.int64).reshape(-1)
        k = step.size
        data = {"positions": positions, "forces": forces, "velocities": velocities}
        for name in self.fields:
            if data[name] is None:
                raise ValueError(f"this file stores {name!r} but none were given for step {int(step[0])}")
            arr = as_coordinates(data[name], self.n_atoms, name=name)
            if arr.ndim != 3 or arr.shape[0] != k:
                raise ValueError(f"{name} must have shape ({k}, {self.n_atoms}, 3); got {arr.shape}")
            data[name] = arr
        scalars = {
            "time": np.asarray(time_ps, dtype=np.float64).reshape(-1),
            "potential_energy": (np.full(k, np.nan) if potential_energy is None
                                 else np.asarray(potential_energy, dtype=np.float64).reshape(-1)),
        }
        for name, arr in scalars.items():
            if arr.size != k:
                raise ValueError(f"{name} has {arr.size} values for {k} frames")
        if self.periodic:
            if box_vectors is None:
                raise ValueError("box_vectors are required for a periodic topology")
            box_vectors = as_box_vectors(box_vectors).reshape(k, 3, 3)
        last = self._last_step
        if last is not None and step[0] <= last or np.any(np.diff(step) <= 0):
            raise ValueError(f"steps must increase: got {step[:3].tolist()}... after stored step {last}")
        blocks = {**{name: data[name] for name in self.fields}, **scalars, "step": step}
        if self.periodic:
            blocks["box_vectors"] = box_vectors
        n = self._n
        for name, dsid in self._ids.items():  # "step" comes last: a frame counts once its step is on disk
            _append_block(dsid, n, blocks[name])
        self._file.flush()
        self._n = n + k
        self._last_step = int(step[-1])

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _append_block(dsid: h5py.h5d.DatasetID, start: int, block: np.ndarray) -> None:
    """Grow a chunked dataset to ``start + len(block)`` rows and write ``block`` there.

    h5py's low-level calls: ~10x cheaper than ``ds.resize(...); ds[i] = x`` for the small frames of a
    reporter, where this runs once per frame and per dataset.
    """
    block = np.ascontiguousarray(block)
    shape = block.shape
    dsid.set_extent((start + shape[0],) + shape[1:])
    file_space = dsid.get_space()
    file_space.select_hyperslab((start,) + (0,) * (len(shape) - 1), shape)
    dsid.write(h5py.h5s.create_simple(shape), file_space, block)


class AADataReporter:
    """OpenMM reporter that stores positions, forces, velocities and energies to an HDF5 trajectory.

    Use it like ``DCDReporter``::

        simulation.reporters.append(AADataReporter("ref.h5", 100))

    Parameters
    ----------
    file
        Output HDF5 file.
    reportInterval
        Interval (in time steps) at which to write frames.
    append
        Continue an existing file (e.g. after restarting from a checkpoint).  Frames already stored at or
        after the step the run restarts from belong to the abandoned continuation and are dropped (with a
        warning), so the file holds one continuous trajectory with no duplicated steps.
    fields
        Which of positions, forces, velocities to store (positions always).
    dtype
        ``"float32"`` (default) or ``"float64"``.
    settings
        Extra JSON-serialisable metadata to store (force field files, solvent, ...).  Temperature, time
        step and friction are read from the integrator when it has them.

    Notes
    -----
    Forces are those of the integrator's force groups (``integrator.getIntegrationForceGroups()``):
    all forces for the usual integrators.  They are the unconstrained forces (no constraint forces).
    """

    def __init__(
        self,
        file: str | os.PathLike,
        reportInterval: int,
        *,
        append: bool = False,
        fields: Sequence[str] = _FRAME_FIELDS,
        dtype: str = "float32",
        settings: dict[str, Any] | None = None,
    ) -> None:
        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be a positive number of steps, not {reportInterval}")
        self._path = Path(file)
        self._interval = int(reportInterval)
        self._append = append
        self._fields = tuple(fields)
        self._dtype = dtype
        self._settings = dict(settings or {})
        self._writer: TrajectoryWriter | None = None
        self._groups: int | None = None
        self._start_step: int | None = None

    # -- OpenMM reporter protocol ---------------------------------------------------------------------
    def describeNextReport(self, simulation: app.Simulation) -> dict[str, Any]:
        if self._start_step is None:
            self._start_step = simulation.currentStep  # where this run (re)starts, before any stepping
        steps = self._interval - simulation.currentStep % self._interval
        include = ["positions", "energy"]
        if "velocities" in self._fields:
            include.append("velocities")
        if "forces" in self._fields and self._groups is None:
            include.append("forces")
        return {"steps": steps, "periodic": False, "include": include}

    def report(self, simulation: app.Simulation, state: openmm.State) -> None:
        if self._writer is None:
            self._initialize(simulation)
        writer = self._writer
        step = simulation.currentStep
        if writer.last_step is not None and step <= writer.last_step:
            return  # already stored (re-reported after a restart)
        forces = None
        energy = state.getPotentialEnergy()
        if "forces" in writer.fields:
            if self._groups is not None:  # multiple time step integrators: forces of the integrated groups
                s = simulation.context.getState(getForces=True, getEnergy=True, groups=self._groups)
                forces, energy = s.getForces(asNumpy=True), s.getPotentialEnergy()
            else:
                forces = state.getForces(asNumpy=True)
            forces = forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) if writer.periodic else None
        writer.append(
            step=step,
            time_ps=state.getTime().value_in_unit(unit.picosecond),
            positions=state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
            forces=forces,
            velocities=(
                state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
                if "velocities" in writer.fields
                else None
            ),
            potential_energy=energy.value_in_unit(unit.kilojoule_per_mole),
            box_vectors=box,
        )

    # -- helpers -----------------------------------------------------------------------------------
    def _initialize(self, simulation: app.Simulation) -> None:
        integrator = simulation.integrator
        settings = dict(self._settings)
        settings.setdefault("report_interval", self._interval)
        settings.setdefault("integrator", type(integrator).__name__)
        settings.setdefault("timestep_ps", _q(integrator.getStepSize(), unit.picosecond))
        if hasattr(integrator, "getTemperature"):
            settings.setdefault("temperature_K", _q(integrator.getTemperature(), unit.kelvin))
        if hasattr(integrator, "getFriction"):
            settings.setdefault("friction_per_ps", _q(integrator.getFriction(), unit.picosecond**-1))
        settings.setdefault("platform", simulation.context.getPlatform().getName())
        all_groups = {f.getForceGroup() for f in simulation.system.getForces()}
        integration_groups = integrator.getIntegrationForceGroups()
        if any(not (integration_groups >> g) & 1 for g in all_groups):
            self._groups = integration_groups
        self._writer = TrajectoryWriter(
            self._path,
            simulation.topology,
            append=self._append,
            fields=self._fields,
            dtype=self._dtype,
            kind="aa",
            system=simulation.system,
            settings=settings,
            restart_step=self._start_step if self._start_step is not None else simulation.currentStep,
        )

    @property
    def writer(self) -> TrajectoryWriter | None:
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def simulate_reference(
    path: str | os.PathLike,
    topology: app.Topology,
    system: openmm.System,
    positions: Any,
    *,
    n_steps: int,
    report_interval: int = 100,
    temperature_K: float = 300.0,
    timestep_ps: float = 0.002,
    friction_per_ps: float = 1.0,
    equilibration_steps: int = 0,
    minimize: bool = True,
    append: bool = False,
    seed: int = 0,
    platform: str | openmm.Platform | None = None,
    dtype: str = "float32",
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    pressure_bar: float | None = None,
    barostat_interval: int = 25,
) -> Path:
    """Run Langevin dynamics and store frames with forces every ``report_interval`` steps.

    Parameters
    ----------
    path
        Output HDF5 file.
    topology, system, positions
        What to simulate (``positions`` in nm, array or Quantity), e.g. from :mod:`openmm_backmap.systems`.
    n_steps
        Length of the production run in steps (frames are written at steps ``report_interval``,
        ``2 * report_interval``, ... ``n_steps``).  With ``append=True`` the run continues from the last
        stored frame until the file covers ``n_steps`` (so re-running the same call after a crash finishes
        the job, and a larger ``n_steps`` extends it).
    report_interval
        Steps between stored frames.
    temperature_K, timestep_ps, friction_per_ps
        LangevinMiddleIntegrator settings (K, ps, 1/ps).
    equilibration_steps
        Unstored steps after minimization (fresh runs only).  NPT with ``pressure_bar``, else NVT.
    minimize
        Energy-minimize before equilibration (fresh runs only).
    append
        Continue an existing file: positions, velocities, box and time are taken from its last frame.
    seed
        Seed for velocities and the integrator's random numbers.
    platform
        OpenMM platform name or object; default from :func:`openmm_backmap.platforms.choose_platform`.
    dtype
        Storage precision, ``"float32"`` or ``"float64"``.
    settings
        Extra metadata stored with the run (e.g. force field files and solvent).
    progress
        Show a progress bar.
    pressure_bar
        Equilibrate at this pressure (bar) before an NVT production run (periodic systems, fresh runs,
        ``equilibration_steps > 0``): the equilibration runs with an ``openmm.MonteCarloBarostat``
        (attempting a volume move every ``barostat_interval`` steps) on a copy of ``system``; the box of
        the production run is the mean box of the second half of the equilibration, to which the molecule
        centres are scaled (molecules kept rigid) before a short minimization.  ``system`` itself and the
        System stored in the file stay without a barostat (NVT).  The settings record ``pressure_bar``,
        ``npt_density_g_cm3`` (mean over the second half), ``npt_density_std_g_cm3``,
        ``npt_box_samples`` and ``production_box_nm`` (the 3x3 box of the production run).  Ignored
        when ``append`` continues an existing file.
    barostat_interval
        Steps between Monte Carlo volume moves with ``pressure_bar``.

    Returns
    -------
    Path
        The output file.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    for name, value in (("n_steps", n_steps), ("report_interval", report_interval)):
        if int(value) < 1:
            raise ValueError(f"{name} must be a positive number of steps, not {value}")
    if n_steps % report_interval:
        raise ValueError(f"n_steps ({n_steps}) must be a multiple of report_interval ({report_interval})")
    if topology.getNumAtoms() != system.getNumParticles():
        raise ValueError(
            f"topology has {topology.getNumAtoms()} atoms but the system has {system.getNumParticles()} particles"
        )
    positions = as_coordinates(positions, system.getNumParticles(), name="positions", allow_batch=False)
    for name, value in (("temperature_K", temperature_K), ("timestep_ps", timestep_ps)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value}")
    if pressure_bar is not None:
        if not system.usesPeriodicBoundaryConditions() or topology.getPeriodicBoxVectors() is None:
            raise ValueError("pressure_bar needs a periodic system (with box vectors in the topology); "
                             "this one is not periodic, so there is no volume to equilibrate")
        if int(equilibration_steps) <= 0:
            raise ValueError("pressure_bar sets the pressure of the equilibration: pass equilibration_steps > 0")
        if isinstance(pressure_bar, bool) or not np.isfinite(float(pressure_bar)):
            raise ValueError(f"pressure_bar must be a finite number of bar, not {pressure_bar!r}")
        if int(barostat_interval) < 1:
            raise ValueError(f"barostat_interval must be a positive number of steps, not {barostat_interval}")
        if any(isinstance(f, _BAROSTATS) for f in system.getForces()):
            raise ValueError("the system already has a barostat; pass an NVT system with pressure_bar "
                             "(the barostat is added for the equilibration only)")

    integrator = openmm.LangevinMiddleIntegrator(
        temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_ps * unit.picosecond
    )
    integrator.setRandomNumberSeed(openmm_seed(seed))
    simulation = app.Simulation(topology, system, integrator, choose_platform(system, platform))

    run_settings = {"seed": seed, "equilibration_steps": equilibration_steps, **(settings or {})}
    if pressure_bar is not None:
        run_settings.update(pressure_bar=float(pressure_bar), barostat_interval=int(barostat_interval),
                            equilibration_ensemble="NPT")
    resume = append and path.exists()
    if resume:
        with AADataset(path) as existing:
            if existing.topology_fingerprint != topology_fingerprint(topology):
                raise ValueError(f"cannot append to {path}: it holds a trajectory of a different topology")
            stored = existing.settings
            for key, value in (("temperature_K", temperature_K), ("timestep_ps", timestep_ps),
                               ("report_interval", report_interval)):
                if key in stored and not np.isclose(stored[key], value):
                    raise ValueError(f"cannot append to {path}: it was run with {key}={stored[key]}, not {value}")
            if existing.n_frames == 0:
                resume = False
            else:
                last = existing.frame(existing.n_frames - 1)
                if int(last["step"]) >= n_steps:  # already run that far: leave the file alone (not even opened
                    return path                    # for writing, so readers of a finished run are never disturbed)
                if "velocities" not in last:
                    raise ValueError(f"cannot continue {path}: it stores no velocities")
    if resume:
        simulation.currentStep = int(last["step"])
        simulation.context.setTime(float(last["time"]) * unit.picosecond)
        if "box_vectors" in last:
            simulation.context.setPeriodicBoxVectors(*last["box_vectors"])
        simulation.context.setPositions(last["positions"].astype(np.float64))
        simulation.context.setVelocities(last["velocities"].astype(np.float64))
        simulation.context.applyConstraints(1e-8)
    else:
        box = topology.getPeriodicBoxVectors()
        if box is not None:
            simulation.context.setPeriodicBoxVectors(*box)
        simulation.context.setPositions(positions)
        if minimize:
            simulation.minimizeEnergy()
        simulation.context.setVelocitiesToTemperature(temperature_K * unit.kelvin, openmm_seed(seed))
        if equilibration_steps and pressure_bar is not None:
            run_settings.update(_equilibrate_npt(
                simulation, n_steps=int(equilibration_steps), pressure_bar=float(pressure_bar),
                temperature_K=temperature_K, timestep_ps=timestep_ps, friction_per_ps=friction_per_ps,
                barostat_interval=int(barostat_interval), seed=seed, progress=progress, label=path.name,
            ))
        elif equilibration_steps:
            simulation.step(equilibration_steps)
        simulation.currentStep = 0
        simulation.context.setTime(0.0)
        energy = simulation.context.getState(getEnergy=True).getPotentialEnergy()
        check_finite(np.array([energy.value_in_unit(unit.kilojoule_per_mole)]), name="energy after equilibration")

    reporter = AADataReporter(path, report_interval, append=resume, dtype=dtype, settings=run_settings)
    simulation.reporters.append(reporter)
    remaining = n_steps - simulation.currentStep
    try:
        with tqdm(total=n_steps, initial=simulation.currentStep, unit="step", disable=not progress,
                  desc=f"reference MD -> {path.name}") as bar:
            while remaining > 0:
                chunk = min(remaining, max(report_interval, 10 * report_interval))
                simulation.step(chunk)
                state = simulation.context.getState(getEnergy=True)
                e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if not np.isfinite(e):
                    raise RuntimeError(
                        f"reference simulation blew up (energy {e}) before step {simulation.currentStep}; "
                        f"frames up to the last finite one are kept in {path}"
                    )
                remaining -= chunk
                bar.update(chunk)
    finally:
        reporter.close()
    return path


_BAROSTATS = tuple(
    getattr(openmm, name)
    for name in ("MonteCarloBarostat", "MonteCarloAnisotropicBarostat", "MonteCarloMembraneBarostat",
                 "MonteCarloFlexibleBarostat")
    if hasattr(openmm, name)
)


def _equilibrate_npt(
    simulation: app.Simulation,
    *,
    n_steps: int,
    pressure_bar: float,
    temperature_K: float,
    timestep_ps: float,
    friction_per_ps: float,
    barostat_interval: int,
    seed: int,
    progress: bool = False,
    label: str = "",
) -> dict[str, Any]:
    """NPT equilibration for :func:`simulate_reference`; leaves ``simulation`` ready for NVT production.

    Runs ``n_steps`` on a copy of the simulation's System with a ``MonteCarloBarostat`` (in its own
    Context on the same platform), samples the box about every 100 steps in the second half, then sets
    ``simulation``'s box to the mean sampled box, scales the molecule centres (mass-weighted) from the
    final box to it with every molecule kept rigid, and minimizes briefly.  Returns the settings to record.
    """
    import copy

    from tqdm.auto import tqdm

    system = simulation.system
    npt_system = copy.deepcopy(system)
    barostat = openmm.MonteCarloBarostat(pressure_bar * unit.bar, temperature_K * unit.kelvin, barostat_interval)
    barostat.setRandomNumberSeed(openmm_seed(seed))
    npt_system.addForce(barostat)
    integrator = openmm.LangevinMiddleIntegrator(
        temperature_K * unit.kelvin, friction_per_ps / unit.picosecond, timestep_ps * unit.picosecond
    )
    integrator.setRandomNumberSeed(openmm_seed(seed))
    context = openmm.Context(npt_system, integrator, simulation.context.getPlatform())
    try:
        start = simulation.context.getState(getPositions=True, getVelocities=True)
        context.setPeriodicBoxVectors(*start.getPeriodicBoxVectors())
        context.setPositions(start.getPositions(asNumpy=True))
        context.setVelocities(start.getVelocities(asNumpy=True))

        first = n_steps // 2
        second = n_steps - first
        sample_every = max(1, min(100, second // 10))
        boxes = []
        with tqdm(total=n_steps, unit="step", disable=not progress, desc=f"NPT equilibration -> {label}") as bar:
            done = 0
            while done < first:
                chunk = min(1000, first - done)
                integrator.step(chunk)
                done += chunk
                bar.update(chunk)
            done = 0
            while done < second:
                chunk = min(sample_every, second - done)
                integrator.step(chunk)
                done += chunk
                bar.update(chunk)
                boxes.append(context.getState().getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
        end = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        energy = end.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        check_finite(np.array([energy]), name="energy after NPT equilibration")
        final_box = end.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
        positions = end.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        velocities = end.getVelocities(asNumpy=True)
        molecules = [list(m) for m in context.getMolecules()]
    finally:
        del context, integrator

    boxes = np.asarray(boxes, dtype=np.float64)
    mean_box = boxes.mean(axis=0)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    grams = masses.sum() / _AVOGADRO
    densities = grams / (np.abs(np.linalg.det(boxes)) * 1e-21)  # g/cm3

    # Affine scaling of molecule centres from the final box to the mean box; each molecule moves rigidly.
    to_mean = np.linalg.solve(final_box, mean_box)  # fractional coordinates: r = f @ box (rows a, b, c)
    scaled = positions.copy()
    for atoms in molecules:
        idx = np.asarray(atoms)
        w = masses[idx]
        centre = (w @ positions[idx]) / w.sum() if w.sum() > 0 else positions[idx].mean(axis=0)
        scaled[idx] += centre @ to_mean - centre
    simulation.context.setPeriodicBoxVectors(*mean_box)
    simulation.context.setPositions(scaled)
    simulation.context.setVelocities(velocities)
    simulation.context.applyConstraints(1e-8)
    simulation.minimizeEnergy(maxIterations=200)
    return {
        "npt_density_g_cm3": float(densities.mean()),
        "npt_density_std_g_cm3": float(densities.std()),
        "npt_box_samples": int(len(boxes)),
        "production_box_nm": mean_box.tolist(),
        "production_density_g_cm3": float(grams / (abs(np.linalg.det(mean_box)) * 1e-21)),
    }



# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _check_header(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such trajectory file: {path}")
    try:
        with h5py.File(path, "r", swmr=True) as f:
            fmt = f.attrs.get("format")
            version = f.attrs.get("format_version")
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 file ({exc})") from exc
    if fmt != FORMAT:
        raise ValueError(f"{path} is not an openmm-backmap trajectory file (format={fmt!r})")
    if int(version) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {int(version)}, newer than this openmm-backmap supports "
            f"({FORMAT_VERSION}); upgrade openmm-backmap"
        )


def _recover_after_crash(path: Path) -> None:
    """Rewrite a file whose writer died in SWMR mode, so that it can be opened for writing again.

    HDF5 marks a file "open for SWMR write" in its superblock and refuses to open it for writing until the
    flag is cleared (the ``h5clear`` tool).  The data up to the last flush is intact and readable, so it is
    copied into a fresh file that then atomically replaces the original.  The caller must make sure no
    other process is still writing the file.
    """
    tmp = path.with_name(path.name + ".recovering")
    warnings.warn(f"{path} was not closed by its writer (crash?); recovering the frames flushed to it", stacklevel=4)
    try:
        with h5py.File(path, "r", swmr=True) as src, h5py.File(tmp, "w", libver="latest") as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in src:
                src.copy(src[name], dst, name=name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _LazyField:
    """Array-like view of one per-frame dataset; indexing reads only the requested frames."""

    def __init__(self, owner: "TrajectoryDataset", name: str) -> None:
        self._owner = owner
        self._name = name

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self),) + self._owner._file[self._name].shape[1:]

    @property
    def dtype(self) -> np.dtype:
        return self._owner._file[self._name].dtype

    def __len__(self) -> int:
        return self._owner.n_frames

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):  # frames first (read lazily), then the rest in memory
            frames = self[index[0]]
            rest = index[1:]
            return frames[rest] if isinstance(index[0], (int, np.integer)) else frames[(slice(None), *rest)]
        ds = self._owner._file[self._name]
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"frame {index} out of range for {n} frames")
            return ds[i]
        if isinstance(index, slice):
            rng = range(n)[index]
            if rng.step > 0:
                return ds[rng.start: max(rng.start, rng.stop): rng.step]
            index = np.asarray(rng)
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"frame indices out of range for {n} frames")
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)
        out = ds[uniq] if uniq.size else ds[0:0]
        result = np.empty((idx.size,) + ds.shape[1:], dtype=ds.dtype)
        result[order] = out[inverse]
        return result

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr


def block_split(
    n_frames: int,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    n_blocks: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Split frame indices into sets of contiguous time blocks.

    Consecutive frames are correlated, so frames are cut into ``n_blocks`` contiguous blocks of (nearly)
    equal length, the blocks are shuffled with ``seed`` and dealt to the sets in proportion to
    ``fractions`` (at least one block each).  Indices within each set are sorted.

    Returns
    -------
    tuple of numpy.ndarray
        One index array per fraction (e.g. train, validation, test).
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or fractions.size < 1 or (fractions <= 0).any():
        raise ValueError(f"fractions must be positive numbers, got {fractions.tolist()}")
    if n_blocks < fractions.size:
        raise ValueError(f"need at least {fractions.size} blocks for {fractions.size} sets, got n_blocks={n_blocks}")
    if n_frames < n_blocks:
        raise ValueError(f"cannot split {n_frames} frames into {n_blocks} blocks")
    fractions = fractions / fractions.sum()
    counts = np.maximum(1, np.floor(fractions * n_blocks).astype(int))
    while counts.sum() > n_blocks:
        counts[np.argmax(counts)] -= 1
    while counts.sum() < n_blocks:
        counts[np.argmax(fractions * n_blocks - counts)] += 1
    blocks = np.array_split(np.arange(n_frames), n_blocks)
    order = np.random.default_rng(seed).permutation(n_blocks)
    out, start = [], 0
    for c in counts:
        chosen = sorted(order[start: start + c])
        out.append(np.concatenate([blocks[b] for b in chosen]))
        start += c
    return tuple(out)


class TrajectoryDataset:
    """Lazy reader of an openmm-backmap HDF5 trajectory.

    Per-frame arrays are exposed as array-like views (``ds.positions[10:20]`` reads only those frames),
    so datasets larger than memory can be used.  The file may still be growing (SWMR): call
    :meth:`refresh` to see frames written since it was opened.

    Parameters
    ----------
    path
        The HDF5 file.
    """

    _kind: str | None = None

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        _check_header(self.path)
        self._file = h5py.File(self.path, "r", swmr=True)
        kind = self._file.attrs["kind"]
        if self._kind is not None and kind != self._kind:
            self._file.close()
            other = {"aa": "AADataset", "cg": "CGDataset"}[kind]
            raise ValueError(f"{self.path} holds {kind!r} data; open it with {other}")
        self.kind = str(kind)
        self._topology = None
        self._system = None

    # -- metadata ------------------------------------------------------------------------------------
    @property
    def n_frames(self) -> int:
        return int(self._file["step"].shape[0])

    def refresh(self) -> None:
        """Re-open the file to see frames appended since it was opened (a run still writing it).

        Re-opening rather than h5py's ``Dataset.refresh()``: with h5py 3.16 / HDF5 2.0, refreshing a
        SWMR dataset more than once corrupts reads past its first chunk.
        """
        self._file.close()
        self._file = h5py.File(self.path, "r", swmr=True)

    def __len__(self) -> int:
        return self.n_frames

    @property
    def n_atoms(self) -> int:
        return int(self._file.attrs["n_atoms"])

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for f in _FRAME_FIELDS if f in self._file)

    @property
    def periodic(self) -> bool:
        return "box_vectors" in self._file

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self._file.attrs["settings"])

    @property
    def package_versions(self) -> dict[str, str]:
        return json.loads(self._file.attrs["package_versions"])

    @property
    def topology_fingerprint(self) -> str:
        return str(self._file.attrs["topology_fingerprint"])

    @property
    def topology(self) -> app.Topology:
        """OpenMM topology of the stored particles."""
        if self._topology is None:
            self._topology = topology_from_json(self._file["topology"][()].decode())
        return self._topology

    @property
    def mdtraj_topology(self):
        import mdtraj

        return mdtraj.Topology.from_openmm(self.topology)

    @property
    def system(self) -> openmm.System:
        """The stored ``openmm.System`` (raises if none was stored)."""
        if self._system is None:
            if "system" not in self._file:
                raise ValueError(f"{self.path} stores no openmm.System")
            self._system = openmm.XmlSerializer.deserialize(self._file["system"][()].decode())
        return self._system

    def text(self, name: str) -> str:
        """A string dataset stored once (e.g. ``"mapping"`` in a CG file)."""
        if name not in self._file:
            raise KeyError(f"{self.path} has no {name!r} record")
        return self._file[name][()].decode()

    # -- frames --------------------------------------------------------------------------------------
    def _field(self, name: str) -> _LazyField:
        if name not in self._file:
            raise KeyError(f"{self.path} does not store {name!r}")
        return _LazyField(self, name)

    @property
    def positions(self) -> _LazyField:
        """Positions (nm), ``(n_frames, n_atoms, 3)``."""
        return self._field("positions")

    @property
    def forces(self) -> _LazyField:
        """Forces (kJ/mol/nm), ``(n_frames, n_atoms, 3)``."""
        return self._field("forces")

    @property
    def velocities(self) -> _LazyField:
        """Velocities (nm/ps), ``(n_frames, n_atoms, 3)``."""
        return self._field("velocities")

    @property
    def box_vectors(self) -> _LazyField:
        """Box vectors (nm), ``(n_frames, 3, 3)``, rows a, b, c (periodic systems only)."""
        return self._field("box_vectors")

    @property
    def potential_energy(self) -> np.ndarray:
        """Potential energy (kJ/mol) of every frame."""
        return self._field("potential_energy")[:]

    @property
    def time(self) -> np.ndarray:
        """Simulation time (ps) of every frame."""
        return self._field("time")[:]

    @property
    def step(self) -> np.ndarray:
        return self._field("step")[:]

    def frame(self, index: int) -> dict[str, np.ndarray]:
        """All stored arrays of one frame."""
        names = [*self.fields, "potential_energy", "time", "step"] + (["box_vectors"] if self.periodic else [])
        return {k: self._field(k)[index] for k in names}

    def split(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), *, n_blocks: int = 10, seed: int = 0
    ) -> tuple[np.ndarray, ...]:
        """Train/validation/test frame indices by contiguous time blocks (see :func:`block_split`)."""
        return block_split(self.n_frames, fractions, n_blocks=n_blocks, seed=seed)

    def check_finite(self, fields: Iterable[str] = ("positions", "forces"), chunk: int = 1024) -> None:
        """Raise ``ValueError`` if any stored frame has NaN/inf in ``fields`` (read chunk by chunk)."""
        for name in fields:
            field = self._field(name)
            for start in range(0, len(field), chunk):
                check_finite(field[start: start + chunk], name=f"{self.path.name}:{name}[{start}:]")

    def torch_dataset(self, indices: Sequence[int] | None = None, fields: Sequence[str] = ("positions", "forces"),
                      dtype: Any = None):
        """A ``torch.utils.data.Dataset`` over the chosen frames, reading lazily (safe with worker processes)."""
        return _TorchFrames(self.path, indices if indices is not None else np.arange(self.n_frames), fields, dtype)

    def to_mdtraj(self, indices: Sequence[int] | slice | None = None):
        """The chosen frames as an ``mdtraj.Trajectory`` (positions, time and unit cell)."""
        import mdtraj

        index = slice(None) if indices is None else indices
        xyz = self.positions[index]
        traj = mdtraj.Trajectory(xyz, self.mdtraj_topology, time=self._field("time")[index])
        if self.periodic:
            traj.unitcell_vectors = self.box_vectors[index]
        return traj

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, n_frames={self.n_frames}, n_atoms={self.n_atoms})"


class AADataset(TrajectoryDataset):
    """Reader of an all-atom reference trajectory (see :class:`TrajectoryDataset`)."""

    _kind = "aa"


class CGDataset(TrajectoryDataset):
    """Reader of a coarse-grained (mapped) trajectory (see :class:`TrajectoryDataset`)."""

    _kind = "cg"


class _TorchFrames:
    """Frames of a trajectory file as a torch Dataset; the file is opened lazily in each process."""

    def __init__(self, path: Path, indices: Sequence[int], fields: Sequence[str], dtype: Any) -> None:
        import torch

        self.path = path
        self.indices = np.asarray(indices, dtype=np.int64)
        self.fields = tuple(fields)
        self.dtype = dtype or torch.get_default_dtype()
        self._ds: TrajectoryDataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        if self._ds is None or self._pid != os.getpid():
            self._ds, self._pid = TrajectoryDataset(self.path), os.getpid()
        frame = int(self.indices[i])
        return {name: torch.as_tensor(self._ds._field(name)[frame], dtype=self.dtype) for name in self.fields}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        return state
