"""CGPotential: physical priors + a neural network, one energy for CG configurations."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

FORMAT = "openmm-backmap-cg-potential"
FORMAT_VERSION = 1


def _term_classes() -> dict[str, type]:
    """Classes a potential file may name.  Files name classes from this list only: loading never runs code."""
    from . import priors, schnet

    classes = [priors.HarmonicBondPrior, priors.HarmonicAnglePrior, priors.FourierDihedralPrior,
               priors.ExcludedVolumePrior, schnet.SchNet]
    return {cls.__name__: cls for cls in classes}


class CGPotential(torch.nn.Module):
    """Energy (kJ/mol) of CG configurations: the sum of its terms (priors, network) plus a constant offset.

    Parameters
    ----------
    terms
        Modules with ``forward(positions (B, n, 3) nm, box (B, 3, 3) nm or None) -> (B,) kJ/mol`` and a
        ``config()`` method returning their constructor arguments (priors first, then the network).
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

        The networks compute their forces analytically (``energy_and_forces``), the priors by autograd;
        cheaper than differentiating :meth:`forward`, whose network backward pass is most of an MD step.
        """
        x = positions.detach().requires_grad_(True)
        prior_energy = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for term in self.prior_terms:
            prior_energy = prior_energy + term(x, box)
        forces = torch.zeros_like(x)
        if prior_energy.requires_grad:
            grad = torch.autograd.grad([prior_energy.sum()], [x], allow_unused=True)[0]
            if grad is not None:
                forces = forces - grad
        energy = self.energy_offset.to(x.dtype).expand(x.shape[0]) + prior_energy.detach()
        frozen = x.detach()
        for term in self.network_terms:
            e, f = term.energy_and_forces(frozen, box)
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
                           periodic=self.periodic, metadata={**self.metadata, "priors_only": True})

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
                        periodic=header["periodic"], metadata=header["metadata"])
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
