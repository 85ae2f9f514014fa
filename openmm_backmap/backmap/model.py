"""The temporally coherent backmapper: a conditional VAE per unit kind, in frames aligned to the CG beads.

Representation (our choice; seed 003 used one voxel channel per atom of the whole molecule, which does not scale
to liquids): the system is split into units (molecules, see :mod:`openmm_backmap._units`); every unit is expressed in its own
local frame (origin at its bead centroid, axes from the beads, or from the previous AA frame for units with fewer
than three beads). In that frame the decoder sees

* the current beads, as deviations from the kind's bead template,
* the unit's previous AA frame in its own bead-aligned frame (the unit's rigid-body motion since then removed), as
  deviations from the kind's atom template (absent in the frame-based baseline),
* optionally (liquids) its local environment: the current beads and previous atoms of other units within a
  cutoff, across periodic images, embedded point by point and summed with a smooth cutoff weight (a DeepSets /
  continuous-filter sum: invariant to the order of the neighbours, continuous as they cross the cutoff; see
  :mod:`._environment`),
* a latent vector ``z``,

and returns the current atoms as deviations from the atom template. Canonical frames make the model invariant to
rotations and translations of the whole unit without an equivariant network; weights are shared by all units
of a kind, so a box of any size is backmapped by the same model with work linear in the number of molecules.
The encoder (training only) also sees the current atoms and returns the posterior of ``z``.

Inference draws ``z`` from a mixture whose weights, means and widths are a function of the decoder's condition,
fitted after training to the encoder's posteriors (``latent_prior="conditional"``, the default; see
:meth:`KindModel.latent_distribution`), or, as in seed 003 §8.1.1, from one Gaussian mixture fitted to the
encoder's posterior means (``latent_prior="mixture"``), and backmaps autoregressively; the first AA frame comes
from a library of training frames, picked per unit by the CG RMSD after optimal superposition (or given by the
user).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._topology import topology_from_json, topology_to_json
from ._environment import EnvironmentIndex, Neighbors
from ._stacked import StackedKinds
from ._stacked import pad as _stacked_pad
from .._units import UnitKind, UnitLayout, kabsch, kabsch_residual, minimum_image, random_rotations, whole

if TYPE_CHECKING:  # pragma: no cover
    from .inference import BackmapChain

FORMAT = "openmm-backmap/backmapper"
#: 2: ``latent_prior`` (conditional latent prior) in the architecture. 3: ``units`` (molecules or residues).
#: 4: ``link_geometry`` (distances of the bonds and angles between residue units, for ``candidates``).
FORMAT_VERSION = 4

#: Bounds of the conditional prior's log standard deviations (in latent units).
_PRIOR_LOG_STD = (-7.0, 2.0)

#: Default architecture (constructor arguments of :class:`TemporalBackmapper`).
DEFAULT_ARCHITECTURE = {"latent_dim": 16, "hidden": 256, "n_layers": 3, "condition_on_previous": True,
                        "length_scale_nm": 0.1, "environment_cutoff_nm": 0.0, "environment_neighbors": 96,
                        "environment_dim": 64, "latent_prior": "conditional", "units": "molecule"}


def _mlp(n_in: int, hidden: int, n_out: int, n_layers: int, zero_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(n_layers):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def draw_mixture(log_w: torch.Tensor, means: torch.Tensor, log_std: torch.Tensor, generator: torch.Generator,
                 repeats: int = 1) -> torch.Tensor:
    """One draw ``(U * repeats, latent_dim)`` (float64) from each of ``U`` diagonal Gaussian mixtures (log weights
    ``(U, M)``, means and log standard deviations ``(U, M, latent_dim)``), each mixture used for ``repeats``
    consecutive draws."""
    log_w, means, log_std = (t.double().cpu().repeat_interleave(repeats, dim=0) for t in (log_w, means, log_std))
    n = len(log_w)
    # component by inverse CDF (torch.multinomial costs ~0.1 ms per call, a sizeable part of a frame)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    comp = (log_w.exp().cumsum(1) < u).sum(1).clamp(max=log_w.shape[1] - 1)
    rows = torch.arange(n)
    eps = torch.randn(n, means.shape[-1], generator=generator, dtype=torch.float64)
    return means[rows, comp] + log_std[rows, comp].exp() * eps


class KindModel(nn.Module):
    """Encoder, decoder, templates, latent mixture and frame library of one unit kind."""

    def __init__(self, n_atoms: int, n_beads: int, latent_dim: int, hidden: int, n_layers: int,
                 condition_on_previous: bool, n_mixture: int = 10, library_size: int = 0,
                 environment_types: int = 0, environment_dim: int = 64, environment_cutoff: float = 0.0,
                 latent_prior: str = "mixture", n_frame_beads: Optional[int] = None) -> None:
        super().__init__()
        self.n_atoms, self.n_beads, self.latent_dim = n_atoms, n_beads, latent_dim
        #: beads that set the unit's frame and enter the condition (its own beads, and for residue units those of
        #: bonded residues); ``own_index`` says where its own beads are among them
        self.n_frame_beads = int(n_frame_beads or n_beads)
        self.condition_on_previous = condition_on_previous
        n_cond = 3 * self.n_frame_beads + (3 * n_atoms if condition_on_previous else 0)
        self.environment_cutoff = float(environment_cutoff)
        self.environment_types = int(environment_types)
        self.environment = None
        if environment_types > 0:
            # per-neighbour embedding of (local position / cutoff, distance / cutoff, type one-hot), summed
            self.environment = _mlp(4 + environment_types, environment_dim, environment_dim, 2)
            n_cond += environment_dim
        self.encoder = _mlp(3 * n_atoms + n_cond, hidden, 2 * latent_dim, n_layers)
        self.decoder = _mlp(n_cond + latent_dim, hidden, 3 * n_atoms, n_layers, zero_last=True)
        self.n_mixture = int(n_mixture)
        # p(z | condition): mixture logits, means and log standard deviations (fitted after the VAE, see the trainer)
        self.latent_prior = (_mlp(n_cond, hidden, n_mixture * (1 + 2 * latent_dim), 2, zero_last=True)
                             if latent_prior == "conditional" else None)
        # Buffers filled by the trainer (templates, mixture, library) and saved with the weights.
        self.register_buffer("atom_template", torch.zeros(n_atoms, 3))
        self.register_buffer("bead_template", torch.zeros(self.n_frame_beads, 3))
        self.register_buffer("own_index", torch.arange(n_beads), persistent=False)
        self.register_buffer("bead_weights", torch.zeros(n_beads, n_atoms))
        # Exact CG consistency: decoded atoms are moved group-wise (each atom with its nearest bead) so that
        # M(r̂) = R holds exactly; ``consistency`` = A (M A)^-1 with A the atom → nearest-bead assignment.
        self.register_buffer("consistency", torch.zeros(n_atoms, n_beads))
        self.register_buffer("mixture_weights", torch.full((n_mixture,), 1.0 / n_mixture))
        self.register_buffer("mixture_means", torch.zeros(n_mixture, latent_dim))
        self.register_buffer("mixture_scale_tril", torch.eye(latent_dim).repeat(n_mixture, 1, 1))
        self.register_buffer("library_atoms", torch.zeros(library_size, n_atoms, 3))
        self.register_buffer("library_beads", torch.zeros(library_size, self.n_frame_beads, 3))

    # -- frames ----------------------------------------------------------------------------------------
    def local_frames(self, beads: torch.Tensor, previous: Optional[torch.Tensor], box: Optional[torch.Tensor],
                     generator: Optional[torch.Generator] = None, previous_beads: Optional[torch.Tensor] = None):
        """Origins ``(U, 3)``, rotations ``(U, 3, 3)`` (local → global: ``x @ Q.T``), local frame beads and local
        previous atoms of ``U`` units, from their frame beads ``(U, n_frame_beads, 3)`` and previous atoms
        ``(U, n_atoms, 3)``. Coordinates in nm.

        ``previous_beads`` are the frame beads of the previous frame, needed when they are not all the unit's own
        (residue units); by default they are mapped from the previous atoms.

        The previous atoms are expressed in the previous frame's *own* bead-aligned frame (origin at its bead
        centroid, axes from its beads), so the rigid-body motion of the unit between the two frames is removed: a
        CG run whose molecules translate or rotate differently from the AA training data (e.g. no centre-of-mass
        motion remover per molecule) gives the decoder the same kind of input as training did.
        """
        dtype = beads.dtype
        beads = whole(beads, box)
        origin = beads.mean(dim=1)
        centred = beads - origin.unsqueeze(1)
        oriented = self.n_frame_beads >= 3
        bead_template = self.bead_template.to(dtype).expand(len(beads), -1, -1) if oriented else None
        rot = None
        local_previous = None
        if previous is not None:
            if previous_beads is None:
                previous = whole(previous, box)
                prev_beads = self.bead_weights.to(dtype) @ previous
            else:  # the same periodic image for the unit's atoms and its frame beads
                joint = whole(torch.cat([previous_beads.to(dtype), previous], dim=1), box)
                prev_beads, previous = joint[:, :self.n_frame_beads], joint[:, self.n_frame_beads:]
            prev_origin = prev_beads.mean(dim=1, keepdim=True)
            if oriented:  # both frames' rotations in one call
                both = kabsch(torch.cat([bead_template, bead_template]), torch.cat([centred, prev_beads - prev_origin]))
                rot, prev_rot = both[:len(beads)], both[len(beads):]
            else:  # no orientation in the beads: the previous atoms give it, to both frames
                tpl = self.atom_template.to(dtype)
                prev_rot = kabsch((tpl - tpl.mean(0)).expand(len(beads), -1, -1),
                                  previous - previous.mean(1, keepdim=True))
                rot = prev_rot
            local_previous = (previous - prev_origin) @ prev_rot
        elif oriented:
            rot = kabsch(bead_template, centred)
        if rot is None:
            if generator is None:
                raise ValueError("units with fewer than 3 beads need the previous AA frame for their orientation")
            rot = random_rotations(len(beads), generator, dtype)
        local_beads = centred @ rot
        return origin, rot, local_beads, local_previous

    def _imaged(self, atoms: torch.Tensor, origin: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
        """Atoms ``(U, n, 3)`` made whole, at the periodic image whose bead centroid is nearest ``origin``, minus
        ``origin``."""
        atoms = whole(atoms, box)
        centre = (self.bead_weights.to(atoms.dtype) @ atoms).mean(dim=1)
        delta = centre - origin
        atoms = atoms + (minimum_image(delta, box) - delta).unsqueeze(1)
        return atoms - origin.unsqueeze(1)

    def to_local(self, atoms: torch.Tensor, origin: torch.Tensor, rot: torch.Tensor,
                 box: Optional[torch.Tensor]) -> torch.Tensor:
        """Atoms ``(U, n, 3)`` (nm, global) in the local frames ``(origin, rot)`` of their units."""
        return self._imaged(atoms, origin, box) @ rot

    def condition(self, local_beads: torch.Tensor, local_previous: Optional[torch.Tensor], scale: float,
                  environment: Optional[Neighbors] = None) -> torch.Tensor:
        """The decoder's condition ``(U, n_cond)``: local frame beads, local previous atoms, environment."""
        if self.environment is not None and environment is None:
            raise ValueError("this backmapper is conditioned on the local environment, but none was given")
        embedded = self.embed_environment(environment) if self.environment is not None else None
        return self.condition_embedded(local_beads, local_previous, scale, embedded)

    def condition_embedded(self, local_beads: torch.Tensor, local_previous: Optional[torch.Tensor], scale: float,
                           embedded: Optional[torch.Tensor]) -> torch.Tensor:
        """:meth:`condition` with the environment already embedded (:meth:`embed_environment`)."""
        parts = [((local_beads - self.bead_template) / scale).flatten(1)]
        if self.condition_on_previous:
            if local_previous is None:
                raise ValueError("this backmapper is conditioned on the previous AA frame, but none was given")
            parts.append(((local_previous - self.atom_template) / scale).flatten(1))
        if embedded is not None:
            parts.append(embedded)
        return torch.cat(parts, dim=1)

    def embed_environment(self, env: Neighbors) -> torch.Tensor:
        """Sum over neighbours of the per-point embedding times the smooth cutoff weight, ``(U, environment_dim)``."""
        dtype = self.atom_template.dtype
        local = env.local.to(dtype) / self.environment_cutoff
        onehot = torch.nn.functional.one_hot(env.types, self.environment_types).to(dtype)
        feats = torch.cat([local, local.norm(dim=-1, keepdim=True), onehot], dim=-1)
        # the sum is scaled so that inputs stay O(1) for the ~tens of neighbours of a liquid
        return (self.environment(feats) * env.weight.to(dtype).unsqueeze(-1)).sum(dim=1) / 8.0

    #: Inputs are squashed smoothly into ±CLAMP (in units of the length scale) so that no input, however far
    #: off, gives an unbounded output, which bounds every autoregressive rollout.
    CLAMP = 20.0

    def _squash(self, x: torch.Tensor) -> torch.Tensor:
        return self.CLAMP * torch.tanh(x / self.CLAMP)

    def encode(self, local_atoms: torch.Tensor, cond: torch.Tensor, scale: float):
        out = self.encoder(self._squash(torch.cat([((local_atoms - self.atom_template) / scale).flatten(1), cond],
                                                  dim=1)))
        mu, logvar = out.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, cond: torch.Tensor, z: torch.Tensor, scale: float, local_beads: torch.Tensor) -> torch.Tensor:
        """Local atom positions in nm, ``(U, n_atoms, 3)``, consistent with the unit's own beads among the local
        frame beads ``local_beads`` (exactly, up to rounding)."""
        dev = self.decoder(torch.cat([self._squash(cond), z], dim=1))
        atoms = self.atom_template + scale * dev.view(-1, self.n_atoms, 3)
        return atoms + self.consistency @ (self.own_beads(local_beads) - self.bead_weights @ atoms)

    def own_beads(self, frame_beads: torch.Tensor) -> torch.Tensor:
        """The unit's own beads ``(U, n_beads, 3)`` among its frame beads ``(U, n_frame_beads, 3)``."""
        return frame_beads if self.n_frame_beads == self.n_beads else frame_beads[:, self.own_index]

    def latent_distribution(self, cond: torch.Tensor):
        """The conditional prior's mixture for each unit: log weights ``(U, K)``, means and log standard
        deviations ``(U, K, latent_dim)`` (diagonal components)."""
        if self.latent_prior is None:
            raise ValueError("this model has no conditional latent prior")
        return self.split_prior(self.latent_prior(self._squash(cond)))

    def split_prior(self, out: torch.Tensor):
        """The conditional prior network's output ``(U, M (1 + 2 latent_dim))`` as log weights, means and log
        standard deviations (see :meth:`latent_distribution`)."""
        k, d = self.n_mixture, self.latent_dim
        logits, means, log_std = out.split([k, k * d, k * d], dim=1)
        log_std = log_std.view(-1, k, d).clamp(*_PRIOR_LOG_STD)
        return torch.log_softmax(logits, dim=1), means.view(-1, k, d), log_std

    def latent_log_prob(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Log density ``(U,)`` of latent vectors ``z`` under the conditional prior given ``cond``."""
        log_w, means, log_std = self.latent_distribution(cond)
        normal = -0.5 * (((z.unsqueeze(1) - means) / log_std.exp()) ** 2 + 2 * log_std + np.log(2 * np.pi))
        return torch.logsumexp(log_w + normal.sum(dim=-1), dim=1)

    def sample_latent(self, n: int, generator: torch.Generator, cond: Optional[torch.Tensor] = None,
                      repeats: int = 1) -> torch.Tensor:
        """``n`` latent vectors: from the conditional prior given ``cond`` ``(n // repeats, n_cond)`` (each condition
        used for ``repeats`` consecutive draws) if the model has one, otherwise from the fitted mixture."""
        if self.latent_prior is not None:
            if cond is None:
                raise ValueError("this model's latent prior is conditional: give the condition")
            return draw_mixture(*self.latent_distribution(cond), generator, repeats).to(cond.dtype)
        comp = torch.multinomial(self.mixture_weights.double().cpu(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        tril = self.mixture_scale_tril.double().cpu()[comp]
        z = self.mixture_means.double().cpu()[comp] + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        return z.to(self.mixture_means.dtype)

    # -- library ---------------------------------------------------------------------------------------
    def library_lookup(self, beads: torch.Tensor, box: Optional[torch.Tensor], generator: torch.Generator,
                       chunk: int = 200_000) -> torch.Tensor:
        """Atoms ``(U, n_atoms, 3)`` in nm: for every unit the library frame with the lowest CG RMSD after optimal
        superposition, superposed onto the unit's beads. One-bead units get a random entry and orientation."""
        if len(self.library_atoms) == 0:
            raise ValueError("this backmapper has no frame library; give the first AA frame explicitly")
        dtype = beads.dtype
        beads = whole(beads, box)
        origin = beads.mean(dim=1)
        centred = beads - origin.unsqueeze(1)
        lib_beads = self.library_beads.to(dtype)
        lib_atoms = self.library_atoms.to(dtype)
        n_units, n_lib = len(beads), len(lib_beads)
        if self.n_frame_beads == 1:
            pick = torch.randint(n_lib, (n_units,), generator=generator)
            rot = random_rotations(n_units, generator, dtype)
        else:
            lib_c = lib_beads - lib_beads.mean(dim=1, keepdim=True)
            best = torch.full((n_units,), float("inf"), dtype=dtype)
            pick = torch.zeros(n_units, dtype=torch.long)
            per = max(1, chunk // n_lib)
            for start in range(0, n_units, per):
                cur = centred[start:start + per]
                src = lib_c.unsqueeze(0).expand(len(cur), -1, -1, -1)
                tgt = cur.unsqueeze(1).expand(-1, n_lib, -1, -1)
                val, idx = kabsch_residual(src, tgt).min(dim=1)
                best[start:start + per], pick[start:start + per] = val, idx
            rot = kabsch(lib_c[pick], centred)
        atoms = lib_atoms[pick] - lib_beads[pick].mean(dim=1, keepdim=True)
        return origin.unsqueeze(1) + atoms @ rot.transpose(-1, -2)


class TemporalBackmapper(nn.Module):
    """A trained backmapper (see the module docstring). Build one with
    :class:`~openmm_backmap.backmap.BackmapperTrainer`; load one with :meth:`load`.

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` it backmaps.
    latent_dim, hidden, n_layers
        Size of the latent space and of the encoder/decoder MLPs.
    condition_on_previous
        Whether the decoder sees the previous AA frame (``False`` is the frame-based baseline).
    length_scale_nm
        Coordinates enter the networks in units of this length (nm).
    environment_cutoff_nm, environment_neighbors, environment_dim
        Local-environment conditioning for liquids: the nearest ``environment_neighbors`` points (current beads and,
        with ``condition_on_previous``, previous atoms of other molecules) within this cutoff (nm) of each unit,
        embedded into ``environment_dim`` features. ``0`` (default) switches it off (a single molecule).
    n_mixture, library_size
        Components of the latent Gaussian mixture; number of library frames per kind.
    latent_prior
        ``"conditional"`` (default): ``z`` is drawn from a mixture of diagonal Gaussians whose parameters an MLP
        computes from the decoder's condition (beads, previous frame, environment), fitted by maximum likelihood
        to samples of the encoder's posteriors after training. ``"mixture"`` (seed 003): from one Gaussian
        mixture fitted to the encoder's posterior means, the same for every unit and frame.
    lag_ps
        Time between the two frames of a training pair (ps), recorded so a reporter can warn on a mismatch.
    metadata
        Free-form JSON-able information (training settings, data provenance).
    """

    def __init__(self, mapping, *, latent_dim: int = 16, hidden: int = 256, n_layers: int = 3,
                 condition_on_previous: bool = True, length_scale_nm: float = 0.1,
                 environment_cutoff_nm: float = 0.0, environment_neighbors: int = 96, environment_dim: int = 64,
                 n_mixture: int = 10, library_size: int = 2000, latent_prior: str = "conditional",
                 units: str = "molecule", lag_ps: float = 0.0, metadata: Optional[dict] = None) -> None:
        super().__init__()
        self.mapping = mapping
        self.layout = UnitLayout(mapping, units)
        if environment_cutoff_nm < 0:
            raise ValueError(f"environment_cutoff_nm must be >= 0; got {environment_cutoff_nm}")
        if latent_prior not in ("mixture", "conditional"):
            raise ValueError(f"latent_prior must be 'mixture' or 'conditional'; got {latent_prior!r}")
        self.config = {"latent_dim": int(latent_dim), "hidden": int(hidden), "n_layers": int(n_layers),
                       "condition_on_previous": bool(condition_on_previous),
                       "length_scale_nm": float(length_scale_nm), "environment_cutoff_nm": float(environment_cutoff_nm),
                       "environment_neighbors": int(environment_neighbors), "environment_dim": int(environment_dim),
                       "n_mixture": int(n_mixture), "library_size": int(library_size), "latent_prior": latent_prior,
                       "units": units, "lag_ps": float(lag_ps)}
        self.metadata = dict(metadata or {})
        self.environment_index: Optional[EnvironmentIndex] = None
        if environment_cutoff_nm > 0:
            top = mapping.aa_topology
            elements = [top.atom(int(a)).element.symbol if top.atom(int(a)).element is not None else ""
                        for a in self.layout.atoms]
            self.environment_index = EnvironmentIndex(self.layout, mapping.bead_types, elements,
                                                      environment_cutoff_nm, environment_neighbors)
        n_types = self.environment_index.n_types if self.environment_index is not None else 0
        self.kinds = nn.ModuleList(
            KindModel(k.n_atoms, k.n_beads, latent_dim, hidden, n_layers, condition_on_previous, n_mixture,
                      library_size, n_types, environment_dim, environment_cutoff_nm, latent_prior, k.n_frame_beads)
            for k in self.layout.kinds)
        hops = _hop_distances(mapping.aa_topology)
        for kind, model in zip(self.layout.kinds, self.kinds):
            model.bead_weights.copy_(torch.as_tensor(kind.weights))
            model.consistency.copy_(torch.as_tensor(_consistency(kind, hops)))
            model.own_index.copy_(torch.as_tensor(kind.own_beads))
        out = self.layout.output_index
        self._unit_atoms = [torch.as_tensor(out[k.atom_index]) for k in self.layout.kinds]
        #: output-atom pairs 1-2 or 1-3 apart in the bond graph that lie in different units (the peptide bonds and
        #: their angles between residue units; none between molecules), and their mean and standard deviation
        #: (nm) in the training data, fitted by :meth:`fit_link_geometry`
        self.cross_pairs = _cross_unit_pairs(mapping, self.layout)
        self.register_buffer("link_geometry", torch.zeros(len(self.cross_pairs[0]), 2, dtype=torch.float64))
        self._link_plan = _link_plan(self.layout, self._unit_atoms, self.cross_pairs)
        self._unit_beads = [torch.as_tensor(k.frame_bead_index) for k in self.layout.kinds]
        # Residue units take frame beads from neighbouring residues: their previous positions are mapped from the
        # whole previous frame, bead by bead (each bead's atoms made whole first): index and weights, padded.
        self._bead_atoms: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if any(k.n_frame_beads != k.n_beads for k in self.layout.kinds):
            rows = mapping._position_matrix().tocsr()[:, self.layout.atoms]
            width = int(np.diff(rows.indptr).max())
            index = np.zeros((mapping.n_beads, width), dtype=np.int64)
            weight = np.zeros((mapping.n_beads, width))
            for b in range(mapping.n_beads):
                span = slice(rows.indptr[b], rows.indptr[b + 1])
                cols, vals = rows.indices[span], rows.data[span]
                index[b], index[b, :len(cols)], weight[b, :len(cols)] = cols[0], cols, vals
            self._bead_atoms = (torch.as_tensor(index), torch.as_tensor(weight))

    # -- description -----------------------------------------------------------------------------------
    @property
    def condition_on_previous(self) -> bool:
        return self.config["condition_on_previous"]

    @property
    def lag_ps(self) -> float:
        return self.config["lag_ps"]

    @property
    def length_scale(self) -> float:
        return self.config["length_scale_nm"]

    @property
    def n_beads(self) -> int:
        return self.mapping.n_beads

    @property
    def n_atoms(self) -> int:
        """Number of atoms in the backmapped output."""
        return len(self.layout.atoms)

    @property
    def bead_names(self) -> list[str]:
        return self.mapping.bead_names

    @property
    def bead_types(self) -> list[str]:
        return self.mapping.bead_types

    @property
    def atom_indices(self) -> np.ndarray:
        """Indices into the mapping's AA topology of the output atoms."""
        return self.layout.atoms

    @property
    def topology(self):
        """``openmm.app.Topology`` of the output atoms (the AA molecules that hold beads)."""
        full = self.mapping.aa_topology
        sub = full.subset(self.layout.atoms) if len(self.layout.atoms) != full.n_atoms else full
        top = sub.to_openmm()
        box = getattr(self.mapping, "_box", None)
        if box is not None:
            top.setPeriodicBoxVectors(box)
        return top

    @property
    def mdtraj_topology(self):
        import mdtraj as md

        return md.Topology.from_openmm(self.topology)

    def check_cg(self, n_particles: int, particle_names: Optional[Sequence[str]] = None, source: str = "the CG system"):
        """Raise ``ValueError`` unless ``n_particles`` beads (with these names, if given) match this backmapper."""
        if n_particles != self.n_beads:
            raise ValueError(f"{source} has {n_particles} particles but the backmapper was trained for "
                             f"{self.n_beads} beads ({self.layout.describe()})")
        if particle_names is not None:
            names = list(particle_names)
            if names != list(self.bead_names):
                bad = next(i for i, (a, b) in enumerate(zip(names, self.bead_names)) if a != b)
                raise ValueError(f"{source}: particle {bad} is named {names[bad]!r} but the backmapper expects "
                                 f"bead {self.bead_names[bad]!r} there; the CG topology does not match its mapping")

    def check_mapping(self, mapping) -> None:
        if mapping.topology_fingerprint != self.mapping.topology_fingerprint or \
                mapping.to_yaml() != self.mapping.to_yaml():
            raise ValueError("this backmapper was trained for another mapping (different AA topology or beads)")

    # -- the model -------------------------------------------------------------------------------------
    def gather(self, k: int, beads: torch.Tensor, atoms: Optional[torch.Tensor]):
        """Units of kind ``k`` from frames: frame beads ``(B, n_beads, 3)`` → ``(B*U, n_frame_beads, 3)``; output
        atoms ``(B, n_atoms, 3)`` → ``(B*U, n_unit_atoms, 3)``."""
        ub = beads[:, self._unit_beads[k]].flatten(0, 1)
        ua = atoms[:, self._unit_atoms[k]].flatten(0, 1) if atoms is not None else None
        return ub, ua

    def unit_frames(self, k: int, beads: torch.Tensor, previous: Optional[torch.Tensor], box: Optional[torch.Tensor],
                    generator: Optional[torch.Generator] = None, previous_beads: Optional[torch.Tensor] = None):
        """Local frames of the units of kind ``k`` in ``B`` frames (see :meth:`KindModel.local_frames`): beads
        ``(B, n_beads, 3)``, previous output atoms ``(B, n_atoms, 3)`` or ``None``, boxes ``(B, 3, 3)`` or ``None``,
        and ``previous_beads``, :meth:`previous_beads` of ``previous`` (computed here if not given; pass it when
        looping over kinds so that it is computed once).
        Returns origins, rotations, local frame beads, local previous atoms and the boxes of the units."""
        ub, ua = self.gather(k, beads, previous)
        n_units = self._unit_atoms[k].shape[0]
        ubox = box.repeat_interleave(n_units, dim=0) if box is not None else None
        if previous_beads is None:
            previous_beads = self.previous_beads(previous, box)
        unit_prev = self.gather(k, previous_beads, None)[0] if previous_beads is not None else None
        origin, rot, lb, lp = self.kinds[k].local_frames(ub, ua, ubox, generator, unit_prev)
        return origin, rot, lb, lp, ubox

    def previous_beads(self, previous: Optional[torch.Tensor], box: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Beads ``(B, n_beads, 3)`` mapped from previous output atoms when residue units need them (frame beads
        of bonded residues), else ``None``; each bead's atoms are made whole first."""
        if previous is None or self._bead_atoms is None:
            return None
        index, weight = self._bead_atoms
        grouped = previous[:, index]  # (B, n_beads, width, 3)
        if box is not None:
            grouped = whole(grouped, box.unsqueeze(1))
        return (weight.to(previous.dtype).unsqueeze(-1) * grouped).sum(dim=2)

    def scatter(self, k: int, out: torch.Tensor, unit_atoms: torch.Tensor) -> None:
        idx = self._unit_atoms[k]
        out[:, idx] = unit_atoms.view(out.shape[0], *idx.shape, 3).to(out.dtype)

    def environment(self, k: int, origin: torch.Tensor, rot: torch.Tensor, beads: torch.Tensor,
                    previous: Optional[torch.Tensor], box: Optional[torch.Tensor]) -> Optional[Neighbors]:
        """Local environment of the units of kind ``k`` (``None`` for a model without environment conditioning);
        see :meth:`~openmm_backmap.backmap._environment.EnvironmentIndex.neighbors`."""
        if self.environment_index is None:
            return None
        return self.environment_index.neighbors(k, origin, rot, beads, previous, box)

    @torch.inference_mode()
    def decode_frames(self, beads: torch.Tensor, previous: Optional[torch.Tensor], box: Optional[torch.Tensor],
                      generator: torch.Generator, candidates: Optional[int] = 1) -> torch.Tensor:
        """One autoregressive step for ``B`` independent frames: beads ``(B, n_beads, 3)``, previous output atoms
        ``(B, n_atoms, 3)`` (or ``None`` for the frame-based model), boxes ``(B, 3, 3)`` or ``None``; nm, float64.
        With ``candidates`` > 1 (residue units), every unit is decoded from that many latent draws and, in chain
        order, one candidate is drawn with weights given by the fitted distances of the bonds and angles that join
        it to the units placed before it (see :meth:`_pick_linked`). Returns ``(B, n_atoms, 3)`` nm."""
        n_frames = beads.shape[0]
        out = torch.zeros(n_frames, self.n_atoms, 3, dtype=beads.dtype)
        m = self._check_candidates(candidates)
        # the frame-based model sees no history (1-2 frame-bead units get a random orientation)
        previous = previous if self.condition_on_previous else None
        previous_beads = self.previous_beads(previous, box)
        frames = [self.unit_frames(k, beads, previous, box, generator, previous_beads)
                  for k in range(len(self.kinds))]
        envs: list = [None] * len(self.kinds)
        if self.environment_index is not None:  # one neighbour search per frame for all kinds
            envs = self.environment_index.neighbors_all([f[0] for f in frames], [f[1] for f in frames], beads,
                                                        previous, box)
        # the networks of all kinds run as one batched call per layer (see ._stacked); the prior's runs once per
        # unit, the decoder once per candidate
        stacked = self._stacked()
        dtype = stacked.dtype
        embedded = stacked.embed(envs) if stacked.environment is not None else [None] * len(self.kinds)
        conds = [model.condition_embedded(lb.to(dtype), lp.to(dtype) if lp is not None else None, self.length_scale,
                                          emb)
                 for model, (_, _, lb, lp, _), emb in zip(self.kinds, frames, embedded)]
        counts = [len(c) for c in conds]
        squashed = self.kinds[0]._squash(_stacked_pad(conds))
        if stacked.prior is not None:
            z_all = draw_mixture(*stacked.latent_distributions(squashed, counts), generator, m).to(dtype)
            z = list(z_all.split([n * m for n in counts]))
        else:
            z = [model.sample_latent(n * m, generator) for model, n in zip(self.kinds, counts)]
        own = [model.own_beads(f[2].to(dtype)).repeat_interleave(m, dim=0) for model, f in zip(self.kinds, frames)]
        locals_ = stacked.decode(squashed.repeat_interleave(m, dim=1) if m > 1 else squashed, z, own,
                                 self.length_scale)
        decoded = []
        for k, ((origin, rot, _, _, _), local) in enumerate(zip(frames, locals_)):
            if m > 1:
                origin, rot = origin.repeat_interleave(m, dim=0), rot.repeat_interleave(m, dim=0)
            glob = origin.unsqueeze(1) + local.to(beads.dtype) @ rot.transpose(-1, -2)
            if m == 1:
                self.scatter(k, out, glob)
            else:
                decoded.append(glob.view(n_frames, -1, m, *glob.shape[1:]))
        if m > 1:
            self._pick_linked(out, decoded, box, generator)
        return out

    def _stacked(self) -> StackedKinds:
        """The kinds' networks stacked for inference (:mod:`._stacked`), rebuilt when a weight or buffer has been
        changed in place (its version counter moved) or the module was moved or cast (:meth:`_apply`)."""
        cache = self.__dict__.get("_stacked_cache")
        try:
            if cache is not None and all(t._version == v for t, v in cache[0]):
                return cache[1]
            versions = [(t, t._version) for t in [*self.kinds.parameters(), *self.kinds.buffers()]]
        except RuntimeError:  # inference tensors keep no version counter: no caching
            return StackedKinds(self.kinds)
        self.__dict__["_stacked_cache"] = (versions, StackedKinds(self.kinds))
        return self.__dict__["_stacked_cache"][1]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_stacked_cache", None)
        return super()._apply(fn, *args, **kwargs)

    #: Latent draws per residue when ``candidates`` is not given, for backmappers whose units are joined by bonds
    #: (residue units) and whose link geometry is fitted (measured on chignolin: bond score 0.989 with one draw,
    #: 0.995 with 4, 0.997 with 8 and 0.995 with 16, at 1.0 / 1.1 / 1.2 / 1.6 x the cost; docs/backmapping.md).
    DEFAULT_CANDIDATES = 8

    def _check_candidates(self, candidates: Optional[int]) -> int:
        """``candidates`` checked, or for ``None`` the default: :attr:`DEFAULT_CANDIDATES` for residue units with
        fitted link geometry, else 1."""
        if candidates is None:
            linked = len(self.cross_pairs[0]) > 0 and self.has_link_geometry
            return self.DEFAULT_CANDIDATES if linked else 1
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1:
            raise ValueError(f"candidates must be an integer >= 1; got {candidates!r}")
        if candidates > 1:
            if len(self.cross_pairs[0]) == 0:
                raise ValueError("candidates > 1 needs units joined by bonds (units='residue'); this backmapper's "
                                 "units share none")
            if not self.has_link_geometry:
                raise ValueError("candidates > 1 needs the fitted distances between units: call "
                                 "fit_link_geometry(aa_frames) (backmappers trained before format version 4)")
        return int(candidates)

    def _pick_linked(self, out: torch.Tensor, decoded: list[torch.Tensor], box: Optional[torch.Tensor],
                     generator: torch.Generator) -> None:
        """Sequential importance resampling along the chain: for every unit (chain order) one of its candidates
        ``decoded[k][:, unit]`` ``(B, M, n, 3)`` is drawn with probability proportional to
        ``exp(-½ Σ ((d - μ) / σ)²)`` over its bonds and angles to units already placed in ``out``, whose mean
        ``μ`` and spread ``σ`` come from the training data (:attr:`link_geometry`): the product of the per-unit
        model and the data's geometry across units."""
        rows_b = torch.arange(out.shape[0])
        geometry = self.link_geometry.to(out.dtype)
        for k, j, local, partner, rows in self._link_plan:
            cand = decoded[k][:, j]  # (B, M, n, 3)
            if len(local):
                delta = cand[:, :, local] - out[:, None, partner]
                d = minimum_image(delta, box[:, None, None] if box is not None else None).norm(dim=-1)
                mean, std = geometry[rows, 0], geometry[rows, 1]
                log_w = -0.5 * (((d - mean) / std) ** 2).sum(dim=-1)  # (B, M)
                w = torch.softmax(log_w, dim=1)
                u = torch.rand(out.shape[0], 1, generator=generator, dtype=w.dtype)
                pick = (w.cumsum(dim=1) < u).sum(dim=1).clamp(max=cand.shape[1] - 1)
            else:
                pick = torch.zeros(out.shape[0], dtype=torch.long)
            out[:, self._unit_atoms[k][j]] = cand[rows_b, pick]

    @torch.no_grad()
    def library_frames(self, beads: torch.Tensor, box: Optional[torch.Tensor], generator: torch.Generator):
        """Library lookup (the thesis's seeding, and the library baseline): ``(B, n_atoms, 3)`` nm."""
        out = torch.zeros(beads.shape[0], self.n_atoms, 3, dtype=beads.dtype)
        for k, model in enumerate(self.kinds):
            ub, _ = self.gather(k, beads, None)
            n_units = self._unit_atoms[k].shape[0]
            ubox = box.repeat_interleave(n_units, dim=0) if box is not None else None
            self.scatter(k, out, model.library_lookup(ub, ubox, generator))
        return out

    def fit_link_geometry(self, aa_positions_nm: Any, box_vectors_nm: Any = None) -> None:
        """Fit :attr:`link_geometry`, the mean and standard deviation (nm) of every distance in :attr:`cross_pairs`
        (bonds and angles between residue units), from AA frames ``(n_frames, n_atoms, 3)`` in nm (the backmapped
        atoms, :attr:`atom_indices`; or all atoms of the mapping's topology) with optional boxes ``(n_frames, 3, 3)``.
        The trainer calls it on its training frames; it is what ``candidates > 1`` scores against."""
        from .._validation import as_box_vectors, as_coordinates, check_finite

        n_all = self.mapping.aa_topology.n_atoms
        xyz = np.asarray(aa_positions_nm, dtype=np.float64)
        if xyz.ndim == 3 and xyz.shape[1] == n_all and n_all != self.n_atoms:
            xyz = xyz[:, self.atom_indices]
        xyz = as_coordinates(xyz, self.n_atoms, name="AA frames")
        xyz = xyz[None] if xyz.ndim == 2 else xyz
        check_finite(xyz, name="AA frames")
        ci, cj = self.cross_pairs
        if len(ci) == 0:
            return
        box = None
        if box_vectors_nm is not None:
            box = as_box_vectors(box_vectors_nm)
            box = torch.as_tensor(np.broadcast_to(box, (len(xyz), 3, 3)) if box.ndim == 2 else box)
        x = torch.as_tensor(xyz)
        d = minimum_image(x[:, cj] - x[:, ci], box.unsqueeze(1) if box is not None else None).norm(dim=-1)
        std = d.std(dim=0) if len(d) > 1 else torch.zeros(len(ci), dtype=d.dtype)
        self.link_geometry = torch.stack([d.mean(dim=0), std.clamp(min=1e-4)], dim=1).double()

    @property
    def has_link_geometry(self) -> bool:
        """Whether :attr:`link_geometry` is fitted (models of format version 4 and later; see
        :meth:`fit_link_geometry`)."""
        return len(self.link_geometry) > 0 and bool((self.link_geometry[:, 1] > 0).all())

    # -- inference -------------------------------------------------------------------------------------
    def chain(self, *, seed: int = 0, n_replicas: int = 1, mode: str = "model", relax: Any = None,
              candidates: Optional[int] = None) -> "BackmapChain":
        """A stateful autoregressive backmapping of ``n_replicas`` trajectories (see :class:`BackmapChain`)."""
        from .inference import BackmapChain

        return BackmapChain(self, seed=seed, n_replicas=n_replicas, mode=mode, relax=relax, candidates=candidates)

    def sample(self, cg_positions_nm: Any, previous_aa_positions_nm: Any = None, n: int = 1, *,
               box_vectors_nm: Any = None, seed: int = 0) -> np.ndarray:
        """``n`` independent AA frames for one CG frame: one step of the chain, with ``n`` latent draws.

        Parameters
        ----------
        cg_positions_nm
            The current CG frame, ``(n_beads, 3)`` nm.
        previous_aa_positions_nm
            The AA frame one lag earlier, ``(n_atoms, 3)`` nm (the backmapped atoms, :attr:`atom_indices`).
            Required by a temporal model; a frame-based model ignores it.
        n
            Number of samples.
        box_vectors_nm
            ``(3, 3)`` box vectors (rows) in nm for a periodic system.
        seed
            Seed of the latent draws.

        Returns
        -------
        numpy.ndarray
            ``(n, n_atoms, 3)`` nm.
        """
        from .._validation import as_coordinates
        from .inference import BackmapChain

        if int(n) < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        cg = as_coordinates(cg_positions_nm, self.n_beads, name="CG positions")
        if cg.ndim != 2:
            raise ValueError(f"sample() takes one CG frame (n_beads, 3); got shape {cg.shape}")
        chain = BackmapChain(self, seed=seed, n_replicas=int(n))
        if self.condition_on_previous:
            if previous_aa_positions_nm is None:
                raise ValueError("this backmapper is conditioned on the previous AA frame: give "
                                 "previous_aa_positions_nm (or use chain(), which starts from its library)")
            chain.previous = previous_aa_positions_nm
        return chain.step(np.broadcast_to(cg, (int(n), *cg.shape)), box_vectors_nm)

    def backmap_trajectory(self, cg_positions_nm: Any, box_vectors_nm: Any = None, *, seed: int = 0,
                           first_frame_nm: Any = None, mode: str = "model", relax: Any = None,
                           candidates: Optional[int] = None, progress: bool = False) -> np.ndarray:
        """Backmap a CG trajectory ``(n_frames, n_beads, 3)`` (nm) to ``(n_frames, n_atoms, 3)`` (nm).

        ``first_frame_nm`` (``(n_atoms, 3)``, the output atoms) replaces the library pick for frame 0.
        ``mode`` is ``"model"``, or ``"library"`` for the library-lookup baseline. ``relax`` (a
        :class:`~openmm_backmap.backmap.Relaxer` or the AA ``openmm.System``) minimises every frame with the AA
        force field, beads held in place, before it conditions the next one. ``candidates`` > 1 (residue units)
        decodes every residue from that many latent draws and keeps one per residue, drawn along the chain with
        weights from the bonds and angles that join it to the residues placed before it (see
        :class:`BackmapChain`; default: :attr:`DEFAULT_CANDIDATES` for residue units, 1 otherwise).
        """
        from .inference import backmap_array

        return backmap_array(self, cg_positions_nm, box_vectors_nm, seed=seed, first_frame_nm=first_frame_nm,
                             mode=mode, relax=relax, candidates=candidates, progress=progress)

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write architecture, mapping, AA topology (JSON) and weights/buffers (tensors) to one file that is read
        back with ``torch.load(weights_only=True)``: loading never executes code from the file."""
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": self.config,
                  "metadata": self.metadata, "mapping_yaml": self.mapping.to_yaml(),
                  "aa_topology": topology_to_json(self.mapping.aa_topology.to_openmm())}
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"header": json.dumps(header), "state_dict": state}, buffer)
        tmp = Path(str(path) + ".tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, mapping: Any = None) -> "TemporalBackmapper":
        """Read a backmapper written by :meth:`save`; with ``mapping``, check that it is the one it was trained for.

        Raises
        ------
        FileNotFoundError, ValueError
            Missing file; not a backmapper file, corrupt, a newer format version, or another mapping.
        """
        from ..mapping import CGMapping

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such backmapper file: {path}")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            header = json.loads(blob["header"])
            state = blob["state_dict"]
        except Exception as exc:  # unpickling refused, truncated file, missing keys
            raise ValueError(f"{path} is not a readable openmm-backmap backmapper ({type(exc).__name__}: {exc})")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an openmm-backmap backmapper (format={header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {header['format_version']}, newer than this "
                             f"openmm-backmap supports ({FORMAT_VERSION}); upgrade openmm-backmap")
        try:
            topology = topology_from_json(header["aa_topology"])
            stored = CGMapping.from_yaml(header["mapping_yaml"], topology, source=str(path))
            config = {"latent_prior": "mixture", **header["config"]}  # version 1 had only the mixture
            model = cls(stored, metadata=header.get("metadata"), **config)
            for k, kind in enumerate(model.kinds):  # library sizes differ per kind
                for name in ("library_atoms", "library_beads"):
                    setattr(kind, name, torch.zeros_like(state[f"kinds.{k}.{name}"]))
            if "link_geometry" not in state:  # version <= 3: not fitted (see fit_link_geometry)
                state = {**state, "link_geometry": torch.zeros_like(model.link_geometry)}
            model.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"{path}: corrupt or incompatible backmapper ({type(exc).__name__}: {exc})") from exc
        if mapping is not None:
            model.check_mapping(mapping)
        return model

    def extra_repr(self) -> str:
        env = self.config["environment_cutoff_nm"]
        return (f"units: {self.layout.describe()}; previous frame: {self.condition_on_previous}; "
                f"environment: {f'{env:g} nm' if env > 0 else 'none'}; lag {self.lag_ps:g} ps")


def _hop_distances(top) -> Any:
    """Sparse-friendly bond-graph hop distances (scipy shortest paths, unweighted) of an mdtraj topology."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import shortest_path

    bonds = np.array([[a.index, b.index] for a, b in top.bonds], dtype=np.int64).reshape(-1, 2)
    n = top.n_atoms
    adj = sp.coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])), shape=(n, n)).tocsr()
    return lambda atoms: shortest_path(adj[atoms][:, atoms], directed=False, unweighted=True)


