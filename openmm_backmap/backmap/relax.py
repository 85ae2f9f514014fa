"""Restrained energy minimisation (and optional thermalization) of backmapped frames with the user's AA System.

The backmapper places every molecule from its own beads, its environment's beads and the previous AA frame; in a
dense liquid that leaves hydrogens of neighbouring molecules overlapping (see ``docs/liquids.md``). A short
minimisation with the AA force field, each bead's atoms held at the CG bead by a harmonic restraint on their
centroid, removes the overlaps without moving the CG frame. It is what backmapping tools of the field do after
their geometric step (backward, CG2AT); here it is optional and runs inside the temporal chain, so the next
frame is conditioned on the relaxed one.

A minimised frame sits at the bottom of its well, below the thermal energies of the ensemble (chignolin at 350 K:
-1200 kJ/mol after minimisation against -1100 +- 23 in the reference). ``md_steps`` adds what backward does after
its minimisation: a short restrained Langevin run at the temperature of the ensemble (constraints kept), which
brings the fast degrees of freedom back to thermal energies. Slow ones (side-chain packing, rotamers) stay where
the backmapper put them: a relaxed frame is as good as the basin it was decoded into.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import openmm

from .._physics import BOLTZMANN_KJ_MOL_K, openmm_seed
from .._validation import as_box_vectors, as_coordinates
from ..energy.aaenergy import NO_ENERGY_FORCES
from ..mapping import _minimum_image

_EWALD = (openmm.NonbondedForce.Ewald, openmm.NonbondedForce.PME, openmm.NonbondedForce.LJPME)
#: Force constant (kJ/mol/nm²) of the harmonic bonds that replace constraints during the relaxation: the AMBER
#: C-H bond (340 kcal/mol/Å², i.e. 2.8e5 in OpenMM's ½k(r-r0)² convention), rounded up.
CONSTRAINT_BOND_K = 3.0e5


def relaxation_system(system: openmm.System) -> openmm.System:
    """The System a :class:`Relaxer` minimises: a copy of ``system`` with

    * constraints replaced by stiff harmonic bonds at the constraint length (:data:`CONSTRAINT_BOND_K`), since a
      backmapped frame need not satisfy them and minimisers handle constraints poorly from far off;
    * Ewald/PME/LJPME electrostatics replaced by reaction field at the same cutoff (``CutoffPeriodic``): removing
      close contacts needs the short range only, and it is ~10x cheaper per evaluation;
    * forces without energy (CM motion remover, barostats, Andersen thermostat) removed.

    Every other force (bonded terms, GB solvent, custom forces, virtual sites) is kept as it is.
    """
    out = _short_range_system(system)
    if out.getNumConstraints():
        bonds = openmm.HarmonicBondForce()
        bonds.setName("RelaxationConstraintBonds")
        for c in reversed(range(out.getNumConstraints())):
            i, j, length = out.getConstraintParameters(c)
            bonds.addBond(i, j, length, CONSTRAINT_BOND_K)
            out.removeConstraint(c)
        bonds.setUsesPeriodicBoundaryConditions(out.usesPeriodicBoundaryConditions())
        out.addForce(bonds)
    return out


def _short_range_system(system: openmm.System) -> openmm.System:
    """A copy of ``system`` without forces that have no energy and with Ewald/PME/LJPME as reaction field."""
    if not isinstance(system, openmm.System):
        raise TypeError(f"need an openmm.System, got {type(system).__name__}")
    out = openmm.XmlSerializer.clone(system)
    for i in reversed(range(out.getNumForces())):
        force = out.getForce(i)
        if isinstance(force, NO_ENERGY_FORCES):
            out.removeForce(i)
        elif isinstance(force, openmm.NonbondedForce) and force.getNonbondedMethod() in _EWALD:
            force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    return out


class Relaxer:
    """Restrained energy minimisation of backmapped AA frames (nm) with an AA ``openmm.System``.

    Each frame is minimised with OpenMM's L-BFGS ``LocalEnergyMinimizer`` on :func:`relaxation_system` of
    ``system``, plus one harmonic restraint per bead, ``k/2 |c_I - R_I|²``, between the centroid ``c_I`` of the bead's
    atoms (the mapping's position weights) and the CG bead ``R_I``; the CG frame therefore stays where it was.

    With ``md_steps > 0`` each minimised frame then runs that many Langevin steps at ``temperature_K`` with the same
    restraints, on the user's System with its constraints (forces without energy removed, Ewald as reaction field),
    velocities drawn afresh for every frame: minimisation removes the overlaps, the short run puts back the thermal
    energy minimisation took out. The bead centroids then fluctuate about the CG beads by ~sqrt(kT/k) per
    coordinate (0.005 nm at 350 K with the default k).

    Measured on the hexane 3-bead liquid (200 molecules, 4000 atoms, one core): 200 iterations take ~3 s per frame
    and bring the fraction of molecules with an LJ energy above the reference maximum from 64 % to 0.4 %
    (LJ-energy JSD 0.46 -> 0.03); see ``docs/liquids.md``.

    Parameters
    ----------
    system
        AA System of the backmapped atoms (same particle order). Its constraints become stiff bonds and PME becomes
        reaction field for the minimisation (:func:`relaxation_system`); the System itself is not modified.
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` of the CG frames.
    atoms
        Indices into the mapping's AA topology of the frame's atoms (``backmapper.atom_indices``); default: all.
    max_iterations
        L-BFGS iterations per frame (0: until converged).
    tolerance_kj_mol_nm
        Stop when the root-mean-square force component falls below this (kJ/mol/nm).
    restraint_kj_mol_nm2
        Force constant of the bead restraints (kJ/mol/nm²).
    md_steps
        Restrained Langevin steps after the minimisation (0: none). Measured on chignolin (OBC2, 350 K, 10/ps, 2 fs,
        10 000 backmapped frames in the temporal chain, ``bench_backmap_chignolin``): after 200 steps the bond, angle
        and torsion energies match the reference ensemble's (median shifts -1, +2, 0 kJ/mol); after 50 they are
        still cold (-21, -37, -8). The velocities are drawn afresh for every frame, so longer runs cost temporal
        coherence (intra-frame velocity-JSD ratio to the frame-based model 0.14 after 50 steps, 0.40 after 200). At
        1/ps, 50 steps leave a minimised frame almost as cold as they found it.
    temperature_K
        Temperature of the run (K); required with ``md_steps > 0``.
    friction_per_ps, timestep_ps
        Langevin friction (1/ps) and time step (ps) of the run (LangevinMiddleIntegrator). The run keeps the
        System's constraints, so the time step that the System is made for applies.
    seed
        Seeds the velocities and the Langevin noise: a Relaxer given the same frames in the same order with the
        same seed returns the same result (on a deterministic platform).
    platform
        OpenMM platform name or object (default: chosen for ``system`` by
        :func:`~openmm_backmap.platforms.choose_platform`); ``properties`` are its platform properties.
    """

    def __init__(
        self,
        system: openmm.System,
        mapping: Any,
        *,
        atoms: Optional[Sequence[int]] = None,
        max_iterations: int = 200,
        tolerance_kj_mol_nm: float = 10.0,
        restraint_kj_mol_nm2: float = 1.0e5,
        md_steps: int = 0,
        temperature_K: Optional[float] = None,
        friction_per_ps: float = 10.0,
        timestep_ps: float = 0.002,
        seed: int = 0,
        platform: Any = None,
        properties: Optional[dict[str, str]] = None,
    ) -> None:
        from ..platforms import choose_platform

        if not isinstance(system, openmm.System):
            raise TypeError(f"system must be an openmm.System, got {type(system).__name__}")
        if not hasattr(mapping, "position_matrix_sparse"):
            raise TypeError(f"mapping must be a CGMapping, got {type(mapping).__name__}")
        if isinstance(max_iterations, bool) or int(max_iterations) != max_iterations or max_iterations < 0:
            raise ValueError(f"max_iterations must be an integer >= 0, got {max_iterations!r}")
        for name, value in (("tolerance_kj_mol_nm", tolerance_kj_mol_nm),
                            ("restraint_kj_mol_nm2", restraint_kj_mol_nm2)):
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(md_steps, bool) or int(md_steps) != md_steps or md_steps < 0:
            raise ValueError(f"md_steps must be an integer >= 0, got {md_steps!r}")
        if md_steps > 0:
            if temperature_K is None:
                raise ValueError("md_steps > 0 needs temperature_K: the temperature of the ensemble (K)")
            for name, value in (("temperature_K", temperature_K), ("friction_per_ps", friction_per_ps),
                                ("timestep_ps", timestep_ps)):
                if not np.isfinite(value) or value <= 0:
                    raise ValueError(f"{name} must be a positive number, got {value!r}")
        weights = mapping.position_matrix_sparse.tocsr()  # sparse: a dense map of a large box would take GBs
        weights.eliminate_zeros()
        if atoms is not None:
            atoms = np.asarray(atoms, dtype=np.int64)
            if atoms.ndim != 1 or len(atoms) == 0 or atoms.min() < 0 or atoms.max() >= weights.shape[1]:
                raise ValueError(f"atoms must be indices into the mapping's {weights.shape[1]} AA atoms")
            outside = np.ones(weights.shape[1], dtype=bool)
            outside[atoms] = False
            uses_outside = np.asarray(abs(weights[:, np.flatnonzero(outside)]).sum(axis=1)).ravel() != 0
            if uses_outside.any():
                bead = int(np.flatnonzero(uses_outside)[0])
                raise ValueError(f"bead {mapping.bead_names[bead]!r} uses atoms outside the frame's atoms")
            weights = weights[:, atoms].tocsr()
        self.n_atoms, self.n_beads = weights.shape[1], weights.shape[0]
        if system.getNumParticles() != self.n_atoms:
            raise ValueError(f"the System has {system.getNumParticles()} particles but the backmapped frames have "
                             f"{self.n_atoms} atoms; give the System of exactly those atoms, in the same order")
        self.periodic = system.usesPeriodicBoundaryConditions()
        self.max_iterations = int(max_iterations)
        self.tolerance_kj_mol_nm = float(tolerance_kj_mol_nm)
        self.restraint_kj_mol_nm2 = float(restraint_kj_mol_nm2)
        self.md_steps = int(md_steps)
        self.temperature_K = None if temperature_K is None else float(temperature_K)
        self.friction_per_ps, self.timestep_ps, self.seed = float(friction_per_ps), float(timestep_ps), int(seed)
        self._weights = weights
        self._system = relaxation_system(system)
        restraint = openmm.CustomCentroidBondForce(1, "0.5*k_bead_restraint*((x1-x0)^2+(y1-y0)^2+(z1-z0)^2)")
        restraint.setName("BeadRestraints")
        restraint.addGlobalParameter("k_bead_restraint", self.restraint_kj_mol_nm2)
        for p in ("x0", "y0", "z0"):
            restraint.addPerBondParameter(p)
        for b in range(self.n_beads):
            row = weights.getrow(b)
            restraint.addGroup([int(a) for a in row.indices], [float(w) for w in row.data])
            restraint.addBond([b], [0.0, 0.0, 0.0])
        self._restraint_index = self._system.addForce(restraint)
        self._md_system: Optional[openmm.System] = None
        if self.md_steps:
            self._md_system = _short_range_system(system)
            self._md_restraint_index = self._md_system.addForce(openmm.XmlSerializer.clone(restraint))
        self._frames_done = 0
        #: frames whose restrained run failed or heated up beyond n_dof kT; the minimised frame was kept instead
        self.md_rejected = 0
        massive = sum(system.getParticleMass(i).value_in_unit(openmm.unit.dalton) > 0
                      for i in range(system.getNumParticles()))
        self._n_dof = max(1, 3 * massive - system.getNumConstraints())
        self._platform = choose_platform(system, platform)
        self._properties = dict(properties or {})
        self._context: Optional[openmm.Context] = None
        self._md_context: Optional[openmm.Context] = None

    @property
    def system(self) -> openmm.System:
        """The relaxation System (restraints included)."""
        return self._system

    def _get_context(self) -> openmm.Context:
        if self._context is None:
            integrator = openmm.VerletIntegrator(0.001)
            self._context = openmm.Context(self._system, integrator, self._platform, self._properties)
        return self._context

    def _get_md_context(self) -> openmm.Context:
        if self._md_context is None:
            integrator = openmm.LangevinMiddleIntegrator(self.temperature_K, self.friction_per_ps, self.timestep_ps)
            integrator.setRandomNumberSeed(openmm_seed(self.seed))
            self._md_context = openmm.Context(self._md_system, integrator, self._platform, self._properties)
        return self._md_context

    def relax(self, aa_positions_nm: Any, cg_positions_nm: Any, box_vectors_nm: Any = None) -> np.ndarray:
        """Minimise one frame or a batch of frames (and run ``md_steps`` restrained Langevin steps from each).

        Parameters
        ----------
        aa_positions_nm
            Backmapped atoms, ``(n_atoms, 3)`` or ``(n_frames, n_atoms, 3)``, nm (molecules whole).
        cg_positions_nm
            CG beads the atoms are restrained to, ``(n_beads, 3)`` or ``(n_frames, n_beads, 3)``, nm. A bead is
            restrained to its periodic image nearest to its atoms' centroid.
        box_vectors_nm
            ``(3, 3)`` or ``(n_frames, 3, 3)`` box vectors (rows), nm; required for periodic Systems.

        Returns
        -------
        numpy.ndarray
            Relaxed positions in nm, same shape as ``aa_positions_nm``.
        """
        aa = as_coordinates(aa_positions_nm, self.n_atoms, name="AA positions")
        cg = as_coordinates(cg_positions_nm, self.n_beads, name="CG positions")
        single = aa.ndim == 2
        aa = aa[None] if single else aa
        cg = np.broadcast_to(cg, (len(aa), self.n_beads, 3)) if cg.ndim == 2 else cg
        if len(cg) != len(aa):
            raise ValueError(f"{len(cg)} CG frames for {len(aa)} AA frames")
        boxes = None
        if self.periodic:
            if box_vectors_nm is None:
                raise ValueError("the System is periodic: box_vectors_nm are needed")
            boxes = as_box_vectors(box_vectors_nm)
            boxes = np.broadcast_to(boxes, (len(aa), 3, 3)) if boxes.ndim == 2 else boxes
            if len(boxes) != len(aa):
                raise ValueError(f"{len(boxes)} boxes for {len(aa)} frames")
        contexts = [(self._get_context(), self._system.getForce(self._restraint_index))]
        if self.md_steps:
            contexts.append((self._get_md_context(), self._md_system.getForce(self._md_restraint_index)))
        out = np.empty_like(aa)
        for t in range(len(aa)):
            targets = cg[t]
            if boxes is not None:
                centroids = np.asarray(self._weights @ aa[t])
                targets = centroids + _minimum_image((targets - centroids)[None], boxes[t][None])[0]
            for context, restraint in contexts:
                if boxes is not None:
                    context.setPeriodicBoxVectors(*boxes[t])
                for b in range(self.n_beads):
                    restraint.setBondParameters(b, [b], [float(v) for v in targets[b]])
                restraint.updateParametersInContext(context)
            context = contexts[0][0]
            context.setPositions(aa[t])
            openmm.LocalEnergyMinimizer.minimize(context, self.tolerance_kj_mol_nm, self.max_iterations)
            xyz = context.getState(getPositions=True).getPositions(asNumpy=True)._value
            if self.md_steps and np.all(np.isfinite(xyz)):
                xyz = self._thermalize(contexts[1][0], xyz)
            if not np.all(np.isfinite(xyz)):
                raise FloatingPointError(f"the relaxation of frame {t} produced non-finite coordinates")
            out[t] = xyz
        return out[0] if single else out

    def _thermalize(self, context: openmm.Context, xyz: np.ndarray) -> np.ndarray:
        """``md_steps`` restrained Langevin steps from ``xyz`` (constraints applied first, fresh velocities).

        A run that fails (non-finite state) or whose energy rises by more than ``n_dof kT`` (twice the rise
        equipartition predicts) is rejected: the minimised frame is returned instead and ``md_rejected`` counted.
        It happens when the minimisation left a strained contact that the constraints turn into a collapse (AMBER's
        hydroxyl hydrogens have no Lennard-Jones repulsion): 1 of 400 independent chignolin frames at 50 iterations,
        0 of 10 000 inside the benchmark's chain.
        """
        context.setPositions(xyz)
        context.applyConstraints(1e-6)
        context.setVelocitiesToTemperature(self.temperature_K, openmm_seed(self.seed * 1_000_003 + self._frames_done))
        self._frames_done += 1
        start = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        try:
            context.getIntegrator().step(self.md_steps)
            state = context.getState(getPositions=True, getEnergy=True)
            energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
            out = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
        except openmm.OpenMMException:  # e.g. NaN coordinates
            energy, out = math.nan, None
        limit = self._n_dof * BOLTZMANN_KJ_MOL_K * self.temperature_K
        if out is None or not (np.isfinite(energy) and energy - start <= limit and np.all(np.isfinite(out))):
            self.md_rejected += 1
            return xyz
        return out

    __call__ = relax

    def __repr__(self) -> str:
        return (f"Relaxer({self.n_atoms} atoms, {self.n_beads} beads, max_iterations={self.max_iterations}, "
                f"tolerance_kj_mol_nm={self.tolerance_kj_mol_nm:g}, "
                f"restraint_kj_mol_nm2={self.restraint_kj_mol_nm2:g}, "
                + (f"md_steps={self.md_steps}, temperature_K={self.temperature_K:g}, " if self.md_steps else "")
                + f"platform={self._platform.getName()})")



def as_relaxer(value: Any, backmapper: Any) -> Optional[Relaxer]:
    """``None``, a :class:`Relaxer`, or an AA ``openmm.System`` (a Relaxer with default settings) for ``backmapper``;
    checks that the Relaxer fits the backmapper's atoms and beads."""
    if value is None:
        return None
    if isinstance(value, openmm.System):
        return Relaxer(value, backmapper.mapping, atoms=backmapper.atom_indices)
    if not isinstance(value, Relaxer):
        raise TypeError(f"relax must be None, a Relaxer or an AA openmm.System, got {type(value).__name__}")
    if (value.n_atoms, value.n_beads) != (backmapper.n_atoms, backmapper.n_beads):
        raise ValueError(f"the Relaxer is for {value.n_atoms} atoms and {value.n_beads} beads, the backmapper "
                         f"for {backmapper.n_atoms} atoms and {backmapper.n_beads} beads")
    return value
