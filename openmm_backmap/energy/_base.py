"""Interface and batched geometry shared by the energy terms.

Every native term is a ``torch.nn.Module`` built from one OpenMM force.  ``forward`` takes positions
``(B, n, 3)`` in nm and optional box vectors ``(B, 3, 3)`` in nm (rows a, b, c) and returns a dict from a
term category (``"bond"``, ``"angle"``, ``"torsion"``, ``"cmap"``, ``"lj"``, ``"coulomb"``, ...) to energies
``(B,)`` in kJ/mol.  Forces come from autograd.  Parameters and index lists are buffers, so ``.to(dtype,
device)`` moves a term like any module.

Internally the terms work on batch-last coordinates ``(3, n, B)`` (:func:`batch_last`): gathering atoms is
an ``index_select`` along the atom axis, each Cartesian component of the gathered vectors is a contiguous
``(M, B)`` array, and all arithmetic runs along the contiguous batch axis with explicit component formulas
(dot and cross products of vectors as tuples of components; far cheaper forwards and backwards than
reductions and ``torch.linalg.cross`` over a size-3 axis).  :class:`AAEnergy` converts the positions once
and calls :meth:`EnergyTerm.energy` of every term.
"""
from __future__ import annotations

import numpy as np
import torch

#: Coulomb constant ONE_4PI_EPS0 as used by OpenMM, kJ mol^-1 nm e^-2.
ONE_4PI_EPS0 = 138.93545764438198


class EnergyTerm(torch.nn.Module):
    """Base class of native (pure torch) energy terms.

    Subclasses implement :meth:`energy` on batch-last coordinates; ``forward`` takes positions ``(B, n, 3)``.
    """

    #: Term categories this module returns, in order.
    categories: tuple[str, ...] = ()

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Energies ``(B,)`` in kJ/mol per category of positions ``(B, n, 3)`` in nm."""
        return self.energy(batch_last(positions), box)

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Energies ``(B,)`` in kJ/mol per category of coordinates ``(3, n, B)`` (see :func:`batch_last`)."""
        raise NotImplementedError

    def subset(self, new_index: np.ndarray, in_subset: np.ndarray) -> "EnergyTerm | None":
        """The same term restricted to a subset of atoms.

        Parameters
        ----------
        new_index
            ``(n_atoms,)`` int: each atom's index in the new, smaller position array, or -1 if the atom is
            not part of it.
        in_subset
            ``(n_atoms,)`` bool: atoms whose interactions count.  An interaction is kept when all its atoms
            have ``new_index >= 0`` and at least one is ``in_subset`` (so interactions within a fixed
            environment are left out, interactions between the subset and the environment kept).

        Returns
        -------
        EnergyTerm or None
            ``None`` if no interaction is left.
        """
        raise NotImplementedError


def keep_interactions(atoms: np.ndarray, new_index: np.ndarray, in_subset: np.ndarray) -> np.ndarray:
    """Boolean mask over interactions ``atoms (M, k)`` implementing the rule of :meth:`EnergyTerm.subset`."""
    atoms = np.asarray(atoms, dtype=np.int64).reshape(len(atoms), -1)
    if atoms.size == 0:
        return np.zeros(len(atoms), dtype=bool)
    return (new_index[atoms] >= 0).all(axis=1) & in_subset[atoms].any(axis=1)


def batch_last(positions: torch.Tensor) -> torch.Tensor:
    """Positions ``(B, n, 3)`` as contiguous coordinates ``(3, n, B)``, the layout of :meth:`EnergyTerm.energy`."""
    return positions.permute(2, 1, 0).contiguous()


#: A batch of 3-vectors as its three Cartesian components, each ``(M, B)``.
Vectors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def minimum_image(delta: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Minimum-image displacement vectors, OpenMM's convention for reduced triclinic boxes.

    Parameters
    ----------
    delta
        ``(3, M, B)`` displacements in nm (batch-last layout).
    box
        ``(B, 3, 3)`` box vectors in nm, rows a, b, c in OpenMM's reduced form (a along x, b in the xy
        plane).
    """
    vectors = box.permute(1, 2, 0).unsqueeze(2)  # (vector, component, 1, B)
    for k in (2, 1, 0):
        # The number of box vectors to subtract is piecewise constant: no gradient flows through it.
        shift = torch.round(delta[k].detach() / box[:, k, k].detach())
        delta = delta - vectors[k] * shift
    return delta


def bond_vectors(coordinates: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                 box: torch.Tensor | None = None) -> torch.Tensor:
    """``r[end] - r[start]``: ``(3, M, B)`` vectors between atoms ``start, end (M,)`` of coordinates
    ``(3, n, B)``, with the minimum-image convention if ``box (B, 3, 3)`` is given."""
    delta = coordinates.index_select(1, end) - coordinates.index_select(1, start)
    return delta if box is None else minimum_image(delta, box)


def dot(u: Vectors, v: Vectors) -> torch.Tensor:
    """Dot products ``(M, B)`` of vectors given as components."""
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def norm(u: Vectors) -> torch.Tensor:
    """Lengths ``(M, B)`` of vectors given as components.  A zero vector has a vanishing length with zero
    gradient (as ``torch.linalg.norm``'s subgradient), not the infinite gradient of ``sqrt`` at 0."""
    return torch.sqrt(dot(u, u).clamp_min(torch.finfo(u[0].dtype).tiny))


def cross(u: Vectors, v: Vectors) -> Vectors:
    """Cross products of vectors given as components."""
    return u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]


def dihedral_from_bonds(b0: Vectors, b1: Vectors, b2: Vectors) -> torch.Tensor:
    """Dihedral angles (rad, in [-pi, pi]) of chains of bond vectors ``b0, b1, b2`` given as components,
    IUPAC sign convention (as OpenMM): ``atan2(|b1| b0 . (b1 x b2), (b0 x b1) . (b1 x b2))``."""
    n2 = cross(b1, b2)
    y = dot(b0, n2) * torch.sqrt(dot(b1, b1))
    return torch.atan2(y, dot(cross(b0, b1), n2))


def dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """Dihedral angle (rad, in [-pi, pi]) of four points ``(..., 3)``, IUPAC sign convention (as OpenMM)."""
    return dihedral_from_bonds((p1 - p0).unbind(-1), (p2 - p1).unbind(-1), (p3 - p2).unbind(-1))
