"""Statistically optimal linear force maps (force aggregation; Krämer et al., JPCL 14, 3970, 2023).

Any force map ``G`` that is consistent with the position map ``P`` (``G P^T = I``, and equal on the atoms of a
cluster joined by constraints) gives mapped forces ``G f`` whose conditional mean at fixed CG coordinates is the
same mean force (the gradient of the many-body PMF). Their *noise* is not the same: the net force on a bead's
atoms carries the fast bond and angle forces that pull the bead against its neighbours, and atoms outside the
bead can cancel much of it. Force matching learns the mean force from a noisy target, so a map with less noise is
worth more data. Because the mean force is fixed, minimising the mean square of ``G f`` over AA frames minimises the
noise; for each bead ``I`` that is a quadratic programme with linear equality constraints::

    minimise  g^T S g   subject to  P g = e_I,   g_i = g_j for constrained atoms i, j,

with ``S_ij = <f_i . f_j> / 3`` the second moment of the atomic forces (per Cartesian component, averaged over
frames and components). It is solved here exactly (KKT system) over the atoms of the bead's molecule (connected
component of the bond graph): forces on other molecules are left out, which keeps the map local and sparse.
Copies of one molecule (a liquid's molecules) share one map fitted to all of them: their second moments are pooled.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

#: Largest molecule (atoms) whose force second moment is formed densely; larger molecules are refused.
MAX_MOLECULE_ATOMS = 5000
#: Ridge added to the second moment, relative to its mean diagonal: fixes the weights of atoms that carry no force
#: (massless sites, fixed atoms) at zero instead of leaving the system singular; far below any force's variance.
RIDGE = 1e-9


def optimal_force_matrix(
    position: sp.spmatrix,
    force_chunks: Iterable[np.ndarray],
    molecules: np.ndarray,
    constraints: np.ndarray,
    atom_labels: Optional[np.ndarray] = None,
) -> sp.csr_matrix:
    """The force map of least mean-square mapped force consistent with ``position`` and ``constraints``.

    Parameters
    ----------
    position
        Position map ``P``, shape ``(n_beads, n_atoms)``, rows summing to one.
    force_chunks
        AA forces in blocks of frames, each ``(n, n_atoms, 3)`` (kJ/mol/nm), finite; only the second moments of the
        atoms of molecules that hold beads are accumulated, so a solvated system never needs all forces in memory.
    molecules
        Molecule label of every atom, shape ``(n_atoms,)``; a bead's row is supported on its molecule's atoms.
    constraints
        Constrained atom pairs, shape ``(n_constraints, 2)``; such atoms get equal weights.
    atom_labels
        Chemical identity of every atom, shape ``(n_atoms,)`` (e.g. integers for residue name, atom name and
        element). Molecules whose atoms carry the same labels in the same order, with the same beads and the same
        constraint ties, are copies of one species: their second moments are pooled and they share one map (the
        molecules of a liquid get one map fitted to all of them, with as many samples as molecules per frame).
        ``None``: every molecule is fitted on its own.

    Returns
    -------
    scipy.sparse.csr_matrix
        ``G``, shape ``(n_beads, n_atoms)``, with ``G P^T = I``.
    """
    position = sp.csr_matrix(position)
    n_beads, n_atoms = position.shape
    if len(constraints):  # constraint clusters: atoms tied to one weight
        graph = sp.coo_matrix((np.ones(len(constraints)), (constraints[:, 0], constraints[:, 1])),
                              shape=(n_atoms, n_atoms))
        _, cluster = connected_components(graph, directed=False)
    else:
        cluster = np.arange(n_atoms)
    bead_molecules = [np.unique(molecules[position[I].indices]) for I in range(n_beads)]
    spanning = [I for I, mols in enumerate(bead_molecules) if len(mols) > 1]
    if spanning:
        raise ValueError(f"bead {spanning[0]} combines atoms of several molecules: no optimised force map for it")
    beads_of: dict[int, list[int]] = {}  # the beads of every molecule that holds beads
    for I, mols in enumerate(bead_molecules):
        beads_of.setdefault(int(mols[0]), []).append(I)
    order = np.argsort(molecules, kind="stable")
    bounds = np.searchsorted(molecules[order], [np.arange(molecules.max() + 1), np.arange(1, molecules.max() + 2)])
    # species: molecules with the same atoms, beads and ties share one second moment and one solution
    species: dict[tuple, _Species] = {}
    for mol, beads in sorted(beads_of.items()):
        atoms = order[bounds[0, mol]:bounds[1, mol]]
        if len(atoms) > MAX_MOLECULE_ATOMS:
            raise ValueError(f"a molecule of {len(atoms)} atoms is too large for an optimised force map "
                             f"(at most {MAX_MOLECULE_ATOMS})")
        _, first, tie = np.unique(cluster[atoms], return_index=True, return_inverse=True)
        tie = np.argsort(np.argsort(first))[tie]  # tie classes numbered by first appearance
        block = position[beads][:, atoms].toarray()
        key = (("molecule", mol) if atom_labels is None else
               (tuple(np.asarray(atom_labels)[atoms].tolist()), block.shape, block.round(12).tobytes(), tie.tobytes()))
        if key not in species:
            species[key] = _Species(block, tie)
        species[key].members.append((atoms, beads))
    groups = list(species.values())
    for group in groups:
        group.atoms = np.stack([atoms for atoms, _ in group.members])  # (copies, atoms)
    for chunk in force_chunks:
        for group in groups:
            f = chunk[:, group.atoms, :]  # (n, copies, atoms, 3)
            f = f.transpose(0, 1, 3, 2).reshape(-1, group.atoms.shape[1])  # (3 n copies, atoms)
            group.moment += f.T @ f
            group.n_samples += len(f)
    rows, cols, vals = [], [], []
    for group in groups:
        weights = group.solve()  # (atoms, beads of one copy)
        for atoms, beads in group.members:
            for k, I in enumerate(beads):
                keep = np.abs(weights[:, k]) > 1e-12
                rows.append(np.full(int(keep.sum()), I))
                cols.append(atoms[keep])
                vals.append(weights[keep, k])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_beads, n_atoms))


class _Species:
    """Copies of one molecule (atoms and beads of each) with their pooled force second moment."""

    def __init__(self, block: np.ndarray, tie: np.ndarray) -> None:
        self.block, self.tie = block, tie  # position map of one copy (beads, atoms); tie class of every atom
        self.members: list[tuple[np.ndarray, list[int]]] = []
        self.atoms = np.zeros((0, 0), dtype=np.int64)
        self.moment = np.zeros((block.shape[1], block.shape[1]))
        self.n_samples = 0

    def solve(self) -> np.ndarray:
        """Weights ``(atoms, beads)`` of one copy: the KKT system of the module docstring."""
        n_atoms, n_beads = self.block.shape[1], self.block.shape[0]
        n_var = int(self.tie.max()) + 1
        tie_matrix = np.zeros((n_atoms, n_var))
        tie_matrix[np.arange(n_atoms), self.tie] = 1.0
        reduced = tie_matrix.T @ (self.moment / self.n_samples) @ tie_matrix
        reduced += RIDGE * max(float(np.trace(reduced)) / n_var, 1e-300) * np.eye(n_var)
        constraint = self.block @ tie_matrix  # (beads, n_var)
        kkt = np.block([[2.0 * reduced, constraint.T], [constraint, np.zeros((n_beads, n_beads))]])
        rhs = np.concatenate([np.zeros((n_var, n_beads)), np.eye(n_beads)])
        try:
            solution = np.linalg.solve(kkt, rhs)[:n_var]  # (n_var, beads)
        except np.linalg.LinAlgError as exc:
            raise ValueError("the optimised force map is not determined: the beads of a molecule are linearly "
                             "dependent in the position map") from exc
        return tie_matrix @ solution