def _consistency(kind: UnitKind, hops) -> np.ndarray:
    """``A (W A)^-1`` for one unit kind: ``A`` assigns every atom to the bead whose atoms are fewest bonds away
    (weight-carrying atoms of a bead belong to it; ties go to the heavier share), ``W`` the bead weights."""
    w = kind.weights
    dist = hops(kind.atom_index[0])  # (n_atoms, n_atoms) hops within the unit
    n_atoms, n_beads = kind.n_atoms, kind.n_beads
    assign = np.zeros((n_atoms, n_beads))
    for i in range(n_atoms):
        if w[:, i].max() > 0:
            assign[i, int(np.argmax(w[:, i]))] = 1.0
            continue
        reach = np.array([dist[i, w[b] > 0].min() for b in range(n_beads)])
        assign[i, int(np.argmin(reach))] = 1.0
    coupling = w @ assign
    try:
        return assign @ np.linalg.inv(coupling)
    except np.linalg.LinAlgError:
        return assign @ np.linalg.pinv(coupling)


def _within_two_bonds(top):
    """Sparse boolean matrix of the atom pairs 1-2 or 1-3 apart in the bond graph of an mdtraj topology."""
    import scipy.sparse as sp

    bonds = np.array([[a.index, b.index] for a, b in top.bonds], dtype=np.int64).reshape(-1, 2)
    n = top.n_atoms
    adj = sp.coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])), shape=(n, n)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.int64)
    return ((adj + adj @ adj) > 0).tocsr()


