"""Helpers shared by the tests."""
import numpy as np
import openmm
import openmm.unit as u

KJ = u.kilojoule_per_mole
KJ_NM = KJ / u.nanometer


def openmm_reference(system, positions, box=None):
    """Energies ``(B,)`` (kJ/mol) and forces ``(B, n, 3)`` (kJ/mol/nm) of ``system`` by OpenMM's Reference platform."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for b in range(len(positions)):
        if box is not None:
            ctx.setPeriodicBoxVectors(*box[b])
        ctx.setPositions(positions[b])
        state = ctx.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(KJ))
        forces.append(state.getForces(asNumpy=True).value_in_unit(KJ_NM))
    return np.array(energies), np.array(forces)
