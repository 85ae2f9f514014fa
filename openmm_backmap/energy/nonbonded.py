"""Lennard-Jones and Coulomb interactions of an ``openmm.NonbondedForce`` in batched, differentiable torch.

:class:`Nonbonded` reproduces OpenMM's Reference platform for the ``NoCutoff``, ``CutoffNonPeriodic`` and
``CutoffPeriodic`` methods (Ewald, PME and LJPME need a reciprocal-space sum and go through the OpenMM
bridge).  With charges ``q`` (e), ``sigma`` (nm) and ``epsilon`` (kJ/mol) per atom, every pair ``i < j``
without an exception contributes

* Lennard-Jones ``4 eps (s^12/r^12 - s^6/r^6)`` with Lorentz–Berthelot combining, ``s = (s_i + s_j)/2``
  and ``eps = sqrt(eps_i eps_j)``, multiplied by OpenMM's switching function
  ``S(x) = 1 - 10x^3 + 15x^4 - 6x^5``, ``x = (r - r_switch)/(r_cut - r_switch)``, beyond ``r_switch`` when
  the force uses one (cutoff methods only);
* Coulomb ``ONE_4PI_EPS0 q_i q_j / r`` without cutoff, or with a cutoff the reaction-field form
  ``ONE_4PI_EPS0 q_i q_j (1/r + k_rf r^2 - c_rf)`` with ``k_rf = (eps_rf - 1)/((2 eps_rf + 1) r_cut^3)``,
  ``c_rf = 3 eps_rf/((2 eps_rf + 1) r_cut)`` (``eps_rf``: the force's reaction-field dielectric);

pairs at ``r >= r_cut`` contribute nothing.  Exceptions (pairs with their own ``chargeProd``, ``sigma``,
``epsilon``) replace the pair interaction and are evaluated, as in OpenMM, as plain Coulomb plus
Lennard-Jones *without* cutoff, reaction field or switching, for every method; they use the
minimum-image convention only when the force's ``getExceptionsUsePeriodicBoundaryConditions()`` is set
(and the method is periodic).  Exceptions with ``chargeProd = epsilon = 0`` are pure exclusions.  For
``CutoffPeriodic`` with ``getUseDispersionCorrection()`` the isotropic long-range correction
``C / V`` (``V = a_x b_y c_z``, the box volume of the configuration) is added to the Lennard-Jones energy,
with ``C`` computed as in OpenMM's ``NonbondedForceImpl::calcDispersionCorrection`` (including the
switching-function integral).
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import openmm
import torch
from openmm import unit
from torch.utils.checkpoint import checkpoint

from ._base import ONE_4PI_EPS0, EnergyTerm, batch_last, bond_vectors, dot, keep_interactions

#: Nonbonded methods with a native implementation.
NO_CUTOFF, CUTOFF_NON_PERIODIC, CUTOFF_PERIODIC = "NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic"
_METHOD_NAMES = {
    openmm.NonbondedForce.NoCutoff: NO_CUTOFF,
    openmm.NonbondedForce.CutoffNonPeriodic: CUTOFF_NON_PERIODIC,
    openmm.NonbondedForce.CutoffPeriodic: CUTOFF_PERIODIC,
    openmm.NonbondedForce.Ewald: "Ewald",
    openmm.NonbondedForce.PME: "PME",
    openmm.NonbondedForce.LJPME: "LJPME",
}
#: Units of (charge, sigma, epsilon) and of (chargeProd, sigma, epsilon).
_UNITS = (unit.elementary_charge, unit.nanometer, unit.kilojoule_per_mole)
_EXCEPTION_UNITS = (unit.elementary_charge**2, unit.nanometer, unit.kilojoule_per_mole)


class Nonbonded(EnergyTerm):
    """Batched Lennard-Jones (``"lj"``) and Coulomb (``"coulomb"``) energies of an OpenMM NonbondedForce.

    Build it with :meth:`from_force`.  Pairs evaluated as plain Coulomb plus Lennard-Jones without cutoff
    are *listed*: their atoms and coefficients are stored and evaluated in chunks of about
    ``pair_block_size`` (configuration, pair) distances.  These are the exceptions and, for ``NoCutoff``
    with at most ``pair_block_size`` atom pairs, all normal pairs as well (a small system's whole energy is
    then a few gathers and elementwise operations).  Otherwise normal pairs are enumerated on the fly in
    blocks of rows of the upper triangle (exception pairs and, in subsets, pairs outside the subset rule
    masked out), so no ``O(n^2)`` pair list is stored.  With a cutoff, each block's distances are first
    computed without gradient to select the pairs (configuration, i, j) inside the cutoff; the energy and
    its gradient are then evaluated exactly on the selected pairs only (every pair takes part in every
    configuration without a cutoff).  Once more than ``max_saved_pairs`` (configuration, pair) energies are
    kept for a gradient, further chunks and blocks are checkpointed (recomputed in the backward pass), so
    memory stays bounded rather than growing with the number of pairs.

    Parameters
    ----------
    charge, sigma, epsilon
        ``(n_atoms,)`` per-atom charge (e), sigma (nm) and epsilon (kJ/mol).
    exclusions
        ``(E, 2)`` atom pairs removed from the normal pair sum (every exception, including those with
        parameters).
    exception_atoms, exception_params
        ``(M, 2)`` atom pairs and ``(M, 3)`` ``(chargeProd (e^2), sigma (nm), epsilon (kJ/mol))`` of the
        exceptions that interact.
    method
        ``"NoCutoff"``, ``"CutoffNonPeriodic"`` or ``"CutoffPeriodic"``.
    cutoff
        Cutoff distance (nm); ignored for ``"NoCutoff"``.
    reaction_field_dielectric
        Dielectric constant of the reaction field beyond the cutoff.
    switch_distance
        Start of the Lennard-Jones switching function (nm), or ``None`` for no switch.
    dispersion_coefficient
        ``C`` (kJ/mol nm^3) of the long-range dispersion correction ``C / V``; 0 for none.
    exceptions_periodic
        Apply the minimum-image convention to exceptions (``"CutoffPeriodic"`` only).
    active
        ``(L, n_atoms)`` bool: a normal pair ``(i, j)`` counts only if ``active[l, i] | active[l, j]`` for
        every ``l`` (one row per :meth:`subset`; no rows for a whole force).
    pair_block_size
        Number of (configuration, pair) distances evaluated at a time; also the largest number of atom
        pairs of a ``NoCutoff`` force that are listed.
    max_saved_pairs
        Number of (configuration, pair) energies whose intermediates are kept for the backward pass;
        beyond it, blocks are checkpointed (recomputed during the backward pass).  Together with
        ``pair_block_size`` this bounds the memory of a differentiable forward call.
    """

    categories = ("lj", "coulomb")

    def __init__(
        self,
        charge: np.ndarray,
        sigma: np.ndarray,
        epsilon: np.ndarray,
        exclusions: np.ndarray,
        exception_atoms: np.ndarray,
        exception_params: np.ndarray,
        *,
        method: str = NO_CUTOFF,
        cutoff: float = 1.0,
        reaction_field_dielectric: float = 78.3,
        switch_distance: float | None = None,
        dispersion_coefficient: float = 0.0,
        exceptions_periodic: bool = False,
        active: np.ndarray | None = None,
        pair_block_size: int = 2**18,
        max_saved_pairs: int = 2**22,
    ) -> None:
        super().__init__()
        if method not in (NO_CUTOFF, CUTOFF_NON_PERIODIC, CUTOFF_PERIODIC):
            raise ValueError(f"method must be NoCutoff, CutoffNonPeriodic or CutoffPeriodic; got {method!r}")
        self.n_atoms = len(charge)
        self.method = method
        self.cutoff = float(cutoff)
        self.switch_distance = None if switch_distance is None or method == NO_CUTOFF else float(switch_distance)
        eps_rf = float(reaction_field_dielectric)
        self.k_rf = (eps_rf - 1.0) / ((2.0 * eps_rf + 1.0) * self.cutoff**3)
        self.c_rf = 3.0 * eps_rf / ((2.0 * eps_rf + 1.0) * self.cutoff)
        self.reaction_field_dielectric = eps_rf
        self.dispersion_coefficient = float(dispersion_coefficient) if method == CUTOFF_PERIODIC else 0.0
        self.exceptions_periodic = bool(exceptions_periodic) and method == CUTOFF_PERIODIC
        self.pair_block_size = int(pair_block_size)
        self.max_saved_pairs = int(max_saved_pairs)

        for name, values in (("charge", charge), ("sigma", sigma), ("epsilon", epsilon)):
            self.register_buffer(name, torch.as_tensor(np.asarray(values, dtype=np.float64)))
        pairs = np.sort(np.asarray(exclusions, dtype=np.int64).reshape(-1, 2), axis=1)
        pairs = np.unique(pairs, axis=0)  # sorted by first atom, then second
        self.register_buffer("exclusions", torch.as_tensor(pairs))
        #: Row pointer of the exclusions by first atom: exclusions[ptr[i]:ptr[i + 1]] start at atom i.
        self._exclusion_ptr = np.searchsorted(pairs[:, 0], np.arange(self.n_atoms + 1))
        self.register_buffer("exception_atoms",
                             torch.as_tensor(np.asarray(exception_atoms, dtype=np.int64).reshape(-1, 2)))
        self.register_buffer("exception_params",
                             torch.as_tensor(np.asarray(exception_params, dtype=np.float64).reshape(-1, 3)))
        active = np.zeros((0, self.n_atoms), dtype=bool) if active is None else np.asarray(active, dtype=bool)
        self.register_buffer("active", torch.as_tensor(active.reshape(-1, self.n_atoms)))

        params = self.exception_params
        listed_atoms = [self.exception_atoms]
        listed = [torch.stack([ONE_4PI_EPS0 * params[:, 0], params[:, 1] ** 2, 4.0 * params[:, 2]])]
        #: Whether the normal pairs are listed too (instead of enumerated in row blocks).
        self.normal_pairs_listed = method == NO_CUTOFF and self.n_atoms * (self.n_atoms - 1) <= 2 * pair_block_size
        if self.normal_pairs_listed:
            i, j = self._pair_mask(0, self.n_atoms).nonzero(as_tuple=True)
            listed_atoms.insert(0, torch.stack([i, j], dim=1))
            listed.insert(0, self._normal_coefficients(i, j))
        #: Listed pairs ``(P, 2)`` and their coefficients ``(3, P)``: Coulomb prefactor
        #: ``ONE_4PI_EPS0 * chargeProd`` (kJ/mol nm), ``sigma^2`` (nm^2), ``4 epsilon`` (kJ/mol).
        self.register_buffer("listed_atoms", torch.cat(listed_atoms))
        self.register_buffer("listed_coefficients", torch.cat(listed, dim=1))

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_force(cls, force: openmm.NonbondedForce, n_atoms: int, method: str | None = None,
                   **kwargs: object) -> "Nonbonded":
        """Build the term from an OpenMM NonbondedForce.

        Parameters
        ----------
        force
            The force.  Its nonbonded method must be NoCutoff, CutoffNonPeriodic or CutoffPeriodic unless
            ``method="nocutoff"``.
        n_atoms
            Number of particles of the System (must equal the force's).
        method
            ``None``: the force's own method.  ``"nocutoff"``: evaluate the same charges, Lennard-Jones
            parameters and exceptions in vacuum (plain Coulomb and Lennard-Jones between all pairs, no
            cutoff, reaction field, switching, periodicity or dispersion correction), whatever the force's
            method, Ewald/PME included -- e.g. for the energy of a solute with the water of a PME system
            removed (combine with :meth:`subset`).
        **kwargs
            Passed to the constructor (e.g. ``pair_block_size``).

        Raises
        ------
        NotImplementedError
            For Ewald, PME and LJPME (without ``method="nocutoff"``), for parameter offsets (charges,
            sigmas or epsilons that depend on global parameters), and for a force that leaves out its
            direct-space interactions.
        """
        if force.getNumParticles() != n_atoms:
            raise ValueError(f"the NonbondedForce has {force.getNumParticles()} particles, the System {n_atoms}")
        if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
            raise NotImplementedError(
                f"NonbondedForce with parameter offsets ({force.getNumParticleParameterOffsets()} particle, "
                f"{force.getNumExceptionParameterOffsets()} exception offsets: charges/sigmas/epsilons that "
                f"depend on global parameters) has no native term; evaluate it through the OpenMM bridge"
            )
        if not force.getIncludeDirectSpace():
            raise NotImplementedError("NonbondedForce with includeDirectSpace=False has no native term")
        name = _METHOD_NAMES[force.getNonbondedMethod()]
        if method is not None:
            if method.lower() != "nocutoff":
                raise ValueError(f"method must be None or 'nocutoff'; got {method!r}")
            name = NO_CUTOFF
        elif name not in (NO_CUTOFF, CUTOFF_NON_PERIODIC, CUTOFF_PERIODIC):
            raise NotImplementedError(
                f"NonbondedForce with nonbonded method {name} has no native term: its reciprocal-space sum "
                f"needs the OpenMM bridge (native methods: NoCutoff, CutoffNonPeriodic, CutoffPeriodic; "
                f"method='nocutoff' evaluates the same interactions in vacuum)"
            )
        params = np.zeros((n_atoms, 3), dtype=np.float64)
        for i in range(n_atoms):
            params[i] = [q.value_in_unit(u) for q, u in zip(force.getParticleParameters(i), _UNITS)]
        exception_atoms = np.zeros((force.getNumExceptions(), 2), dtype=np.int64)
        exception_params = np.zeros((force.getNumExceptions(), 3), dtype=np.float64)
        for k in range(force.getNumExceptions()):
            i, j, *values = force.getExceptionParameters(k)
            exception_atoms[k] = i, j
            exception_params[k] = [q.value_in_unit(u) for q, u in zip(values, _EXCEPTION_UNITS)]
        interacting = (exception_params[:, 0] != 0) | (exception_params[:, 2] != 0)
        cutoff = force.getCutoffDistance().value_in_unit(unit.nanometer)
        switch = (force.getSwitchingDistance().value_in_unit(unit.nanometer)
                  if force.getUseSwitchingFunction() else None)
        dispersion = 0.0
        if name == CUTOFF_PERIODIC and force.getUseDispersionCorrection():
            dispersion = dispersion_coefficient(params[:, 1], params[:, 2], cutoff, switch)
        return cls(
            params[:, 0], params[:, 1], params[:, 2], exception_atoms,
            exception_atoms[interacting], exception_params[interacting],
            method=name,
            cutoff=cutoff,
            reaction_field_dielectric=force.getReactionFieldDielectric(),
            switch_distance=switch,
            dispersion_coefficient=dispersion,
            exceptions_periodic=force.getExceptionsUsePeriodicBoundaryConditions(),
            **kwargs,
        )

    def extra_repr(self) -> str:
        cutoff = "" if self.method == NO_CUTOFF else f", cutoff={self.cutoff}, switch={self.switch_distance}"
        return (f"n_atoms={self.n_atoms}, method={self.method}{cutoff}, "
                f"num_exceptions={self.exception_atoms.shape[0]}, "
                f"dispersion_correction={self.dispersion_coefficient != 0.0}")

    # -- evaluation ------------------------------------------------------------------------------------
    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Lennard-Jones and Coulomb energies.

        Parameters
        ----------
        positions
            ``(B, n_atoms, 3)`` in nm; the energies are computed in its dtype, on its device.
        box
            ``(B, 3, 3)`` box vectors in nm (rows a, b, c, OpenMM's reduced form); required for
            ``CutoffPeriodic``, ignored otherwise.

        Returns
        -------
        dict
            ``"lj"`` and ``"coulomb"``: ``(B,)`` in kJ/mol.
        """
        if positions.ndim != 3 or positions.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape (B, {self.n_atoms}, 3); got {tuple(positions.shape)}")
        return self.energy(batch_last(positions), box)

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Lennard-Jones and Coulomb energies ``(B,)`` of coordinates ``(3, n_atoms, B)``; see :meth:`forward`."""
        if self.method == CUTOFF_PERIODIC:
            if box is None:
                raise ValueError("a CutoffPeriodic NonbondedForce needs box vectors (B, 3, 3) in nm")
            box = box.to(coordinates.dtype)
            diagonal = torch.diagonal(box, dim1=-2, dim2=-1)
            if bool((diagonal < 1.999999 * self.cutoff).any()):
                raise ValueError(f"the periodic box is smaller than twice the nonbonded cutoff ({self.cutoff} nm)")
        else:
            box = None
        differentiable = torch.is_grad_enabled() and (
            coordinates.requires_grad or (box is not None and box.requires_grad))
        lj = coulomb = coordinates.new_zeros(coordinates.shape[-1])
        saved = 0
        for size, function, *args in self._pieces(coordinates, box):
            saved += size
            if differentiable and saved > self.max_saved_pairs:
                lj_piece, coulomb_piece = checkpoint(function, *args, use_reentrant=False)
            else:
                lj_piece, coulomb_piece = function(*args)
            lj = lj + lj_piece
            coulomb = coulomb + coulomb_piece
        if self.dispersion_coefficient:
            lj = lj + self.dispersion_coefficient / (box[:, 0, 0] * box[:, 1, 1] * box[:, 2, 2])
        return {"lj": lj, "coulomb": coulomb}

    def _pieces(self, coordinates: torch.Tensor, box: torch.Tensor | None) -> Iterator[tuple]:
        """The pair evaluations of one call, one at a time: ``(size, function, *args)``, ``function(*args)``
        being the Lennard-Jones and Coulomb energies ``(B,)`` of ``size`` (about ``pair_block_size`` at
        most) (configuration, pair) distances."""
        n_batch = coordinates.shape[-1]
        chunk = max(1, self.pair_block_size // n_batch)
        listed_box = box if self.exceptions_periodic else None
        for start in range(0, self.listed_atoms.shape[0], chunk):
            atoms = self.listed_atoms[start:start + chunk]
            yield (n_batch * atoms.shape[0], self._plain_energy, coordinates, listed_box, atoms,
                   self.listed_coefficients[:, start:start + chunk])
        if self.normal_pairs_listed:
            return
        if self.method == NO_CUTOFF:
            for start, stop in self._row_blocks(n_batch):
                i, j = self._pair_mask(start, stop).nonzero(as_tuple=True)
                i, j = i + start, j + start
                yield (n_batch * i.shape[0], self._plain_energy, coordinates, None, torch.stack([i, j], dim=1),
                       self._normal_coefficients(i, j))
            return
        # Cutoff methods: components (B, 3, n) for the pair selection and the (configuration, i, j) gathers.
        x = coordinates.permute(2, 0, 1).contiguous()
        skewed = box is not None and bool((box[:, 1, 0] != 0).any() or (box[:, 2, :2] != 0).any())
        for start, stop in self._row_blocks(n_batch):
            config, i, j, shift = self._block_pairs(x.detach(), None if box is None else box.detach(), skewed,
                                                    start, stop)
            if config.numel():
                yield config.shape[0], self._cutoff_energy, x, box, skewed, config, i, j, shift

    def _row_blocks(self, n_batch: int) -> list[tuple[int, int]]:
        """Ranges of first atoms ``[start, stop)`` whose pairs ``i < j`` fill about ``pair_block_size``."""
        blocks = []
        start = 0
        while start < self.n_atoms - 1:
            rows = max(1, self.pair_block_size // (n_batch * (self.n_atoms - start)))
            blocks.append((start, min(start + rows, self.n_atoms - 1)))
            start = blocks[-1][1]
        return blocks

    def _pair_mask(self, start: int, stop: int) -> torch.Tensor:
        """``(stop - start, n_atoms - start)`` bool: normal pairs ``(i, j)``, ``start <= i < stop``,
        ``j >= start``, that count: ``i < j``, not excluded, subset rule satisfied."""
        device = self.charge.device
        rows = torch.arange(start, stop, device=device)
        columns = torch.arange(start, self.n_atoms, device=device)
        mask = columns[None, :] > rows[:, None]
        if self.active.shape[0]:
            mask &= (self.active[:, start:stop, None] | self.active[:, None, start:]).all(0)
        excluded = self.exclusions[self._exclusion_ptr[start]:self._exclusion_ptr[stop]]
        mask[excluded[:, 0] - start, excluded[:, 1] - start] = False
        return mask

    @torch.no_grad()
    def _block_pairs(self, x: torch.Tensor, box: torch.Tensor | None, skewed: bool, start: int,
                     stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pairs of one row block closer than the cutoff, from coordinates ``x (B, 3, n)``.

        Returns the flat triples ``(configuration, i, j)`` and, with a box, their minimum-image shifts
        ``(Q, 3)``: ``r_j - r_i - shift @ box`` is the vector of
        :func:`~openmm_backmap.energy._base.minimum_image`.  ``skewed``: the box has off-diagonal elements.
        """
        mask = self._pair_mask(start, stop)
        # Components of r_j - r_i over the (B, rows, columns) block, each contiguous.
        d = [x[:, k, None, start:] - x[:, k, start:stop, None] for k in range(3)]
        shifts = []
        if box is not None:
            for k in (2, 1, 0):
                shifts.insert(0, torch.round(d[k] / box[:, k, k, None, None]))
                for m in range(k + 1) if skewed else (k,):
                    d[m].addcmul_(shifts[0], box[:, k, m, None, None], value=-1.0)
        r2 = d[0].square_().addcmul_(d[1], d[1]).addcmul_(d[2], d[2])
        config, i, j = ((r2 < self.cutoff**2) & mask).nonzero(as_tuple=True)
        shift = torch.stack([s[config, i, j] for s in shifts], dim=-1) if shifts else None
        return config, i + start, j + start, shift

    def _normal_coefficients(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(3, P)`` (as :attr:`listed_coefficients`) of normal pairs ``(i, j)``: products of
        charges, Lorentz–Berthelot combined sigma and epsilon."""
        return torch.stack([ONE_4PI_EPS0 * self.charge[i] * self.charge[j],
                            (0.5 * (self.sigma[i] + self.sigma[j])) ** 2,
                            4.0 * torch.sqrt(self.epsilon[i] * self.epsilon[j])])

    @staticmethod
    def _plain_energy(coordinates: torch.Tensor, box: torch.Tensor | None, atoms: torch.Tensor,
                       coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain Lennard-Jones and Coulomb energies ``(B,)`` (no cutoff) of the pairs ``atoms (P, 2)`` with
        coefficients ``(3, P)`` (see :attr:`listed_coefficients`); minimum image if ``box``."""
        c = coefficients.to(coordinates.dtype)
        d = bond_vectors(coordinates, atoms[:, 0], atoms[:, 1], box).unbind(0)
        inv_r = torch.rsqrt(dot(d, d))
        return c[2] @ _lennard_jones(inv_r.square(), c[1, :, None]), c[0] @ inv_r

    def _cutoff_energy(self, x: torch.Tensor, box: torch.Tensor | None, skewed: bool, config: torch.Tensor,
                       i: torch.Tensor, j: torch.Tensor, shift: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Switched Lennard-Jones and reaction-field Coulomb energies ``(B,)`` of the normal pairs
        ``(config, i, j)`` of coordinates ``x (B, 3, n)`` selected by :meth:`_block_pairs`."""
        c = self._normal_coefficients(i, j).to(x.dtype)
        d = [x[config, k, j] - x[config, k, i] for k in range(3)]
        if shift is not None:
            for m in range(3):
                for k in range(m + 1) if skewed else (m,):
                    d[k] = d[k] - shift[:, m] * box[config, m, k]
        r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        inv_r = torch.rsqrt(r2)
        lj = c[2] * _lennard_jones(inv_r.square(), c[1])
        if self.switch_distance is not None:
            t = ((r2 * inv_r - self.switch_distance) / (self.cutoff - self.switch_distance)).clamp(min=0.0)
            lj = lj * (1.0 + t**3 * (-10.0 + t * (15.0 - 6.0 * t)))
        coulomb = c[0] * (inv_r + self.k_rf * r2 - self.c_rf)
        zeros = x.new_zeros(x.shape[0])
        return zeros.index_add(0, config, lj), zeros.index_add(0, config, coulomb)

    # -- restriction -----------------------------------------------------------------------------------
    def subset(self, new_index: np.ndarray, in_subset: np.ndarray) -> "Nonbonded | None":
        """The same interactions restricted to a subset of atoms; see :meth:`EnergyTerm.subset`.

        Normal pairs and exceptions are kept when both atoms have ``new_index >= 0`` and at least one is
        ``in_subset``.  The long-range dispersion correction is a property of the whole periodic box and
        is dropped.  Returns ``None`` when no pair is left.
        """
        new_index = np.asarray(new_index, dtype=np.int64)
        in_subset = np.asarray(in_subset, dtype=bool)
        if new_index.shape != (self.n_atoms,) or in_subset.shape != (self.n_atoms,):
            raise ValueError(f"new_index and in_subset must have shape ({self.n_atoms},)")
        kept = np.flatnonzero(new_index >= 0)
        if kept.size == 0:
            return None
        n_new = int(new_index.max()) + 1
        target = new_index[kept]

        def reindexed(values: np.ndarray) -> np.ndarray:
            out = np.zeros((n_new,) + values.shape[1:], dtype=values.dtype)
            out[target] = values[kept]
            return out

        charge, sigma, epsilon = (reindexed(getattr(self, name).cpu().numpy())
                                  for name in ("charge", "sigma", "epsilon"))
        active = reindexed(self.active.cpu().numpy().T).T
        active = active[~active[:, target].all(axis=1)]
        if not in_subset[kept].all():
            active = np.concatenate([active, reindexed(in_subset)[None]])
        exclusions = self.exclusions.cpu().numpy()
        exclusions = new_index[exclusions[(new_index[exclusions] >= 0).all(axis=1)]]
        exception_atoms = self.exception_atoms.cpu().numpy()
        keep = keep_interactions(exception_atoms, new_index, in_subset)
        term = type(self)(
            charge, sigma, epsilon, exclusions,
            new_index[exception_atoms[keep]], self.exception_params.cpu().numpy()[keep],
            method=self.method,
            cutoff=self.cutoff,
            reaction_field_dielectric=self.reaction_field_dielectric,
            switch_distance=self.switch_distance,
            exceptions_periodic=self.exceptions_periodic,
            active=active,
            pair_block_size=self.pair_block_size,
            max_saved_pairs=self.max_saved_pairs,
        )
        if not keep.any() and not any(term._pair_mask(a, b).any() for a, b in term._row_blocks(1)):
            return None
        return term.to(device=self.charge.device, dtype=self.charge.dtype)


def _lennard_jones(inv_r2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``(s/r)^12 - (s/r)^6`` (times ``4 epsilon``: the Lennard-Jones energy) from ``1/r^2`` and ``s^2``."""
    s6 = (sigma2 * inv_r2) ** 3
    return s6 * s6 - s6


def dispersion_coefficient(sigma: np.ndarray, epsilon: np.ndarray, cutoff: float,
                           switch_distance: float | None) -> float:
    """Coefficient ``C`` (kJ/mol nm^3) of OpenMM's long-range dispersion correction ``E = C / V``.

    A port of ``NonbondedForceImpl::calcDispersionCorrection``: the Lennard-Jones tail beyond the cutoff
    (and, with a switch, the part removed by the switching function) averaged over all atom pairs
    ``i <= j`` with Lorentz–Berthelot combining.

    Parameters
    ----------
    sigma, epsilon
        ``(n_atoms,)`` per-atom sigma (nm) and epsilon (kJ/mol).
    cutoff
        Cutoff distance (nm).
    switch_distance
        Start of the switching function (nm), or ``None``.
    """
    classes, counts = np.unique(np.stack([sigma, epsilon], axis=1), axis=0, return_counts=True)
    counts = counts.astype(np.float64)
    pair_sigma = 0.5 * (classes[:, None, 0] + classes[None, :, 0])
    pair_epsilon = np.sqrt(classes[:, None, 1] * classes[None, :, 1])
    # Each unordered pair of classes once; pairs within a class, self-pairs included: c (c + 1) / 2.
    weight = np.triu(counts[:, None] * counts[None, :], k=1)
    weight[np.diag_indices_from(weight)] = counts * (counts + 1) / 2
    weight = weight * pair_epsilon
    sigma6 = pair_sigma**6
    sum1 = np.sum(weight * sigma6 * sigma6)
    sum2 = np.sum(weight * sigma6)
    sum3 = 0.0
    if switch_distance is not None:
        sum3 = np.sum(weight * (_switch_integral(cutoff, switch_distance, cutoff, pair_sigma)
                                - _switch_integral(switch_distance, switch_distance, cutoff, pair_sigma)))
    n = float(len(sigma))
    n_interactions = n * (n + 1) / 2
    return float(8 * n * n * math.pi * (sum1 / (9 * cutoff**9) - sum2 / (3 * cutoff**3) + sum3) / n_interactions)


def _switch_integral(r: float, rs: float, rc: float, sigma: np.ndarray) -> np.ndarray:
    """OpenMM's ``NonbondedForceImpl::evalIntegral``: antiderivative at ``r`` of the Lennard-Jones
    interaction times the switching function (``rs``: switch start, ``rc``: cutoff), per ``sigma``."""
    a = 1 / (rc - rs)
    a2, a3 = a * a, a * a * a
    sig6 = sigma**6
    rs2, rs3 = rs * rs, rs**3
    r2, r3, r4, r5, r6, r9 = r * r, r**3, r**4, r**5, r**6, r**9
    return sig6 * a3 * ((
        sig6 * (
            + rs3 * 28 * (6 * rs2 * a2 + 15 * rs * a + 10)
            - r * rs2 * 945 * (rs2 * a2 + 2 * rs * a + 1)
            + r2 * rs * 1080 * (2 * rs2 * a2 + 3 * rs * a + 1)
            - r3 * 420 * (6 * rs2 * a2 + 6 * rs * a + 1)
            + r4 * 756 * (2 * rs * a2 + a)
            - r5 * 378 * a2)
        - r6 * (
            + rs3 * 84 * (6 * rs2 * a2 + 15 * rs * a + 10)
            - r * rs2 * 3780 * (rs2 * a2 + 2 * rs * a + 1)
            + r2 * rs * 7560 * (2 * rs2 * a2 + 3 * rs * a + 1))
    ) / (252 * r9)
        - math.log(r) * 10 * (6 * rs2 * a2 + 6 * rs * a + 1)
        + r * 15 * (2 * rs * a2 + a)
        - r2 * 3 * a2)
