"""openmm-backmap: CG potentials, on-the-fly backmapping and AA energies for OpenMM."""
from ._version import __version__

__all__ = ["__version__"]
