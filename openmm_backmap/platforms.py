"""Choosing an OpenMM platform for a system.

For small systems the per-step overhead of the CPU platform (~0.4 ms on 2 cores) dominates: alanine
dipeptide in OBC2 (native GBSAOBCForce) runs ~19 000 steps/s on Reference and ~1 300 on CPU.  Larger
systems, anything with PME, and custom-expression forces (interpreted on Reference, compiled on CPU: the
CustomGBForce of GBn2 runs ~10x faster on CPU) go to CPU; a GPU platform wins whenever one is present.
"""
from __future__ import annotations

import openmm

#: Systems with at most this many particles (and no Ewald/PME or custom forces) run on Reference by default.
#: Measured here (2 cores, OBC2, steps/s Reference vs CPU): alanine dipeptide (22 atoms) 39 900 vs 7 300,
#: chignolin (138 atoms) 1 240 vs 2 010; Reference's O(n^2) cost crosses over near 80 particles.
REFERENCE_MAX_PARTICLES = 64

_EWALD = {openmm.NonbondedForce.Ewald, openmm.NonbondedForce.PME, openmm.NonbondedForce.LJPME}


def available_platforms() -> list[str]:
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def _uses_ewald(system: openmm.System) -> bool:
    return any(
        isinstance(f, openmm.NonbondedForce) and f.getNonbondedMethod() in _EWALD for f in system.getForces()
    )


def _has_custom_force(system: openmm.System) -> bool:
    return any(type(f).__name__.startswith("Custom") for f in system.getForces())


def choose_platform(system: openmm.System, platform: str | openmm.Platform | None = None) -> openmm.Platform:
    """Return the platform to run ``system`` on.

    Parameters
    ----------
    system
        The system that will be simulated.
    platform
        A platform object or name (``"Reference"``, ``"CPU"``, ``"CUDA"``, ``"OpenCL"``) to force a choice.
        ``None`` picks CUDA or OpenCL if present, else Reference for small systems without Ewald/PME or
        custom-expression forces (at most :data:`REFERENCE_MAX_PARTICLES` particles), else CPU.
    """
    if isinstance(platform, openmm.Platform):
        return platform
    names = available_platforms()
    if platform is not None:
        if platform not in names:
            raise ValueError(f"OpenMM platform {platform!r} is not available here; available: {', '.join(names)}")
        return openmm.Platform.getPlatformByName(platform)
    for gpu in ("CUDA", "OpenCL"):
        if gpu in names:
            return openmm.Platform.getPlatformByName(gpu)
    small = system.getNumParticles() <= REFERENCE_MAX_PARTICLES
    if small and not _uses_ewald(system) and not _has_custom_force(system):
        return openmm.Platform.getPlatformByName("Reference")
    return openmm.Platform.getPlatformByName("CPU")
