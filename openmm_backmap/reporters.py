"""OpenMM reporters for CG runs."""
from __future__ import annotations

import os
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
