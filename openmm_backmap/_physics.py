"""Physical constants and small facts about an openmm.System shared across modules."""
from __future__ import annotations

import openmm

#: Boltzmann constant, kJ/mol/K.
BOLTZMANN_KJ_MOL_K = 0.00831446261815324


def degrees_of_freedom(system: openmm.System) -> int:
    """Kinetic degrees of freedom: 3 per massive particle, minus constraints, minus 3 with a CMMotionRemover."""
    dof = sum(3 for i in range(system.getNumParticles()) if system.getParticleMass(i)._value > 0)
    dof -= system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        dof -= 3
    return max(dof, 1)


def openmm_seed(seed: int) -> int:
    """The random seed to give OpenMM (integrators, barostats, ``setVelocitiesToTemperature``) for a user seed.

    OpenMM takes a seed of 0 to mean "pick a new random seed every time", so passing the user's ``seed=0`` (our
    default) straight through made runs irreproducible. Every integer maps to a fixed seed in ``[1, 2**31 - 1]``.
    """
    return int(seed) % (2**31 - 1) + 1
