"""CG potentials trained by force matching, run in OpenMM as a TorchForce or PythonForce.

``ForceMatchingTrainer(mapping, cg_dataset, ...).fit() -> CGPotential``; ``create_cg_system(mapping, potential)``
builds the CG ``openmm.System``; ``potential.transfer(mapping)`` carries a potential to a system of the same
molecules in other numbers (a larger box, see :mod:`.transfer`).
"""
from .export import create_cg_system, create_force
from .model import CGPotential
from .trainer import ForceMatchingTrainer

__all__ = ["CGPotential", "ForceMatchingTrainer", "create_cg_system", "create_force"]
