"""OpenMM reporters for CG runs: a blow-up guard and on-the-fly backmapping to an AA trajectory."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import openmm
import openmm.app as app
from openmm import unit

from ._physics import BOLTZMANN_KJ_MOL_K, degrees_of_freedom



class SimulationBlowUp(RuntimeError):
    """A guarded simulation produced NaN or exploding energies."""

    def __init__(self, message: str, step: int, last_good_state: Optional[openmm.State]) -> None:
        super().__init__(message)
        self.step = step
        self.last_good_state = last_good_state


class CGRunGuard:
    """Stop a simulation with a clear error when it blows up, keeping the last good frame.

    Every ``reportInterval`` steps it checks that the potential energy and positions are finite, that the
    instantaneous kinetic temperature stays below ``max_temperature_K`` and that the potential energy has not
    risen more than ``max_energy_rise_kj_mol`` above the first checked value.  On failure it raises
    :class:`SimulationBlowUp` naming the step; the last state that passed (positions, velocities, box, time,
    step) is in ``guard.last_good_state`` and, if ``last_good_file`` is given, written there as a PDB when the
    run fails.  ``guard.restore(simulation)`` puts it back into the Context.

    Parameters
    ----------
    reportInterval
        Steps between checks.  Each check evaluates the energy once more (the ML force included), so
        don't make it too small.
    max_temperature_K
        Largest acceptable instantaneous kinetic temperature, K.
    max_energy_rise_kj_mol
        Largest acceptable rise of the potential energy above its first checked value, kJ/mol.
    last_good_file
        Optional PDB path for the last good frame.
    """

    def __init__(
        self,
        reportInterval: int,
        *,
        max_temperature_K: float = 2000.0,
        max_energy_rise_kj_mol: float = 1.0e5,
        last_good_file: str | os.PathLike | None = None,
    ) -> None:
        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be a positive number of steps, not {reportInterval}")
        self._interval = int(reportInterval)
        self.max_temperature_K = float(max_temperature_K)
        self.max_energy_rise_kj_mol = float(max_energy_rise_kj_mol)
        self.last_good_file = Path(last_good_file) if last_good_file is not None else None
        self.last_good_state: Optional[openmm.State] = None
        self._first_energy: Optional[float] = None
        self._dof: Optional[int] = None

    def describeNextReport(self, simulation: app.Simulation) -> dict[str, Any]:
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": False, "include": ["positions", "velocities", "energy"]}

    def report(self, simulation: app.Simulation, state: openmm.State) -> None:
        if self._dof is None:
            self._dof = degrees_of_freedom(simulation.system)
        step = simulation.currentStep
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        temperature = 2 * kinetic / (self._dof * BOLTZMANN_KJ_MOL_K)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        problem = None
        if not np.isfinite(energy) or not np.isfinite(positions).all():
            problem = f"the potential energy is {energy} (NaN/inf)"
        elif not np.isfinite(temperature) or temperature > self.max_temperature_K:
            problem = f"the kinetic temperature is {temperature:.0f} K (limit {self.max_temperature_K:.0f} K)"
        elif self._first_energy is not None and energy - self._first_energy > self.max_energy_rise_kj_mol:
            problem = (f"the potential energy rose to {energy:.4g} kJ/mol from {self._first_energy:.4g} "
                       f"(limit +{self.max_energy_rise_kj_mol:.3g})")
        if problem is None:
            if self._first_energy is None:
                self._first_energy = energy
            self.last_good_state = simulation.context.getState(
                getPositions=True, getVelocities=True, getParameters=True)
            return
        where = "no good frame was recorded"
        if self.last_good_state is not None:
            good_step = int(round(self.last_good_state.getStepCount()))
            where = f"the last good frame is from step {good_step}"
            if self.last_good_file is not None:
                self.last_good_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.last_good_file, "w") as handle:
                    app.PDBFile.writeFile(simulation.topology, self.last_good_state.getPositions(), handle)
                where += f" (written to {self.last_good_file})"
        raise SimulationBlowUp(f"CG simulation blew up at step {step}: {problem}; {where}", step, self.last_good_state)

    def restore(self, simulation: app.Simulation) -> None:
        """Put the last good state back into ``simulation`` (positions, velocities, box, time, step)."""
        if self.last_good_state is None:
            raise ValueError("no good state was recorded yet")
        simulation.context.setState(self.last_good_state)
        simulation.currentStep = int(round(self.last_good_state.getStepCount()))


def _frame_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from (seed, step)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(step)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class BackmapReporter:
    """OpenMM reporter that backmaps the CG frames of a running simulation and writes the AA trajectory.

    Use it like ``DCDReporter``::

        backmapper = TemporalBackmapper.load("backmapper.pt")
        simulation.reporters.append(BackmapReporter("aa.dcd", 500, backmapper))

    Every ``reportInterval`` steps the CG positions (unwrapped; molecules are made whole by the backmapper) go
    through one step of a :class:`~openmm_backmap.backmap.BackmapChain`, conditioned on the previous AA frame,
    and the AA frame is written with the step, the time and, for periodic systems, the box. Only positions are
    requested from OpenMM, so reporting never re-evaluates the (ML) force.

    Parameters
    ----------
    file
        AA trajectory: ``.dcd``, ``.xtc``, ``.h5`` or ``.pdb`` (see :class:`~openmm_backmap.formats.AATrajectoryWriter`;
        DCD and XTC get the topology as a ``.pdb`` next to them).
    reportInterval
        Steps between frames. Best equal to the backmapper's training lag (a warning says when it is not).
    backmapper
        A :class:`~openmm_backmap.backmap.TemporalBackmapper` or the path of a saved one.
    append
        Continue ``file`` after restarting the simulation from a checkpoint: frames after the step the run restarts
        from (an abandoned continuation) are dropped, and the chain continues from the stored frame one interval
        before the first new report, so the file ends up with no duplicated or missing steps. (DCD, XTC, HDF5.)
    seed
        Seed of the chain's random numbers (latent draws, library picks). Each frame's random numbers are drawn
        from a generator seeded with ``(seed, step)``, so a run restarted from a checkpoint with ``append=True``
        writes the same frames as an uninterrupted run (given the same CG trajectory).
    first_frame
        The AA frame that precedes the first reported frame (e.g. the AA structure the CG run was started from,
        ``(n_atoms, 3)`` nm array or Quantity, or a trajectory file whose last frame is used): the first
        backmapped frame is conditioned on it instead of being seeded from the backmapper's library. With
        ``append``, a stored previous frame takes precedence.
    live_pdb
        Optional PDB file replaced atomically with every new AA frame, for a viewer to follow the run.
    mode
        ``"model"`` (the temporal VAE) or ``"library"`` (library lookup of every frame).
    relax
        Optional :class:`~openmm_backmap.backmap.Relaxer`, or the AA ``openmm.System`` for one with default
        settings: every frame is minimised with the AA force field (beads restrained in place) before it is written
        and before it conditions the next frame. Removes the intermolecular hydrogen overlaps of liquids at a cost
        of seconds per frame of a few thousand atoms; see ``docs/liquids.md``.
    candidates
        Latent draws per residue and frame for backmappers with residue units (default: 8 for those, 1 otherwise):
        one candidate per residue is kept, drawn along the chain with weights from the bonds to the residues placed
        before it (see :class:`~openmm_backmap.backmap.inference.BackmapChain`). Checked before the first step.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        reportInterval: int,
        backmapper: Any,
        *,
        append: bool = False,
        seed: int = 0,
        first_frame: Any = None,
        live_pdb: str | os.PathLike | None = None,
        mode: str = "model",
        relax: Any = None,
        candidates: Optional[int] = None,
    ) -> None:
        from .formats import topology_pdb_path, trajectory_format

        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be a positive number of steps, not {reportInterval}")
        if mode not in ("model", "library"):
            raise ValueError(f"mode must be 'model' or 'library', not {mode!r}")
        self._path = Path(file)
        self._format = trajectory_format(self._path)  # unknown extensions are refused before any step
        if append and self._format == "pdb":
            raise ValueError(f"cannot append to the PDB file {self._path}: PDB stores no steps; write the backmapped "
                             "trajectory as .dcd, .xtc or .h5 to continue it after a restart")
        if isinstance(backmapper, (str, os.PathLike)):
            from .backmap import TemporalBackmapper

            backmapper = TemporalBackmapper.load(backmapper)
        for attr in ("chain", "check_cg", "n_beads", "n_atoms", "topology"):
            if not hasattr(backmapper, attr):
                raise TypeError(f"backmapper must be a TemporalBackmapper or the path of a saved one, "
                                f"got {type(backmapper).__name__}")
        self._backmapper = backmapper
        self._topology = backmapper.topology
        self._interval = int(reportInterval)
        self._append = bool(append)
        self._seed = int(seed)
        self._mode = mode
        from .backmap.relax import as_relaxer

        self._relaxer = as_relaxer(relax, backmapper)  # checked (and built) before any step
        self._candidates = backmapper._check_candidates(candidates)
        self._first_frame = self._read_first_frame(first_frame)
        self._live_path = Path(live_pdb) if live_pdb is not None else None
        if self._live_path is not None:
            clashes = {self._path.resolve(), *([p.resolve()] if (p := topology_pdb_path(self._path)) else [])}
            if self._live_path.resolve() in clashes:
                raise ValueError(f"live_pdb {self._live_path} would overwrite the trajectory or its topology PDB")
        self._writer = None
        self._live = None
        self._chain = None
        self._periodic = False
        self._start_step: Optional[int] = None

    def _read_first_frame(self, value: Any) -> Optional[np.ndarray]:
        if value is None:
            return None
        from ._validation import as_coordinates
        from .formats import last_frame

        if isinstance(value, (str, os.PathLike)):
            value = last_frame(value, self._topology)
        return as_coordinates(value, self._backmapper.n_atoms, name="first_frame", allow_batch=False)

    # -- OpenMM reporter protocol ---------------------------------------------------------------------
    def describeNextReport(self, simulation: app.Simulation) -> dict[str, Any]:
        if self._start_step is None:
            self._start_step = simulation.currentStep  # where this run (re)starts, before any stepping
        steps = self._interval - simulation.currentStep % self._interval
        return {"steps": steps, "periodic": False, "include": ["positions"]}

    def report(self, simulation: app.Simulation, state: openmm.State) -> None:
        if self._writer is None:
            self._initialize(simulation)
        step = simulation.currentStep
        if self._writer.last_step is not None and step <= self._writer.last_step:
            return  # already stored (reported twice at one step)
        xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) if self._periodic else None
        # The random numbers of a frame depend only on (seed, step): a run restarted from a checkpoint reproduces
        # the frames of an uninterrupted one.
        self._chain.reseed(_frame_seed(self._seed, step))
        aa = self._chain.step(xyz, box)
        self._writer.write(aa, step, state.getTime().value_in_unit(unit.picosecond), box)
        if self._live is not None:
            self._live.update(aa, box)

    # -- helpers -----------------------------------------------------------------------------------
    def _initialize(self, simulation: app.Simulation) -> None:
        from .formats import AATrajectoryWriter, LivePDB, existing_steps, last_frame, truncate_after

        bm = self._backmapper
        names = [atom.name for atom in simulation.topology.atoms()]
        bm.check_cg(simulation.system.getNumParticles(), names, source="the simulation's CG system")
        self._periodic = simulation.system.usesPeriodicBoundaryConditions()
        dt_ps = simulation.integrator.getStepSize().value_in_unit(unit.picosecond)
        lag = float(getattr(bm, "lag_ps", 0.0) or 0.0)
        spacing = self._interval * dt_ps
        if lag > 0 and abs(spacing - lag) > 0.01 * lag:
            warnings.warn(f"BackmapReporter: frames are {spacing:g} ps apart ({self._interval} steps of {dt_ps:g} ps) "
                          f"but the backmapper was trained on frames {lag:g} ps apart; the temporal model may "
                          f"behave worse (report every {lag / dt_ps:g} steps to match)", stacklevel=3)
        step = simulation.currentStep
        restart = self._start_step if self._start_step is not None else step - 1
        self._chain = bm.chain(seed=self._seed, n_replicas=1, mode=self._mode, relax=self._relaxer,
                               candidates=self._candidates)
        previous = self._first_frame
        if self._append and self._path.exists() and self._path.stat().st_size > 0:
            stored = existing_steps(self._path, dt_ps)
            later = int((stored > restart).sum())
            if later:
                warnings.warn(f"BackmapReporter: {self._path} holds {later} frame(s) after step {restart}, where the "
                              f"run restarts; they belong to an abandoned continuation and are dropped", stacklevel=3)
                truncate_after(self._path, self._topology, restart, dt_ps=dt_ps)
                stored = stored[stored <= restart]
            if len(stored) and stored[-1] == step - self._interval:
                previous = last_frame(self._path, self._topology)
            elif len(stored):
                warnings.warn(f"BackmapReporter: {self._path} has no frame at step {step - self._interval} (its last "
                              f"is at step {stored[-1]}); the chain restarts from "
                              f"{'first_frame' if previous is not None else 'the backmapper library'} at step {step}, "
                              "a discontinuity in the AA trajectory", stacklevel=3)
        if previous is not None:
            self._chain.previous = previous
        self._writer = AATrajectoryWriter(self._path, self._topology, append=self._append, dt_ps=dt_ps,
                                          interval_steps=self._interval)
        if self._live_path is not None:
            self._live = LivePDB(self._live_path, self._topology)

    @property
    def backmapper(self):
        return self._backmapper

    @property
    def chain(self):
        """The :class:`~openmm_backmap.backmap.BackmapChain` (``None`` before the first report)."""
        return self._chain

    @property
    def writer(self):
        """The :class:`~openmm_backmap.formats.AATrajectoryWriter` (``None`` before the first report)."""
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
