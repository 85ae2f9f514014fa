"""Differentiable, batched energies and forces of an all-atom ``openmm.System``.

``AAEnergy(system)`` is a ``torch.nn.Module``: native torch terms where they exist, an exact OpenMM bridge
for everything else (see :mod:`openmm_backmap.energy.aaenergy`).
"""
from .aaenergy import AAEnergy, as_tensor
from .bridge import OpenMMBridge

__all__ = ["AAEnergy", "OpenMMBridge", "as_tensor"]
