"""A CGPotential as an OpenMM force, and the CG System around it.

Two backends behind one call:

``"torch"``
    An ``openmmtorch.TorchForce`` running the TorchScript-compiled potential inside OpenMM (no Python in the
    MD loop).  Needs openmmtorch, which needs torch < 2.10 (see setup.py).
``"python"``
    An ``openmm.PythonForce`` (OpenMM >= 8.5) that calls the same model from Python: works with any torch
    version and with models TorchScript cannot compile; costs a Python round trip per step.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
import openmm
import torch
from openmm import unit

from .model import CGPotential

BACKENDS = ("torch", "python")


class _TorchForceModule(torch.nn.Module):
    """openmmtorch calling convention with ``setOutputsForces(True)``, non-periodic:
    ``forward(positions (n_copies * n, 3) nm) -> (energy, forces)``.

    ``n_copies`` non-interacting copies of the molecule are evaluated as one batch (independent replicas
    in one System cost about one model call per step).
    """

    def __init__(self, potential: CGPotential, n_copies: int = 1) -> None:
        super().__init__()
        self.potential = potential
        self.n_copies = int(n_copies)
        self.n_beads = potential.n_beads
        self.register_buffer("_probe", torch.zeros((), dtype=potential.energy_offset.dtype))

    def forward(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = positions.to(self._probe.dtype).reshape(self.n_copies, self.n_beads, 3)
        energy, forces = self.potential.md_energy_and_forces(x, None)
        return energy.sum().to(positions.dtype), forces.reshape(-1, 3).to(positions.dtype)


class _PeriodicTorchForceModule(torch.nn.Module):
    """openmmtorch convention with ``setOutputsForces(True)``, periodic:
    ``forward(positions (n, 3), box (3, 3)) -> (energy, forces)``."""

    def __init__(self, potential: CGPotential) -> None:
        super().__init__()
        self.potential = potential
        self.register_buffer("_probe", torch.zeros((), dtype=potential.energy_offset.dtype))

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dtype = self._probe.dtype
        x, box = positions.to(dtype).unsqueeze(0), boxvectors.to(dtype).unsqueeze(0)
        energy, forces = self.potential.md_energy_and_forces(x, box)
        return energy[0].to(positions.dtype), forces[0].to(positions.dtype)


class PotentialComputation:
    """The callable behind the ``"python"`` backend: State -> (energy kJ/mol, forces kJ/mol/nm)."""

    def __init__(self, potential: CGPotential, n_copies: int = 1) -> None:
        self.potential = potential.eval()
        self.dtype = potential.energy_offset.dtype
        self.n_copies = int(n_copies)

    def __call__(self, state: openmm.State):
        pos = torch.as_tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=self.dtype)
        box = None
        if self.potential.periodic:
            vectors = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
            box = torch.as_tensor(vectors, dtype=self.dtype)[None]
        energy, forces = self.potential.energy_and_forces(pos.reshape(self.n_copies, -1, 3), box)
        return float(energy.sum()), forces.reshape(-1, 3).numpy().astype(np.float64)


def create_force(potential: CGPotential, backend: str = "torch", *, force_group: int = 0,
                 n_copies: int = 1) -> openmm.Force:
    """The potential as an OpenMM force acting on the CG particles (nm in, kJ/mol out).

    Parameters
    ----------
    potential
        The CG potential; its dtype (``potential.to(torch.float32)`` or ``float64``) is the precision the
        force computes in, whatever the platform passes.
    backend
        ``"torch"`` (openmmtorch.TorchForce, TorchScript) or ``"python"`` (openmm.PythonForce).
    force_group
        OpenMM force group of the returned force.
    n_copies
        Number of non-interacting copies of the CG molecule the force acts on (particles ordered copy by
        copy): independent replicas in one System, evaluated as one batch.  Non-periodic potentials only.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if int(n_copies) < 1 or (n_copies > 1 and potential.periodic):
        raise ValueError(f"n_copies must be >= 1, and 1 for periodic potentials; got {n_copies}")
    potential = potential.eval()
    if backend == "torch":
        from .._openmmtorch import import_openmmtorch

        openmmtorch = import_openmmtorch()
        wrapper = _PeriodicTorchForceModule(potential) if potential.periodic else _TorchForceModule(potential, n_copies)
        try:
            module = torch.jit.script(wrapper)
        except Exception as exc:
            raise ValueError(f"the potential cannot be compiled with TorchScript ({exc}); "
                             f"use backend='python'") from exc
        force = openmmtorch.TorchForce(module)
        force.setOutputsForces(True)
        force.setUsesPeriodicBoundaryConditions(potential.periodic)
    else:
        force = openmm.PythonForce(PotentialComputation(potential, n_copies))
        force.setUsesPeriodicBoundaryConditions(potential.periodic)
    force.setForceGroup(force_group)
    return force


def create_cg_system(
    mapping: Any,
    potential: CGPotential,
    *,
    backend: str = "torch",
    box_vectors_nm: Optional[Sequence[Sequence[float]]] = None,
    remove_cm_motion: bool = True,
    n_copies: int = 1,
) -> openmm.System:
    """The CG ``openmm.System``: one particle per bead (bead masses in amu), the potential as its force.

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` the potential was trained for (checked).
    potential
        The trained CG potential.
    backend
        ``"torch"`` or ``"python"`` (see :func:`create_force`).
    box_vectors_nm
        Box vectors (3, 3) in nm for periodic potentials; default: the AA topology's box.
    remove_cm_motion
        Add a ``CMMotionRemover``.
    n_copies
        Independent, non-interacting replicas of the CG molecule in one System (particles copy by copy),
        e.g. to run many short replicas at the cost of one (non-periodic potentials only).
    """
    potential.check_mapping(mapping)
    system = openmm.System()
    for _ in range(int(n_copies)):
        for mass in mapping.bead_masses:
            system.addParticle(float(mass) * unit.amu)
    if potential.periodic:
        if box_vectors_nm is None:
            box = mapping.to_openmm_topology().getPeriodicBoxVectors()
            if box is None:
                raise ValueError("the potential is periodic: give box_vectors_nm (the mapping's topology has no box)")
            box_vectors_nm = np.asarray(box.value_in_unit(unit.nanometer))
        box_vectors_nm = np.asarray(box_vectors_nm, dtype=float)
        if box_vectors_nm.shape != (3, 3) or not np.isfinite(box_vectors_nm).all():
            raise ValueError(f"box_vectors_nm must be a finite (3, 3) array, got {box_vectors_nm}")
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*v) * unit.nanometer for v in box_vectors_nm))
    system.addForce(create_force(potential, backend, n_copies=n_copies))
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system
