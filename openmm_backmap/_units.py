"""How a mapped system splits into units (molecules that hold beads) and the rigid-body geometry of their frames.

Shared by the backmapper, the kNN baseline and the size transfer of CG potentials (all work per kind of molecule).

A *unit* is one molecule (connected component of the AA bond graph) that holds at least one bead. Units with
the same atoms, residue/atom names and bead definitions are of the same *kind* and share one network, so a
box of 300 benzene molecules is one kind with 300 units and the work grows linearly with the box.

Every unit is handled in a *local frame*: origin at the centroid of its current beads, axes from the optimal
rotation (Kabsch) of the kind's bead template onto the current beads when the unit has at least three beads;
units with one or two beads carry no orientation in the CG frame, so their axes come from aligning the kind's
atom template onto the unit's *previous* AA frame (the only source of orientation there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch


@dataclass
class UnitKind:
    """Atoms and beads shared by all units of one kind (indices local to the unit)."""

    name: str
    n_atoms: int
    n_beads: int
    weights: np.ndarray  # (n_beads, n_atoms) rows of the position map restricted to the unit
    atom_index: np.ndarray  # (n_units, n_atoms) global AA atom indices of each unit
    bead_index: np.ndarray  # (n_units, n_beads) global bead indices of each unit

    @property
    def n_units(self) -> int:
        return int(self.atom_index.shape[0])


class UnitLayout:
    """Units and kinds of a :class:`~openmm_backmap.mapping.CGMapping`.

    Attributes
    ----------
    kinds
        One :class:`UnitKind` per kind, in order of first appearance.
    atoms
        Sorted global indices of the AA atoms that are backmapped (all atoms of all units); the output
        trajectory holds these atoms in this order.
    """

    def __init__(self, mapping) -> None:
        top = mapping.aa_topology
        position = mapping._position_matrix().tocsc()
        n_beads = mapping.n_beads
        molecule_of = np.full(top.n_atoms, -1, dtype=np.int64)
        molecules = sorted((sorted(a.index for a in mol) for mol in top.find_molecules()), key=lambda m: m[0])
        for k, atoms in enumerate(molecules):
            molecule_of[atoms] = k
        bead_molecule = np.empty(n_beads, dtype=np.int64)
        pos_csr = position.tocsr()
        for b in range(n_beads):
            cols = pos_csr.indices[pos_csr.indptr[b]:pos_csr.indptr[b + 1]]
            mols = np.unique(molecule_of[cols])
            if len(mols) != 1:
                raise ValueError(f"bead {mapping.bead_names[b]!r} spans {len(mols)} molecules; a bead must lie "
                                 "inside one molecule for backmapping")
            bead_molecule[b] = mols[0]
        groups: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        signatures: dict[str, np.ndarray] = {}
        order: list[str] = []
        for k in np.unique(bead_molecule):
            atoms = np.asarray(molecules[k], dtype=np.int64)
            beads = np.flatnonzero(bead_molecule == k)
            w = np.asarray(pos_csr[beads][:, atoms].todense())
            sig = self._signature(top, atoms, w, [mapping.bead_types[b] for b in beads])
            if sig not in groups:
                groups[sig], signatures[sig] = [], w
                order.append(sig)
            groups[sig].append((atoms, beads))
        self.kinds: list[UnitKind] = []
        for i, sig in enumerate(order):
            units = groups[sig]
            first = top.atom(int(units[0][0][0])).residue
            name = f"{i}:{first.name}" + (f"+{len(units[0][0])}atoms" if len(units[0][0]) != first.n_atoms else "")
            self.kinds.append(UnitKind(name=name, n_atoms=len(units[0][0]), n_beads=len(units[0][1]),
                                       weights=signatures[sig],
                                       atom_index=np.stack([u[0] for u in units]),
                                       bead_index=np.stack([u[1] for u in units])))
        self.atoms = np.sort(np.concatenate([k.atom_index.ravel() for k in self.kinds]))
        #: position in the output atom list of every global atom index (−1 for atoms not backmapped)
        self.output_index = np.full(top.n_atoms, -1, dtype=np.int64)
        self.output_index[self.atoms] = np.arange(len(self.atoms))
        self.n_beads = n_beads

    @staticmethod
    def _signature(top, atoms: np.ndarray, weights: np.ndarray, bead_types: list[str]) -> str:
        names = tuple((top.atom(int(a)).residue.name, top.atom(int(a)).name,
                       top.atom(int(a)).element.symbol if top.atom(int(a)).element else "") for a in atoms)
        return repr((names, tuple(bead_types), np.round(weights, 6).tolist()))

    @property
    def n_units(self) -> int:
        return sum(k.n_units for k in self.kinds)

    def describe(self) -> str:
        return ", ".join(f"{k.n_units}× {k.name} ({k.n_atoms} atoms, {k.n_beads} beads)" for k in self.kinds)


# ---------------------------------------------------------------------------------------------- geometry
def kabsch(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rotations ``Q`` (proper, det +1) minimising ``|source @ Q.T - target|`` for centred point sets.

    ``source`` and ``target`` are ``(..., n, 3)`` and already centred; returns ``(..., 3, 3)``. Degenerate sets
    (one point, or collinear points) give one of the optimal rotations.
    """
    h = source.transpose(-1, -2) @ target  # (..., 3, 3)
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(vt.transpose(-1, -2) @ u.transpose(-1, -2)))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(h.shape[:-2] + (3,), dtype=h.dtype, device=h.device)
    diag[..., 2] = d
    return vt.transpose(-1, -2) @ torch.diag_embed(diag) @ u.transpose(-1, -2)


def minimum_image(delta: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Minimum-image displacements for boxes in OpenMM's reduced triclinic form (``box`` broadcastable to
    ``(..., 3, 3)``); ``box=None`` returns ``delta`` unchanged."""
    if box is None:
        return delta
    for k in (2, 1, 0):
        shift = torch.round(delta[..., k] / box[..., k, k])
        delta = delta - shift.unsqueeze(-1) * box[..., k, :]
    return delta


def whole(points: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Place every point of ``(..., n, 3)`` at its minimum image relative to the first point."""
    if box is None:
        return points
    delta = minimum_image(points - points[..., :1, :], box.unsqueeze(-3))
    return points[..., :1, :] + delta


def random_rotations(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` uniformly distributed rotation matrices (from random unit quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(n, 3, 3)
    return rot.to(dtype)


def sparse_rows(matrix: sp.spmatrix, rows: np.ndarray) -> np.ndarray:
    return np.asarray(matrix.tocsr()[rows].todense())
