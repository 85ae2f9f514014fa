"""Interface and batched geometry shared by the energy terms.

Every native term is a ``torch.nn.Module`` built from one OpenMM force.  ``forward`` takes positions
``(B, n, 3)`` in nm and optional box vectors ``(B, 3, 3)`` in nm (rows a, b, c) and returns a dict from a
term category (``"bond"``, ``"angle"``, ``"torsion"``, ``"cmap"``, ``"lj"``, ``"coulomb"``, ...) to energies
``(B,)`` in kJ/mol.  Forces come from autograd.  Parameters and index lists are buffers, so ``.to(dtype,
device)`` moves a term like any module.
"""
from __future__ import annotations

import numpy as np
import torch

#: Coulomb constant ONE_4PI_EPS0 as used by OpenMM, kJ mol^-1 nm e^-2.
ONE_4PI_EPS0 = 138.93545764438198


class EnergyTerm(torch.nn.Module):
    """Base class of native (pure torch) energy terms."""

    #: Term categories this module returns, in order.
    categories: tuple[str, ...] = ()

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
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


def minimum_image(delta: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Minimum-image displacement vectors, OpenMM's convention for reduced triclinic boxes.

    Parameters
    ----------
    delta
        ``(B, M, 3)`` displacements in nm.
    box
        ``(B, 3, 3)`` box vectors in nm, rows a, b, c in OpenMM's reduced form (a along x, b in the xy
        plane).
    """
    a, b, c = box[:, None, 0], box[:, None, 1], box[:, None, 2]
    delta = delta - c * torch.round(delta[..., 2:3] / c[..., 2:3])
    delta = delta - b * torch.round(delta[..., 1:2] / b[..., 1:2])
    delta = delta - a * torch.round(delta[..., 0:1] / a[..., 0:1])
    return delta


def displacement(positions: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                 box: torch.Tensor | None = None) -> torch.Tensor:
    """``r_j - r_i`` for index tensors ``i, j (M,)`` over a batch ``(B, n, 3)``; minimum image if ``box``."""
    d = positions[:, j] - positions[:, i]
    return minimum_image(d, box) if box is not None else d


def dihedral(p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
    """Dihedral angle (rad, in (-pi, pi]) of four points ``(..., 3)``, IUPAC sign convention (as OpenMM)."""
    b0, b1, b2 = p1 - p0, p2 - p1, p3 - p2
    n1 = torch.cross(b0, b1, dim=-1)
    n2 = torch.cross(b1, b2, dim=-1)
    m1 = torch.cross(n1, b1 / torch.linalg.norm(b1, dim=-1, keepdim=True), dim=-1)
    x = (n1 * n2).sum(-1)
    y = (m1 * n2).sum(-1)
    return -torch.atan2(y, x)
