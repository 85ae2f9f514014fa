"""How a mapped system splits into units (molecules or residues that hold beads) and the rigid-body geometry of
their frames.

Shared by the backmapper, the kNN baseline and the size transfer of CG potentials (all work per kind of unit).

A *unit* is, by default, one molecule (connected component of the AA bond graph) that holds at least one bead.
With ``units="residue"`` it is one residue that holds at least one bead (a protein backmapped residue by residue:
each network decodes a few atoms in a frame set by nearby beads, instead of the whole chain in one frame). Units
with the same atoms, residue/atom names, bead definitions and frame beads are of the same *kind* and share one
network, so a box of 300 benzene molecules is one kind with 300 units and the work grows linearly with the box.

Every unit is handled in a *local frame* set by its *frame beads*: the unit's own beads and, for residue units,
the beads of the residues bonded to it (so the Cα trace i-1, i, i+1 orients residue i under a Cα map). Origin at
the centroid of the frame beads, axes from the optimal rotation (Kabsch) of the kind's bead template onto them
when there are at least three; units with one or two frame beads carry no orientation in the CG frame, so their
axes come from aligning the kind's atom template onto the unit's *previous* AA frame (the only source of
orientation there).
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
    #: (n_units, n_frame_beads) global indices of the beads that set each unit's frame (its own beads, and for
    #: residue units those of bonded residues), ordered by residue
    frame_bead_index: np.ndarray = None  # type: ignore[assignment]
    #: (n_beads,) position of each own bead among the frame beads
    own_beads: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.frame_bead_index is None:  # a molecule unit: its frame beads are its own beads
            self.frame_bead_index = self.bead_index
            self.own_beads = np.arange(self.n_beads)

    @property
    def n_units(self) -> int:
        return int(self.atom_index.shape[0])

    @property
    def n_frame_beads(self) -> int:
        return int(self.frame_bead_index.shape[1])


#: How a system splits into units: one per molecule, or one per residue.
UNITS = ("molecule", "residue")


class UnitLayout:
    """Units and kinds of a :class:`~openmm_backmap.mapping.CGMapping`.

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping`.
    units
        ``"molecule"`` (default) or ``"residue"`` (see the module docstring). Every bead must lie inside one unit.

    Attributes
    ----------
    kinds
        One :class:`UnitKind` per kind, in order of first appearance.
    atoms
        Sorted global indices of the AA atoms that are backmapped (all atoms of all units); the output
        trajectory holds these atoms in this order.
    """

    def __init__(self, mapping, units: str = "molecule") -> None:
        if units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}; got {units!r}")
        self.units = units
        top = mapping.aa_topology
        pos_csr = mapping._position_matrix().tocsr()
        n_beads = mapping.n_beads
        if units == "molecule":
            groups_of_atoms = sorted((sorted(a.index for a in mol) for mol in top.find_molecules()),
                                     key=lambda m: m[0])
        else:
            groups_of_atoms = [[a.index for a in res.atoms] for res in top.residues]
        group_of = np.full(top.n_atoms, -1, dtype=np.int64)
        for k, atoms in enumerate(groups_of_atoms):
            group_of[atoms] = k
        bead_group = np.empty(n_beads, dtype=np.int64)
        for b in range(n_beads):
            cols = pos_csr.indices[pos_csr.indptr[b]:pos_csr.indptr[b + 1]]
            found = np.unique(group_of[cols])
            if len(found) != 1:
                raise ValueError(f"bead {mapping.bead_names[b]!r} spans {len(found)} {units}s; a bead must lie "
                                 f"inside one {units} for backmapping with units={units!r}")
            bead_group[b] = found[0]
        holding = np.unique(bead_group)
        # frame groups: the unit itself and, for residues, the bead-holding residues bonded to it, in order
        context = {int(k): [int(k)] for k in holding}
        if units == "residue":
            for bond in top.bonds:
                g1, g2 = int(group_of[bond[0].index]), int(group_of[bond[1].index])
                if g1 != g2 and g1 in context and g2 in context:
                    context[g1].append(g2)
                    context[g2].append(g1)
            context = {k: sorted(set(v)) for k, v in context.items()}
        groups: dict[str, list[tuple]] = {}
        signatures: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        order: list[str] = []
        for k in holding:
            atoms = np.asarray(groups_of_atoms[k], dtype=np.int64)
            beads = np.flatnonzero(bead_group == k)
            w = np.asarray(pos_csr[beads][:, atoms].todense())
            frame = np.concatenate([np.flatnonzero(bead_group == g) for g in context[int(k)]])
            own = np.array([int(np.flatnonzero(frame == b)[0]) for b in beads])
            sig = self._signature(top, atoms, w, [mapping.bead_types[b] for b in beads])
            if units == "residue":  # the frame beads are part of the kind: how many lie on either side of the
                # unit (not their types, so that a residue type shares one network wherever it sits in a chain)
                sig += repr([(int(np.sign(g - k)), int((bead_group == g).sum())) for g in context[int(k)]])
            if sig not in groups:
                groups[sig], signatures[sig] = [], (w, own)
                order.append(sig)
            groups[sig].append((atoms, beads, frame))
        self.kinds: list[UnitKind] = []
        for i, sig in enumerate(order):
            members = groups[sig]
            first = top.atom(int(members[0][0][0])).residue
            name = f"{i}:{first.name}" + (f"+{len(members[0][0])}atoms" if len(members[0][0]) != first.n_atoms else "")
            w, own = signatures[sig]
            self.kinds.append(UnitKind(name=name, n_atoms=len(members[0][0]), n_beads=len(members[0][1]), weights=w,
                                       atom_index=np.stack([m[0] for m in members]),
                                       bead_index=np.stack([m[1] for m in members]),
                                       frame_bead_index=np.stack([m[2] for m in members]), own_beads=own))
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
        return ", ".join(f"{k.n_units}× {k.name} ({k.n_atoms} atoms, {k.n_beads} beads"
                         + (f", {k.n_frame_beads} frame beads" if k.n_frame_beads != k.n_beads else "") + ")"
                         for k in self.kinds)


# ---------------------------------------------------------------------------------------------- geometry
def kabsch(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rotations ``Q`` (proper, det +1) minimising ``|source @ Q.T - target|`` for centred point sets.

    ``source`` and ``target`` are ``(..., n, 3)`` and already centred; returns ``(..., 3, 3)``. Degenerate sets
    (one point, or collinear points) give one of the optimal rotations.
    """
    h = source.transpose(-1, -2) @ target  # (..., 3, 3)
    u, _, vt = torch.linalg.svd(h)
    m = vt.transpose(-1, -2) @ u.transpose(-1, -2)
    # det of the 3x3 matrices by the triple product: ~10x cheaper than torch.linalg.det for small batches
    d = torch.sign((torch.linalg.cross(m[..., 0, :], m[..., 1, :]) * m[..., 2, :]).sum(-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    diag = torch.ones(h.shape[:-2] + (3,), dtype=h.dtype, device=h.device)
    diag[..., 2] = d
    return vt.transpose(-1, -2) @ torch.diag_embed(diag) @ u.transpose(-1, -2)


def kabsch_residual(source: torch.Tensor, target: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """``min_Q |source @ Q.T - target|²`` over proper rotations, for centred ``(..., n, 3)`` point sets, without
    computing ``Q``: Theobald's QCP (Acta Cryst. A 61, 478 (2005); the method of mdtraj's RMSD), the largest root of
    the quaternion key matrix's characteristic polynomial found by Newton's method from its upper bound
    ``(|source|² + |target|²) / 2``. Computed in float64; returns ``(...)`` in the input's dtype. A batched SVD
    (:func:`kabsch`) costs ~8× more on a CPU for the library lookup's thousands of 3×3 problems.

    Accurate to ~1e-14 of ``|source|² + |target|²`` for point sets in general position. Near a double root, i.e.
    for (nearly) collinear sets, the polynomial's rounding limits it to ~1e-4 of that; two points, always collinear,
    take the exact closed form ``(|a| - |b|)² / 2`` instead (``a``, ``b`` the separations of the two points).
    """
    dtype = source.dtype
    src, tgt = source.double(), target.double()
    if src.shape[-2] == 2:
        return (0.5 * ((src[..., 0, :] - src[..., 1, :]).norm(dim=-1)
                       - (tgt[..., 0, :] - tgt[..., 1, :]).norm(dim=-1)) ** 2).to(dtype)
    e0 = 0.5 * ((src ** 2).sum(dim=(-1, -2)) + (tgt ** 2).sum(dim=(-1, -2)))
    h = src.transpose(-1, -2) @ tgt
    sxx, sxy, sxz = h[..., 0, 0], h[..., 0, 1], h[..., 0, 2]
    syx, syy, syz = h[..., 1, 0], h[..., 1, 1], h[..., 1, 2]
    szx, szy, szz = h[..., 2, 0], h[..., 2, 1], h[..., 2, 2]
    sxx2, syy2, szz2 = sxx * sxx, syy * syy, szz * szz
    sxy2, syz2, sxz2 = sxy * sxy, syz * syz, sxz * sxz
    syx2, szy2, szx2 = syx * syx, szy * szy, szx * szx
    syzszymsyyszz2 = 2.0 * (syz * szy - syy * szz)
    sxx2syy2szz2syz2szy2 = syy2 + szz2 - sxx2 + syz2 + szy2
    sxy2sxz2syx2szx2 = sxy2 + sxz2 - syx2 - szx2
    sxzpszx, syzpszy, sxypsyx = sxz + szx, syz + szy, sxy + syx
    syzmszy, sxzmszx, sxymsyx = syz - szy, sxz - szx, sxy - syx
    sxxpsyy, sxxmsyy = sxx + syy, sxx - syy
    c2 = -2.0 * (sxx2 + syy2 + szz2 + sxy2 + syx2 + sxz2 + szx2 + syz2 + szy2)
    c1 = 8.0 * (sxx * syz * szy + syy * szx * sxz + szz * sxy * syx
                - sxx * syy * szz - syz * szx * sxy - szy * syx * sxz)
    c0 = (sxy2sxz2syx2szx2 * sxy2sxz2syx2szx2
          + (sxx2syy2szz2syz2szy2 + syzszymsyyszz2) * (sxx2syy2szz2syz2szy2 - syzszymsyyszz2)
          + (-sxzpszx * syzmszy + sxymsyx * (sxxmsyy - szz)) * (-sxzmszx * syzpszy + sxymsyx * (sxxmsyy + szz))
          + (-sxzpszx * syzpszy - sxypsyx * (sxxpsyy - szz)) * (-sxzmszx * syzmszy - sxypsyx * (sxxpsyy + szz))
          + (sxypsyx * syzpszy + sxzpszx * (sxxmsyy + szz)) * (-sxymsyx * syzmszy + sxzpszx * (sxxpsyy + szz))
          + (sxypsyx * syzmszy + sxzmszx * (sxxmsyy - szz)) * (-sxymsyx * syzpszy + sxzmszx * (sxxpsyy - szz)))
    lam = e0.clone()
    for _ in range(iterations):  # quadratic convergence, linear near a double root (e.g. a mirror image)
        x2 = lam * lam
        b = (x2 + c2) * lam
        a = b + c1
        denominator = 2.0 * x2 * lam + b + a
        step = (a * lam + c0) / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
        step = torch.where(denominator == 0, torch.zeros_like(step), step)
        lam = lam - step
        if bool((step.abs() <= 1e-14 * e0).all()):
            break
    return (2.0 * (e0 - lam)).clamp_min(0.0).to(dtype)


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
