"""CGPotential: physical priors + a neural network, one energy for CG configurations."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .neighbors import neighbor_pairs, select_pairs
from .priors import _difference_vectors, _scatter_forces

FORMAT = "openmm-backmap-cg-potential"
FORMAT_VERSION = 1


def _term_classes() -> dict[str, type]:
    """Classes a potential file may name.  Files name classes from this list only: loading never runs code."""
    from . import priors, schnet

    classes = [priors.HarmonicBondPrior, priors.HarmonicAnglePrior, priors.CosineAnglePrior,
               priors.FourierDihedralPrior,
               priors.ExcludedVolumePrior, priors.NeighborExcludedVolumePrior, schnet.SchNet]
    return {cls.__name__: cls for cls in classes}


class CGPotential(torch.nn.Module):
    """Energy (kJ/mol) of CG configurations: the sum of its terms (priors, network) plus a constant offset.

    Parameters
    ----------
    terms
        Modules with ``forward(positions (B, n, 3) nm, box (B, 3, 3) nm or None) -> (B,) kJ/mol`` and a
        ``config()`` method returning their constructor arguments (priors first, then the network).  For MD
        (:meth:`md_energy_and_forces`) networks need ``energy_and_forces``; priors from :mod:`.priors`
        compute their forces analytically, other priors are differentiated by autograd.
    n_priors
        How many of ``terms`` are priors (the rest are learned corrections).
    bead_names, bead_types
        The CG beads this potential was made for, in order.
    mapping_fingerprint
        :attr:`openmm_backmap.mapping.CGMapping.topology_fingerprint` of the AA topology whose mapping
        defines the beads; using the potential with another mapping is an error.
    periodic
        Whether the potential expects box vectors.
    energy_offset
        Constant added to the energy (kJ/mol), learned when training with an energy term.
    metadata
        JSON-serialisable notes stored with the model (training data, temperature, losses, ...).
    units
        The molecule kinds of the mapping and the beads of every molecule
        (:func:`.transfer.describe_units`), which :meth:`transfer` needs; ``None`` if unknown.
    """

    __jit_unused_properties__ = ["priors", "networks"]

    def __init__(
        self,
        terms: Sequence[torch.nn.Module],
        *,
        n_priors: int,
        bead_names: Sequence[str],
        bead_types: Sequence[str],
        mapping_fingerprint: str,
        periodic: bool = False,
        energy_offset: float = 0.0,
        metadata: Optional[Dict[str, Any]] = None,
        units: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if len(bead_names) != len(bead_types):
            raise ValueError(f"{len(bead_names)} bead names but {len(bead_types)} bead types")
        if not 0 <= n_priors <= len(terms):
            raise ValueError(f"n_priors={n_priors} must lie in [0, {len(terms)}]")
        self.prior_terms = torch.nn.ModuleList(terms[:n_priors])
        self.network_terms = torch.nn.ModuleList(terms[n_priors:])
        self.n_priors = int(n_priors)
        self.n_beads = len(bead_names)
        self.periodic = bool(periodic)
        self.bead_names: List[str] = list(bead_names)
        self.bead_types: List[str] = list(bead_types)
        self.mapping_fingerprint = str(mapping_fingerprint)
        self.energy_offset = torch.nn.Parameter(torch.tensor(float(energy_offset), dtype=torch.float64))
        self.metadata: Dict[str, Any] = dict(metadata or {})
        self.units: Optional[Dict[str, Any]] = None if units is None else dict(units)
        self._plan_priors()
        # Terms that take their pairs from a neighbour search (the network, a neighbour-searched excluded volume)
        # share one search at the largest of their cutoffs when there are two or more of them: a search costs as
        # much as the excluded volume itself (900-bead benzene box: ~20 of ~100 ms per step).
        searching = [t for t in [*self.prior_terms, *self.network_terms] if hasattr(t, "energy_and_forces_with_pairs")]
        self.shared_pair_cutoff = max(float(t.cutoff) for t in searching) if len(searching) > 1 else 0.0

    @torch.jit.unused
    def _plan_priors(self) -> None:
        """Buffers (derived, not saved) that let :meth:`md_energy_and_forces` evaluate all priors with fixed
        interaction lists at once: one gather of their difference vectors, one scatter of their gradients into
        forces.  These are the priors that compute their forces analytically from difference vectors
        (``energy_terms_and_gradient``, see :mod:`.priors`); the others (e.g. a neighbour-searched excluded
        volume) are evaluated on their own."""
        from .priors import scatter_plan

        every = list(self.prior_terms)
        self._prior_sizes: List[int] = [int(getattr(p, "n_vectors", 0)) for p in every]
        for p in every:
            beads = getattr(p, "vector_head", None)
            if beads is not None and int(beads.max()) >= self.n_beads:
                raise ValueError(f"{type(p).__name__} refers to bead {int(beads.max())} but the potential has "
                                 f"{self.n_beads} beads")
        priors = [p for p in every if hasattr(p, "energy_terms_and_gradient")]
        fused = bool(priors)
        names = ["_prior_head", "_prior_tail", "_prior_index", "_prior_weight", "_prior_matrix", "_prior_energy_weight"]
        if not fused:
            for name in names:
                self.register_buffer(name, None, persistent=False)
            return
        head = torch.cat([p.vector_head for p in priors]).cpu().numpy()
        tail = torch.cat([p.vector_tail for p in priors]).cpu().numpy()
        scale = torch.cat([p.vector_scale for p in priors]).double().cpu().numpy()
        matrix, index, weight = scatter_plan(head, tail, scale, self.n_beads)
        energy_weight = torch.cat([torch.full((p.n_energy_terms,), p.energy_scale, dtype=torch.float64)
                                   for p in priors])
        device = priors[0].vector_head.device
        dtype = self.energy_offset.dtype
        values = [torch.from_numpy(head), torch.from_numpy(tail), torch.from_numpy(index),
                  torch.from_numpy(weight).to(dtype), None if matrix is None else torch.from_numpy(matrix[None]).to(dtype),
                  energy_weight.to(dtype)]
        for name, value in zip(names, values):
            self.register_buffer(name, None if value is None else value.to(device), persistent=False)

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm (box ``(B, 3, 3)`` if periodic).

        Fully differentiable (also through the forces, as force-matching training needs).
        """
        energy = self.energy_offset.to(positions.dtype).expand(positions.shape[0])
        for term in self.prior_terms:
            energy = energy + term(positions, box)
        for term in self.network_terms:
            energy = energy + term(positions, box)
        return energy

    @torch.jit.export
    def md_energy_and_forces(self, positions: torch.Tensor,
                             box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies ``(B,)`` (kJ/mol) and forces ``(B, n, 3)`` (kJ/mol/nm) for MD (no second derivatives).

        Every term computes its forces analytically, without autograd: the networks with
        ``energy_and_forces``, the priors with ``energy_terms_and_gradient`` (:mod:`.priors`), all of those
        together from one gather of their difference vectors and one scatter of the forces, other priors with
        their ``energy_and_forces``.  A prior without analytic forces is differentiated by autograd.  The
        results are not differentiable.
        """
        head = self._prior_head
        if head is not None:
            tail, index, weight = self._prior_tail, self._prior_index, self._prior_weight
            energy_weight = self._prior_energy_weight
            assert tail is not None and index is not None and weight is not None and energy_weight is not None
            with torch.no_grad():
                vectors = _difference_vectors(positions, head, tail, box).split(self._prior_sizes, 1)
                terms: List[torch.Tensor] = []
                gradients: List[torch.Tensor] = []
                k = 0
                for term in self.prior_terms:
                    if hasattr(term, "energy_terms_and_gradient"):
                        t, g = term.energy_terms_and_gradient(vectors[k])
                        terms.append(t)
                        gradients.append(g)
                    k += 1
                # the 0-dim offset takes the dtype of the energies
                energy = torch.matmul(torch.cat(terms, 1), energy_weight.to(positions.dtype)) + self.energy_offset
                forces = _scatter_forces(torch.cat(gradients, 1), positions.shape[1], self._prior_matrix, index,
                                         weight)
        else:
            energy = self.energy_offset.detach().to(positions.dtype).expand(positions.shape[0])
            forces = torch.zeros_like(positions)
        shared: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None
        if self.shared_pair_cutoff > 0.0:
            with torch.no_grad():
                shared = neighbor_pairs(positions.detach(), self.shared_pair_cutoff, box, None)
        for term in self.prior_terms:
            if hasattr(term, "energy_terms_and_gradient"):
                pass  # evaluated with the others above
            else:
                if hasattr(term, "energy_and_forces_with_pairs") and shared is not None:
                    e, f = term.energy_and_forces_with_pairs(
                        positions.detach(), select_pairs(shared, term.cutoff, term.exclusions, positions.shape[1]))
                elif hasattr(term, "energy_and_forces"):
                    e, f = term.energy_and_forces(positions.detach(), box)
                else:  # no analytic forces: autograd
                    x = positions.detach().requires_grad_(True)
                    e = term(x, box)
                    grad = torch.autograd.grad([e.sum()], [x], allow_unused=True)[0]
                    f = torch.zeros_like(positions) if grad is None else -grad
                energy = energy + e.detach()
                forces = forces + f
        for term in self.network_terms:
            if hasattr(term, "energy_and_forces_with_pairs") and shared is not None:
                e, f = term.energy_and_forces_with_pairs(
                    positions, select_pairs(shared, term.cutoff, term.exclusions, positions.shape[1]))
            else:
                e, f = term.energy_and_forces(positions, box)
            energy = energy + e
            forces = forces + f
        return energy, forces

    # -- convenience (not scripted) -------------------------------------------------------------------
    @torch.jit.unused
    def energy_and_forces(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None):
        """Energies ``(B,)`` (kJ/mol) and forces ``(B, n, 3)`` (kJ/mol/nm), detached (inference path)."""
        with torch.enable_grad():
            energy, forces = self.md_energy_and_forces(positions, box)
        return energy.detach(), forces.detach()

    @property
    def priors(self) -> list[torch.nn.Module]:
        return list(self.prior_terms)

    @property
    def networks(self) -> list[torch.nn.Module]:
        return list(self.network_terms)

    @torch.jit.unused
    def priors_only(self) -> "CGPotential":
        """The same potential without its learned terms (and offset): the baseline to compare against."""
        return CGPotential(self.priors, n_priors=self.n_priors, bead_names=self.bead_names,
                           bead_types=self.bead_types, mapping_fingerprint=self.mapping_fingerprint,
                           periodic=self.periodic, metadata={**self.metadata, "priors_only": True},
                           units=self.units)

    @torch.jit.unused
    def check_mapping(self, mapping: Any) -> None:
        """Raise ``ValueError`` unless ``mapping`` defines the beads this potential was made for."""
        if mapping.topology_fingerprint != self.mapping_fingerprint:
            raise ValueError("this CG potential was trained for another AA topology/mapping "
                             f"(fingerprint {self.mapping_fingerprint}, mapping has {mapping.topology_fingerprint})")
        if list(mapping.bead_types) != self.bead_types or mapping.n_beads != self.n_beads:
            raise ValueError(f"this CG potential expects {self.n_beads} beads of types {self.bead_types}; "
                             f"the mapping has {mapping.n_beads} beads of types {list(mapping.bead_types)}")

    @torch.jit.unused
    def transfer(self, mapping: Any, source_mapping: Any = None, *,
                 excluded_volume_cutoff_nm: Optional[float] = None) -> "CGPotential":
        """This potential for another system made of the same molecules in other numbers (size transfer).

        For instance a box 8x larger (:func:`openmm_backmap.systems.replicate`) or a box of another number of
        molecules (:func:`openmm_backmap.systems.liquid`).  Every molecule that holds beads in ``mapping`` is
        matched to a molecule kind of the training mapping: the same residue and atom names, elements, bead
        types and bead weights (:class:`openmm_backmap._units.UnitLayout`).  Then:

        * bonded priors (bonds, angles, dihedrals): every interaction of a training molecule is copied into
          every new molecule of its kind with its parameters (the mean over the training molecules of the kind,
          which equals each of them since :func:`.priors.fit_priors` pools interactions of equal bead types;
          ``metadata["transferred_from"]["averaged_parameters"]`` names the parameters that differed);
        * the excluded-volume prior: the same rule (exclusions along the bonds of each molecule), ``sigma`` per
          bead-type pair, exponent and cutoff.  With a cutoff it becomes a
          :class:`~.priors.NeighborExcludedVolumePrior`, the same energy over the pairs of a neighbour search,
          whose cost grows linearly with the number of beads; without a cutoff it stays a list of all bead pairs,
          which grows as the square (a warning above two million pairs; ``excluded_volume_cutoff_nm`` gives it a
          cutoff);
        * networks: the same weights (SchNet is per bead type), with bead types and exclusions rebuilt;
        * the energy offset (kJ/mol, a constant of the training *box*) is taken as extensive: it is scaled by
          ``n_molecules_new / n_molecules_training`` (molecules holding beads);
        * ``mapping_fingerprint``, bead names and types and :attr:`units` are those of ``mapping``;
          ``metadata["transferred_from"]`` records the source (mapping fingerprint, numbers of beads and
          molecules, offset and its scale).

        The energy is then extensive exactly: for a box tiled from copies of the training box it is the number
        of copies times the training energy, and the forces on every copy are the training forces, as long as
        every interaction range (network cutoff, excluded-volume cutoff) is at most half the training box
        height.  An excluded-volume prior *without* a cutoff acts between all minimum-image pairs, so in a
        larger box it also counts pairs beyond half the training box (a tail of ``(sigma/r)^n``, tiny but not
        zero), and one given a cutoff by ``excluded_volume_cutoff_nm`` drops the pairs beyond it and is shifted
        to zero there (``(sigma/r_c)^n`` per pair within the cutoff).

        Parameters
        ----------
        mapping
            The :class:`~openmm_backmap.mapping.CGMapping` of the new system; it must be periodic (topology
            with box vectors) exactly when this potential is.
        source_mapping
            The mapping this potential was trained for, needed only when it records no :attr:`units`
            (potentials saved before size transfer existed, or built by hand).
        excluded_volume_cutoff_nm
            Cutoff in nm for an excluded-volume prior fitted without one, so that it is evaluated over a
            neighbour search (recorded in ``metadata["transferred_from"]``); ``None`` keeps it as trained.
            Choose it where ``(sigma/r)^n`` is negligible, e.g. 3 ``sigma`` (``3^-12 = 2e-6`` kJ/mol per pair)
            and at most half the new box height.

        Returns
        -------
        CGPotential
            A new potential in this potential's dtype and device; this one is not changed.

        Raises
        ------
        ValueError
            ``mapping`` contains a molecule the potential was never trained on, or a training molecule mapped to
            other beads (other bead types or definitions); periodicity differs; or a term cannot be transferred
            (an interaction between two molecules, an explicit excluded-volume pair list, per-bead-pair sigma,
            a network or prior class other than those of this package).
        """
        from .transfer import transfer_potential

        return transfer_potential(self, mapping, source_mapping, excluded_volume_cutoff_nm=excluded_volume_cutoff_nm)

    @torch.jit.unused
    def create_force(self, backend: str = "torch", **kwargs: Any):
        """This potential as an OpenMM force (see :func:`openmm_backmap.potential.export.create_force`)."""
        from .export import create_force

        return create_force(self, backend=backend, **kwargs)

    # -- files ---------------------------------------------------------------------------------------
    @torch.jit.unused
    def save(self, path: str | os.PathLike) -> None:
        """Write the potential: architecture as JSON (class names + constructor arguments), weights as
        tensors, in one file read back with ``torch.load(weights_only=True)`` (no code is executed on load)."""
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "terms": [{"class": type(t).__name__, "config": t.config()} for t in (*self.priors, *self.networks)],
            "n_priors": self.n_priors,
            "bead_names": self.bead_names,
            "bead_types": self.bead_types,
            "mapping_fingerprint": self.mapping_fingerprint,
            "periodic": self.periodic,
            "metadata": self.metadata,
            "units": self.units,
        }
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"header": json.dumps(header), "state_dict": state}, buffer)
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    @torch.jit.unused
    def load(cls, path: str | os.PathLike, mapping: Any = None) -> "CGPotential":
        """Read a potential written by :meth:`save`; with ``mapping``, check that it matches.

        Raises
        ------
        ValueError
            Not a potential file, corrupt, a newer format version, an unknown term class, or made for
            another mapping.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such potential file: {path}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            header = json.loads(blob["header"])
        except Exception as exc:  # pickle errors, truncated files, missing keys
            raise ValueError(f"{path} is not a readable openmm-backmap CG potential ({type(exc).__name__}: {exc})")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an openmm-backmap CG potential (format={header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {header['format_version']}, newer than this "
                             f"openmm-backmap supports ({FORMAT_VERSION}); upgrade openmm-backmap")
        classes = _term_classes()
        terms = []
        for entry in header["terms"]:
            if entry["class"] not in classes:
                raise ValueError(f"{path}: unknown term class {entry['class']!r}")
            terms.append(classes[entry["class"]](**entry["config"]))
        potential = cls(terms, n_priors=header["n_priors"], bead_names=header["bead_names"],
                        bead_types=header["bead_types"], mapping_fingerprint=header["mapping_fingerprint"],
                        periodic=header["periodic"], metadata=header["metadata"], units=header.get("units"))
        state = blob["state_dict"]
        dtype = state["energy_offset"].dtype if "energy_offset" in state else torch.float64
        potential.to(dtype)
        try:
            potential.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: weights do not fit the stored architecture ({exc})") from exc
        if mapping is not None:
            potential.check_mapping(mapping)
        return potential

    def extra_repr(self) -> str:
        return f"n_beads={self.n_beads}, n_priors={self.n_priors}, periodic={self.periodic}"
