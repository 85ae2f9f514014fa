"""Exact energies and forces of any OpenMM force, as a differentiable torch operation.

:class:`OpenMMBridge` evaluates a chosen set of forces of an ``openmm.System`` with an OpenMM ``Context``
(energy from OpenMM, gradient = -forces) inside a ``torch.autograd.Function``.  One Context is created per
process on first use and reused for every configuration of every batch.  It covers what has no native torch
version here (GBSAOBCForce, the CustomGBForce of GBn2, Ewald/PME, Custom*Force, anything a user brings)
and is exact by construction: it *is* OpenMM.

Each bridged force sits in its own force group of a private copy of the System, so energies are returned per
category.  A NonbondedForce is split into a Lennard-Jones copy (charges zeroed) and a Coulomb copy (epsilons
zeroed), whose energies add up to the original exactly, so "lj" and "coulomb" stay separate with PME too.

Box vectors are inputs without gradient (no virial).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import openmm
import torch

from ..platforms import available_platforms, choose_platform

#: Category of a bridged force by class name (anything else: "other").
CATEGORIES = {
    "GBSAOBCForce": "gb",
    "CustomGBForce": "gb",
    "GBVIForce": "gb",
    "HarmonicBondForce": "bond",
    "HarmonicAngleForce": "angle",
    "PeriodicTorsionForce": "torsion",
    "RBTorsionForce": "torsion",
    "CMAPTorsionForce": "cmap",
    "CustomBondForce": "custom",
    "CustomAngleForce": "custom",
    "CustomTorsionForce": "custom",
    "CustomNonbondedForce": "custom",
    "CustomExternalForce": "custom",
    "CustomCompoundBondForce": "custom",
    "CustomCentroidBondForce": "custom",
    "CustomManyParticleForce": "custom",
    "CustomHbondForce": "custom",
}


def _copy_force(force: openmm.Force) -> openmm.Force:
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force))


def _split_nonbonded(force: openmm.NonbondedForce) -> list[tuple[openmm.Force, str]]:
    """LJ-only and Coulomb-only copies of a NonbondedForce (energies add up to the original)."""
    lj, coul = _copy_force(force), _copy_force(force)
    for i in range(force.getNumParticles()):
        q, sig, eps = force.getParticleParameters(i)
        lj.setParticleParameters(i, 0.0, sig, eps)
        coul.setParticleParameters(i, q, sig, 0.0)
    for k in range(force.getNumExceptions()):
        i, j, qq, sig, eps = force.getExceptionParameters(k)
        lj.setExceptionParameters(k, i, j, 0.0, sig, eps)
        coul.setExceptionParameters(k, i, j, qq, sig, 0.0)
    coul.setUseDispersionCorrection(False)
    for offset in range(force.getNumParticleParameterOffsets()):
        param, i, dq, dsig, deps = force.getParticleParameterOffset(offset)
        lj.setParticleParameterOffset(offset, param, i, 0.0, dsig, deps)
        coul.setParticleParameterOffset(offset, param, i, dq, dsig, 0.0)
    for offset in range(force.getNumExceptionParameterOffsets()):
        param, k, dqq, dsig, deps = force.getExceptionParameterOffset(offset)
        lj.setExceptionParameterOffset(offset, param, k, 0.0, dsig, deps)
        coul.setExceptionParameterOffset(offset, param, k, dqq, dsig, 0.0)
    return [(lj, "lj"), (coul, "coulomb")]


class OpenMMBridge(torch.nn.Module):
    """Differentiable evaluation of some forces of a System through an OpenMM Context.

    Parameters
    ----------
    system
        The full System (its particles, masses, constraints-free copy and box are used).
    force_indices
        Indices (in ``system.getForces()``) of the forces to evaluate.
    platform
        OpenMM platform name or object.  Default: double precision everywhere, i.e. CUDA or OpenCL with
        ``Precision=double`` when present, else Reference.  ``"CPU"`` is faster for large or PME systems
        but computes forces in single precision (~1e-5 relative).
    split_nonbonded
        Report a NonbondedForce as separate "lj" and "coulomb" categories (two evaluations) instead of
        one "nonbonded" category.
    """

    def __init__(
        self,
        system: openmm.System,
        force_indices: Sequence[int],
        *,
        platform: str | openmm.Platform | None = None,
        split_nonbonded: bool = True,
    ) -> None:
        super().__init__()
        if not force_indices:
            raise ValueError("OpenMMBridge needs at least one force")
        sub = openmm.System()
        for i in range(system.getNumParticles()):
            sub.addParticle(system.getParticleMass(i))
        sub.setDefaultPeriodicBoxVectors(*system.getDefaultPeriodicBoxVectors())
        forces = system.getForces()
        entries: list[tuple[openmm.Force, str]] = []
        self.force_names: list[str] = []
        for index in force_indices:
            force = forces[index]
            name = type(force).__name__
            self.force_names.append(name)
            if isinstance(force, openmm.NonbondedForce):
                entries += _split_nonbonded(force) if split_nonbonded else [(_copy_force(force), "nonbonded")]
            else:
                entries.append((_copy_force(force), CATEGORIES.get(name, "other")))
        if len(entries) > 32:
            raise ValueError(f"the bridge can evaluate at most 32 forces separately, got {len(entries)}")
        for group, (force, _) in enumerate(entries):
            force.setForceGroup(group)
            sub.addForce(force)
        self._xml = openmm.XmlSerializer.serialize(sub)
        self._group_categories = [category for _, category in entries]
        self.categories = tuple(dict.fromkeys(self._group_categories))
        self.periodic = sub.usesPeriodicBoundaryConditions()
        self.n_atoms = sub.getNumParticles()
        self._platform_choice = platform
        self._context: openmm.Context | None = None
        self._pid: int | None = None

    # -- the Context -----------------------------------------------------------------------------------
    @property
    def context(self) -> openmm.Context:
        """This process's Context (created on first use; a forked worker creates its own)."""
        if self._context is None or self._pid != os.getpid():
            system = openmm.XmlSerializer.deserialize(self._xml)
            choice = self._platform_choice
            if choice is None:
                gpus = [p for p in ("CUDA", "OpenCL") if p in available_platforms()]
                choice = gpus[0] if gpus else "Reference"
            platform = choose_platform(system, choice)
            properties = {"Precision": "double"} if platform.getName() in ("CUDA", "OpenCL") else {}
            self._context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, properties)
            self._pid = os.getpid()
        return self._context

    @property
    def platform_name(self) -> str:
        return self.context.getPlatform().getName()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_context"] = None
        return state

    # -- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, positions: np.ndarray, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Energies ``(B, n_groups)`` in kJ/mol and forces ``(B, n_groups, n, 3)`` in kJ/mol/nm (numpy, float64)."""
        context = self.context
        n_groups = len(self._group_categories)
        batch = positions.shape[0]
        energies = np.empty((batch, n_groups))
        forces = np.empty((batch, n_groups) + positions.shape[1:])
        kj, kj_nm = openmm.unit.kilojoule_per_mole, openmm.unit.kilojoule_per_mole / openmm.unit.nanometer
        for b in range(batch):
            if box is not None:
                context.setPeriodicBoxVectors(*box[b])
            context.setPositions(positions[b])
            for g in range(n_groups):
                state = context.getState(getEnergy=True, getForces=True, groups={g})
                energies[b, g] = state.getPotentialEnergy().value_in_unit(kj)
                forces[b, g] = state.getForces(asNumpy=True).value_in_unit(kj_nm)
        return energies, forces

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Energies per category, ``(B,)`` each, kJ/mol; differentiable with respect to ``positions``."""
        if self.periodic and box is None:
            raise ValueError("this system is periodic: box vectors (B, 3, 3) in nm are required")
        per_group = _BridgeFunction.apply(positions, box if self.periodic else None, self)
        out: dict[str, torch.Tensor] = {}
        for g, category in enumerate(self._group_categories):
            out[category] = out[category] + per_group[:, g] if category in out else per_group[:, g]
        return out


class _BridgeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, positions: torch.Tensor, box: torch.Tensor | None, bridge: OpenMMBridge) -> torch.Tensor:
        pos = positions.detach().to("cpu", torch.float64).numpy()
        box_np = None if box is None else box.detach().to("cpu", torch.float64).numpy()
        energies, forces = bridge.evaluate(pos, box_np)
        ctx.save_for_backward(torch.as_tensor(forces, dtype=positions.dtype, device=positions.device))
        return torch.as_tensor(energies, dtype=positions.dtype, device=positions.device)

    @staticmethod
    def backward(ctx, grad_energy: torch.Tensor):
        (forces,) = ctx.saved_tensors
        grad_positions = -(grad_energy[:, :, None, None] * forces).sum(dim=1)
        return grad_positions, None, None