def _cross_unit_pairs(mapping, layout: UnitLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-atom index pairs ``(i, j)`` 1-2 or 1-3 apart in the bond graph whose atoms lie in different units
    (the peptide bond and its angles between residue units; none between molecules)."""
    reach = _within_two_bonds(mapping.aa_topology).tocoo()
    unit = np.full(mapping.aa_topology.n_atoms, -1, dtype=np.int64)
    for k, kind in enumerate(layout.kinds):
        unit[kind.atom_index] = (k * 1_000_000 + np.arange(kind.n_units))[:, None]
    out = layout.output_index
    keep = (reach.row < reach.col) & (unit[reach.row] >= 0) & (unit[reach.col] >= 0) & \
        (unit[reach.row] != unit[reach.col])
    return torch.as_tensor(out[reach.row[keep]]), torch.as_tensor(out[reach.col[keep]])


def _link_plan(layout: UnitLayout, unit_atoms: list[torch.Tensor], cross_pairs) -> list[tuple]:
    """Units in placement order, each as ``(kind, unit, local atoms, partner atoms, pair rows)``: the unit's atoms
    (indices within the unit) in a cross-unit pair whose partner (output index) belongs to a unit placed earlier,
    and the pair's row in :attr:`TemporalBackmapper.link_geometry`.

    Units whose frame beads fix their orientation (three or more) are placed first, in chain order (by their first
    output atom); then the others (chain termini under a Cα map, whose orientation comes from the previous frame
    only), each scored against its already placed neighbours."""
    ci, cj = (np.asarray(c) for c in cross_pairs)
    order = sorted((layout.kinds[k].n_frame_beads < 3, int(atoms[j].min()), k, j)
                   for k, atoms in enumerate(unit_atoms) for j in range(atoms.shape[0]))
    n_atoms = sum(int(atoms.numel()) for atoms in unit_atoms)
    rank = np.zeros(n_atoms, dtype=np.int64)  # placement rank of every output atom's unit
    local = np.zeros(n_atoms, dtype=np.int64)  # its index within the unit
    for r, (_, _, k, j) in enumerate(order):
        atoms = unit_atoms[k][j].numpy()
        rank[atoms], local[atoms] = r, np.arange(len(atoms))
    # every cross-unit pair belongs to the later-placed of its two units
    later = np.where(rank[ci] > rank[cj], ci, cj)
    earlier = np.where(rank[ci] > rank[cj], cj, ci)
    plan = []
    for r, (_, _, k, j) in enumerate(order):
        rows = np.flatnonzero(rank[later] == r)
        plan.append((k, j, torch.as_tensor(local[later[rows]]), torch.as_tensor(earlier[rows]),
                     torch.as_tensor(rows)))
    return plan
