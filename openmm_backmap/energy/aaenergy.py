"""AAEnergy: the potential energy of an ``openmm.System`` as a batched, differentiable torch module."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import openmm
import torch

from ._base import EnergyTerm, batch_last
from .bonded import BONDED_TERMS
from .bridge import OpenMMBridge
from .nonbonded import Nonbonded

#: Forces that contribute no potential energy; they are skipped.
NO_ENERGY_FORCES = (
    openmm.CMMotionRemover,
    openmm.MonteCarloBarostat,
    openmm.MonteCarloAnisotropicBarostat,
    openmm.MonteCarloMembraneBarostat,
    openmm.MonteCarloFlexibleBarostat,
    openmm.AndersenThermostat,
)

#: Water and ion residue names left out by :meth:`AAEnergy.solute`.
SOLVENT_RESIDUES = frozenset({"HOH", "WAT", "SOL", "TIP3", "TIP4", "TIP5", "SPC", "NA", "CL", "K", "MG", "CA",
                              "Na+", "Cl-", "K+", "SOD", "CLA", "POT"})


class AAEnergy(torch.nn.Module):
    """Potential energy (kJ/mol) of a batch of configurations under an ``openmm.System``.

    Each force of the System is evaluated natively in torch when a native term exists
    (HarmonicBondForce, HarmonicAngleForce, PeriodicTorsionForce, RBTorsionForce, CMAPTorsionForce,
    NonbondedForce with NoCutoff, CutoffNonPeriodic or CutoffPeriodic), and otherwise exactly through an
    OpenMM Context (:class:`~openmm_backmap.energy.bridge.OpenMMBridge`: GBSAOBCForce, the CustomGBForce of
    GBn2, NonbondedForce with Ewald/PME/LJPME, Custom*Force, ...).  Forces without energy
    (CMMotionRemover, barostats, AndersenThermostat) are skipped.  Nothing is dropped silently: with
    ``bridge=False`` a force without a native term is an error naming it.

    Parameters
    ----------
    system
        The AA System, from any source (ForceField, AMBER prmtop, CHARMM psf, parmed, ...).
    bridge
        Allow forces without a native term to be evaluated through OpenMM.
    platform
        Platform of the bridge's Context (default: chosen by size, see
        :func:`~openmm_backmap.platforms.choose_platform`).
    exclude
        Names of force classes to leave out on purpose (e.g. ``{"CustomExternalForce"}`` for restraints).

    Examples
    --------
    >>> energy = AAEnergy(system)                       # doctest: +SKIP
    >>> u = energy(positions)                           # (B,) kJ/mol, positions (B, n, 3) nm
    >>> f = energy.forces(positions)                    # (B, n, 3) kJ/mol/nm
    >>> energy.terms(positions)["lj"]                   # per-term breakdown
    """

    #: Number of atoms times configurations per chunk of :meth:`energy_and_forces`.
    _CHUNK_ATOMS = 2**14

    def __init__(
        self,
        system: openmm.System,
        *,
        bridge: bool = True,
        platform: str | openmm.Platform | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not isinstance(system, openmm.System):
            raise TypeError(f"AAEnergy needs an openmm.System, got {type(system).__name__}")
        self.n_atoms = system.getNumParticles()
        self.periodic = system.usesPeriodicBoundaryConditions()
        native: list[EnergyTerm] = []
        bridged: list[int] = []
        self.routing: list[tuple[str, str]] = []
        unknown_excludes = set(exclude) - {type(f).__name__ for f in system.getForces()}
        if unknown_excludes:
            raise ValueError(f"exclude names forces the system does not have: {sorted(unknown_excludes)}")
        for index, force in enumerate(system.getForces()):
            name = type(force).__name__
            if isinstance(force, NO_ENERGY_FORCES):
                self.routing.append((name, "skipped (no energy)"))
                continue
            if name in exclude:
                self.routing.append((name, "excluded"))
                continue
            term, reason = _native_term(force, self.n_atoms)
            if term is not None:
                native.append(term)
                self.routing.append((name, "native"))
            elif reason == "empty":
                self.routing.append((name, "skipped (no interactions)"))
            elif bridge:
                bridged.append(index)
                self.routing.append((name, f"OpenMM bridge ({reason})"))
            else:
                raise ValueError(
                    f"{name} (force {index}) has no native torch implementation ({reason}) and bridge=False; "
                    f"allow the OpenMM bridge or exclude it explicitly with exclude={{'{name}'}}"
                )
        self.native = torch.nn.ModuleList(native)
        self.bridge = OpenMMBridge(system, bridged, platform=platform) if bridged else None
        self.register_buffer("_probe", torch.zeros((), dtype=torch.float64), persistent=False)
        self._source = system

    # -- properties ------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._probe.dtype

    @property
    def device(self) -> torch.device:
        return self._probe.device

    @property
    def categories(self) -> tuple[str, ...]:
        cats: list[str] = []
        for term in self.native:
            cats += term.categories
        if self.bridge is not None:
            cats += self.bridge.categories
        return tuple(dict.fromkeys(cats))

    def describe(self) -> str:
        """One line per force of the System: how it is evaluated."""
        return "\n".join(f"{name}: {how}" for name, how in self.routing)

    # -- evaluation ------------------------------------------------------------------------------------
    def _check(self, positions: torch.Tensor, box: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor (nm), got {type(positions).__name__}")
        if positions.ndim != 3 or positions.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape (B, {self.n_atoms}, 3); got {tuple(positions.shape)}")
        if positions.dtype != self.dtype:
            raise TypeError(f"positions are {positions.dtype} but this AAEnergy is {self.dtype}; "
                            f"convert one of them (e.g. energy.to({positions.dtype}))")
        if positions.device != self.device:
            raise ValueError(f"positions are on {positions.device} but this AAEnergy is on {self.device}")
        if not torch.isfinite(positions).all():
            b, i = torch.nonzero(~torch.isfinite(positions).all(-1))[0].tolist()
            raise ValueError(f"positions contain NaN or infinite values (first: configuration {b}, atom {i})")
        if self.periodic:
            if box is None:
                raise ValueError("this system is periodic: box vectors (B, 3, 3) in nm are required")
            if box.ndim == 2:
                box = box.expand(positions.shape[0], 3, 3)
            if box.shape != (positions.shape[0], 3, 3):
                raise ValueError(f"box must have shape ({positions.shape[0]}, 3, 3) or (3, 3); got {tuple(box.shape)}")
            if box.dtype != self.dtype or box.device != self.device:
                raise TypeError(f"box must be {self.dtype} on {self.device}")
            if not torch.isfinite(box).all():
                raise ValueError("box vectors contain NaN or infinite values")
        else:
            box = None
        return positions, box

    def terms(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Energy per term category (``"bond"``, ``"angle"``, ``"torsion"``, ``"cmap"``, ``"lj"``,
        ``"coulomb"``, ``"gb"``, ...), each ``(B,)`` in kJ/mol.

        Parameters
        ----------
        positions
            ``(B, n_atoms, 3)`` in nm, same dtype and device as the module.
        box
            ``(B, 3, 3)`` or ``(3, 3)`` box vectors in nm (rows a, b, c); required for periodic systems.
        """
        return self._terms(*self._check(positions, box))

    def _terms(self, positions: torch.Tensor, box: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """:meth:`terms` of checked inputs."""
        out: dict[str, torch.Tensor] = {}
        coordinates = batch_last(positions)  # once for all native terms
        parts = [term.energy(coordinates, box) for term in self.native]
        if self.bridge is not None:
            parts.append(self.bridge(positions, box))
        for part in parts:
            for category, value in part.items():
                out[category] = out[category] + value if category in out else value
        if not out:
            out["none"] = positions.new_zeros(positions.shape[0])
        return out

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        """Total potential energy ``(B,)`` in kJ/mol (differentiable)."""
        return _total(self.terms(positions, box))

    def energy_and_forces(self, positions: torch.Tensor, box: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies ``(B,)`` (kJ/mol) and forces ``-dU/dx`` ``(B, n, 3)`` (kJ/mol/nm), detached.

        Large batches are evaluated in chunks of configurations (forward and backward pass per chunk, about
        ``2**14`` atoms each), which keeps the intermediates small enough to stay in the CPU's caches.
        """
        positions, box = self._check(positions, box)
        chunk = max(1, self._CHUNK_ATOMS // self.n_atoms)
        chunks = positions.detach().split(chunk)
        boxes = [None] * len(chunks) if box is None else box.split(chunk)
        energies, forces = [], []
        for x, chunk_box in zip(chunks, boxes):
            with torch.enable_grad():
                x = x.requires_grad_(True)
                energy = _total(self._terms(x, chunk_box))
                (grad,) = torch.autograd.grad(energy.sum(), x)
            energies.append(energy.detach())
            forces.append(-grad)
        if len(chunks) == 1:
            return energies[0], forces[0]
        return torch.cat(energies), torch.cat(forces)

    def forces(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        """Forces ``-dU/dx`` ``(B, n, 3)`` in kJ/mol/nm (detached)."""
        return self.energy_and_forces(positions, box)[1]

    # -- restricted views ------------------------------------------------------------------------------
    def subset(self, atom_indices: Sequence[int], environment: Sequence[int] | None = None) -> "AAEnergy":
        """Energy of a subset of atoms together with its interactions with a fixed environment.

        The returned module takes positions ``(B, len(atom_indices) + len(environment), 3)``: the subset's
        atoms first, in the given order, then the environment's.  It counts every interaction (bond, angle,
        torsion, pair, exception) whose atoms all lie in subset ∪ environment and at least one in the
        subset: interactions inside the environment are left out.  DBM's local prior over one bead's atoms
        and their neighbours is ``energy.subset(bead_atoms, neighbour_atoms)``.  The long-range dispersion
        correction (a whole-box term) is dropped.

        Raises
        ------
        ValueError
            Bad indices, or forces evaluated through the OpenMM bridge (their energies, e.g. Generalized
            Born, do not decompose into interactions of a subset).
        """
        sub = np.asarray(atom_indices, dtype=np.int64).reshape(-1)
        env = np.asarray(environment if environment is not None else [], dtype=np.int64).reshape(-1)
        both = np.concatenate([sub, env])
        if both.size == 0:
            raise ValueError("the subset is empty")
        if both.min() < 0 or both.max() >= self.n_atoms:
            raise ValueError(f"atom indices must lie in [0, {self.n_atoms}); got {both.min()}..{both.max()}")
        if np.unique(both).size != both.size:
            raise ValueError("atom_indices and environment must not repeat atoms or overlap")
        if self.bridge is not None:
            raise ValueError(
                f"cannot restrict {', '.join(self.bridge.force_names)} to a subset: it is evaluated through the "
                f"OpenMM bridge as a whole (use solute(..., vacuum=True) for PME systems)"
            )
        new_index = np.full(self.n_atoms, -1, dtype=np.int64)
        new_index[both] = np.arange(both.size)
        in_subset = np.zeros(self.n_atoms, dtype=bool)
        in_subset[sub] = True
        terms = [t.subset(new_index, in_subset) for t in self.native]
        return self._view([t for t in terms if t is not None], both.size)

    def solute(self, topology: openmm.app.Topology, *, vacuum: bool = True) -> tuple["AAEnergy", np.ndarray]:
        """Energy of the solute alone (water and ions removed), e.g. for backmapping without solvent.

        Parameters
        ----------
        topology
            The System's topology (to find water and ions by residue name).
        vacuum
            Evaluate the solute's nonbonded interactions without cutoff or periodicity (plain Coulomb and
            LJ, with the System's exceptions).  Required for Ewald/PME systems, whose solvent-free energy has
            no periodic meaning; implicit-solvent (GB) systems have no water to remove.

        Returns
        -------
        (AAEnergy, numpy.ndarray)
            The solute-only module (positions ``(B, n_solute, 3)``) and the solute atom indices.
        """
        if topology.getNumAtoms() != self.n_atoms:
            raise ValueError(f"topology has {topology.getNumAtoms()} atoms, the system {self.n_atoms}")
        solute = np.array([a.index for a in topology.atoms() if a.residue.name not in SOLVENT_RESIDUES])
        if solute.size == 0:
            raise ValueError("the topology has no solute atoms (only water/ions)")
        if solute.size == self.n_atoms and not vacuum:
            return self, solute
        system = self._source
        new_index = np.full(self.n_atoms, -1, dtype=np.int64)
        new_index[solute] = np.arange(solute.size)
        in_subset = new_index >= 0
        terms: list[EnergyTerm] = []
        for force in system.getForces():
            if isinstance(force, NO_ENERGY_FORCES):
                continue
            if isinstance(force, openmm.NonbondedForce):
                term = Nonbonded.from_force(force, self.n_atoms, method="nocutoff") if vacuum else None
                if term is None and not vacuum:
                    raise ValueError("solute(vacuum=False) is not supported for a NonbondedForce")
            else:
                term, reason = _native_term(force, self.n_atoms)
                if term is None and reason != "empty":
                    raise ValueError(f"{type(force).__name__} has no native term ({reason}); cannot take the "
                                     f"solute alone")
            if term is not None:
                term = term.subset(new_index, in_subset)
                if term is not None:
                    terms.append(term)
        return self._view(terms, solute.size, periodic=False), solute

    def _view(self, terms: list[EnergyTerm], n_atoms: int, periodic: bool | None = None) -> "AAEnergy":
        view = AAEnergy.__new__(AAEnergy)
        torch.nn.Module.__init__(view)
        view.n_atoms = n_atoms
        view.periodic = self.periodic if periodic is None else periodic
        view.native = torch.nn.ModuleList(terms)
        view.bridge = None
        view.routing = [(type(t).__name__, "native") for t in terms]
        view.register_buffer("_probe", torch.zeros((), dtype=torch.float64), persistent=False)
        view._source = self._source
        return view.to(dtype=self.dtype, device=self.device)

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, periodic={self.periodic}, categories={self.categories}"


def _total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the energies ``(B,)`` of all term categories."""
    return torch.stack(list(terms.values())).sum(0)


def _native_term(force: openmm.Force, n_atoms: int) -> tuple[EnergyTerm | None, str]:
    """A native term for ``force``, or (None, reason)."""
    cls = BONDED_TERMS.get(type(force))
    if cls is not None:
        term = cls.from_force(force)
        return (term, "") if term is not None else (None, "empty")
    if isinstance(force, openmm.NonbondedForce):
        try:
            return Nonbonded.from_force(force, n_atoms), ""
        except NotImplementedError as exc:
            return None, str(exc)
    return None, "no native term for this force class"


def as_tensor(positions: Any, energy: AAEnergy) -> torch.Tensor:
    """Convenience: numpy/Quantity positions (nm) to a ``(B, n, 3)`` tensor matching ``energy``."""
    from .._validation import as_coordinates

    arr = as_coordinates(positions, energy.n_atoms, name="positions")
    if arr.ndim == 2:
        arr = arr[None]
    return torch.as_tensor(arr, dtype=energy.dtype, device=energy.device)
