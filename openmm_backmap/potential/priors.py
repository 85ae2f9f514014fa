"""Physical priors of a CG potential and their fit by direct Boltzmann inversion.

A force-matched CG potential is the sum of a neural network and physical *priors* (seed 004, eqs. 4-5):
harmonic bonds and angles, Fourier dihedrals and an excluded-volume repulsion.  The priors keep the CG
model away from configurations the training data never visit (overlapping beads, overstretched bonds);
the network learns the remainder of the forces.

Every prior is a TorchScript-compatible ``torch.nn.Module`` with the contract shared with the network::

    forward(positions (B, n_beads, 3) nm, box (B, 3, 3) nm or None) -> energies (B,) kJ/mol
    energy_and_forces(positions, box) -> energies (B,) kJ/mol, forces (B, n_beads, 3) kJ/mol/nm
    config() -> JSON-serialisable constructor arguments; ``cls(**prior.config())`` rebuilds the prior

``forward`` is differentiable to any order (force-matching training differentiates its gradient);
``energy_and_forces`` gives the same energies and the forces ``-dE/dr`` written out, without autograd,
for MD (:meth:`.model.CGPotential.md_energy_and_forces`).

Conventions
-----------
* Box vectors are rows a, b, c in OpenMM's reduced triclinic form (a along x, b in the xy plane); a single
  box ``(3, 3)`` is also accepted.  When a box is given, every interaction vector (bond, angle and dihedral
  vectors, non-bonded pair vectors) is taken as its minimum image by OpenMM's sequential reduction
  (subtract ``c round(dz / c_z)``, then ``b round(dy / b_y)``, then ``a round(dx / a_x)``), which is exact
  for vectors shorter than half the smallest box width.
* Harmonic terms are ``E = k/2 (x - x0)^2`` as in OpenMM.  Seed 004 (eq. 5) writes ``k_b (l - l0)^2``, so
  ``k = 2 k_b``.
* Angles are ``atan2(|u x v|, u . v)`` with ``u = r_i - r_j`` and ``v = r_k - r_j``: accurate and with
  bounded gradients near 0 and pi, where ``acos`` of the cosine is not.
* Dihedrals follow the IUPAC sign convention, as OpenMM and mdtraj.
* Index lists are ``int64`` buffers and parameters ``float64`` buffers; ``forward`` computes in the dtype
  of ``positions``, so the same module serves float32 (GPU platforms) and float64 (Reference, CPU).

Analytic forces
---------------
Each prior is a function of *difference vectors* ``r_head - r_tail`` (minimum images with a box): bond and
pair vectors, the two arms of an angle, and ``b0, b2, b1, -b1`` of a dihedral (a vector may appear more
than once).  ``energy_terms_and_gradient(vectors (B, V, 3))`` returns per-interaction energy terms and the
gradient of the energy with respect to each vector, up to a constant factor per vector (a sign, or ``-n``
for the excluded volume) that is folded into the scatter (:func:`scatter_plan`): a dense ``(n_beads, V)``
matrix product for small systems, ``index_add_`` for large ones.  So a prior costs one gather, a few dozen
element-wise operations on all its interactions at once and one scatter, with no autograd graph;
:class:`.model.CGPotential` gathers and scatters the vectors of all its priors together.  The angle and
dihedral gradients are written in forms that stay finite and accurate near 0 and pi (see the methods).

Fitting (:func:`fit_priors`) follows direct Boltzmann inversion (thesis seed 003, eqs. 2.33-2.34):
``U(x) = -kT ln(p(x) / J(x))`` with the Jacobian ``J(r) = r^2`` for distances, ``J(theta) = sin(theta)``
for angles and ``J(phi) = 1`` for dihedrals; each potential of mean force is then fitted by weighted least
squares with the functional form of its prior.
"""
import copy
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch

from .._physics import BOLTZMANN_KJ_MOL_K
from .._validation import as_box_vectors, as_coordinates, strip_unit
from .neighbors import minimum_image, neighbor_pairs

try:
    from openmm import unit as _unit
except ImportError:  # pragma: no cover
    _unit = None

__all__ = [
    "BOLTZMANN_KJ_MOL_K",
    "PRIOR_CLASSES",
    "CosineAnglePrior",
    "ExcludedVolumePrior",
    "FourierDihedralPrior",
    "HarmonicAnglePrior",
    "HarmonicBondPrior",
    "NeighborExcludedVolumePrior",
    "angles_from_bonds",
    "dihedrals_from_bonds",
    "excluded_pairs",
    "fit_priors",
    "nonbonded_pairs",
    "prior_from_dict",
    "prior_to_dict",
]

#: Prior terms :func:`fit_priors` can fit, in the order it returns them.
TERMS = ("bonds", "angles", "dihedrals", "excluded_volume")
#: Cosine-series angle priors (angles whose PMF is not harmonic): number of terms K, histogram bins over
#: [0, pi], the height (kT) of the wall where angles stop being seen and its slope (kT/rad) beyond. K = 16
#: reproduces the three-peaked end-middle-end angle of 3-bead hexane to a JSD of 0.001 (a harmonic fallback:
#: 0.10). The slope matters: a flat wall exerts no force on a molecule that crossed it (with a flat wall,
#: hexane's 1 ns CG run ended with an angle std of 0.63 rad against 0.36 in the data).
ANGLE_SERIES_TERMS = 16
ANGLE_SERIES_BINS = 72
ANGLE_SERIES_WALL_KT = 10.0
ANGLE_SERIES_WALL_SLOPE_KT_PER_RAD = 20.0

#: Fraction of samples cut from each end of the histogram range of bonds and angles (outliers).
_RANGE_TAIL = 1e-3
#: Pair distances held in memory at once while scanning frames for the closest approaches.
_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------- geometry
def _chain_vectors(positions: torch.Tensor, atoms: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Vectors ``(B, M, w - 1, 3)`` from each bead of the chains ``atoms (M, w)`` to the next bead."""
    n_frames = positions.shape[0]
    chain = positions.index_select(1, atoms.reshape(-1)).reshape(n_frames, atoms.shape[0], atoms.shape[1], 3)
    delta = chain[:, :, 1:] - chain[:, :, :-1]
    if box is None:
        return delta
    cell = box.to(positions.dtype)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0).expand(n_frames, 3, 3)
    shape = delta.shape
    return minimum_image(delta.reshape(n_frames, -1, 3), cell[:, None]).reshape(shape)


def _distances(positions: torch.Tensor, atoms: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Distances ``(B, M)`` in nm between the bead pairs ``atoms (M, 2)``."""
    return torch.linalg.vector_norm(_chain_vectors(positions, atoms, box)[:, :, 0], dim=-1)


def _angles(positions: torch.Tensor, atoms: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Angles ``(B, M)`` in rad, in ``[0, pi]``, at the middle bead of ``atoms (M, 3)``."""
    delta = _chain_vectors(positions, atoms, box)
    u = -delta[:, :, 0]
    v = delta[:, :, 1]
    sine = torch.linalg.vector_norm(torch.linalg.cross(u, v, dim=-1), dim=-1)
    return torch.atan2(sine, (u * v).sum(-1))


def _dihedrals(positions: torch.Tensor, atoms: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """Dihedral angles ``(B, M)`` in rad, in ``[-pi, pi]``, of ``atoms (M, 4)``; IUPAC sign convention."""
    delta = _chain_vectors(positions, atoms, box)
    b0 = delta[:, :, 0]
    b1 = delta[:, :, 1]
    b2 = delta[:, :, 2]
    n1 = torch.linalg.cross(b0, b1, dim=-1)
    n2 = torch.linalg.cross(b1, b2, dim=-1)
    y = (b0 * n2).sum(-1) * torch.linalg.vector_norm(b1, dim=-1)
    return torch.atan2(y, (n1 * n2).sum(-1))


# ------------------------------------------------------------------------------------------- validation
def _index_array(
    value: Any, width: int, name: str, *, n_beads: Optional[int] = None, allow_empty: bool = False
) -> np.ndarray:
    """Interaction list as an ``int64`` array ``(M, width)``: non-negative, distinct beads per row, unique."""
    try:
        arr = np.asarray(value if value is not None else [])
    except ValueError as exc:
        raise ValueError(f"{name} must be a list of [{', '.join('ijkl'[:width])}] bead indices") from exc
    if arr.size == 0:
        if not allow_empty:
            raise ValueError(f"{name} is empty; give at least one interaction of {width} bead indices")
        return np.zeros((0, width), dtype=np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2 and arr.shape[1] == width):
        raise ValueError(f"{name} must be a list of [{', '.join('ijkl'[:width])}] integer bead indices; "
                         f"got an array of shape {arr.shape} and dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise ValueError(f"{name} contains a negative bead index")
    if n_beads is not None and arr.max() >= n_beads:
        raise ValueError(f"{name} refers to bead {arr.max()} but there are only {n_beads} beads")
    ordered = np.sort(arr, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
    if repeated.any():
        raise ValueError(f"{name} entry {arr[np.argmax(repeated)].tolist()} uses a bead more than once")
    if len(np.unique(_canonical_paths(arr), axis=0)) < len(arr):
        raise ValueError(f"{name} lists an interaction more than once (a path and its reverse are the same)")
    return arr


def _canonical_paths(paths: np.ndarray) -> np.ndarray:
    """Each path or its reverse, whichever is lexicographically smaller (rows of ``paths (M, w)``)."""
    reverse = paths[:, ::-1]
    diff = paths - reverse
    first = np.argmax(diff != 0, axis=1)
    take_reverse = diff[np.arange(len(paths)), first] > 0
    return np.where(take_reverse[:, None], reverse, paths)


def _float_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a ``float64`` array, with an error naming ``name``."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array; got {type(value).__name__}") from exc


def _parameter_array(value: Any, shape: Tuple[int, ...], name: str, *, minimum: Optional[float] = None) -> np.ndarray:
    """Finite ``float64`` parameters of the given shape (at least ``minimum`` if given)."""
    arr = _float_array(value, name)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape} (one value per interaction); got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if minimum is not None and (arr < minimum).any():
        raise ValueError(f"{name} must be >= {minimum}; got {arr.min()}")
    return arr


def _positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _type_codes(bead_types: Sequence[Any], n_beads: int) -> Tuple[np.ndarray, List[Any]]:
    """Integer code of each bead's type (types numbered in order of first appearance) and the type list."""
    types = list(bead_types)
    if len(types) != n_beads:
        raise ValueError(f"bead_types has {len(types)} entries but there are {n_beads} beads")
    for t in types:
        if isinstance(t, bool) or not isinstance(t, (str, int, np.integer)):
            raise ValueError(f"bead_types entries must be strings or integers; got {t!r}")
    names: List[Any] = []
    index: Dict[Any, int] = {}
    for t in types:
        if t not in index:
            index[t] = len(names)
            names.append(t)
    return np.array([index[t] for t in types], dtype=np.int64), names


# ------------------------------------------------------------------------------------------ analytic forces
#: Largest dense scatter matrix (beads x difference vectors) used for the forces; ``index_add_`` beyond.
DENSE_SCATTER_MAX = 1 << 16


def _difference_vectors(positions: torch.Tensor, head: torch.Tensor, tail: torch.Tensor,
                        box: Optional[torch.Tensor]) -> torch.Tensor:
    """Vectors ``r_head - r_tail`` ``(B, V, 3)``, minimum images when ``box`` is given."""
    delta = positions.index_select(1, head) - positions.index_select(1, tail)
    if box is None:
        return delta
    cell = box.to(positions.dtype)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    return minimum_image(delta, cell.unsqueeze(1))


def _scatter_forces(gradient: torch.Tensor, n_beads: int, matrix: Optional[torch.Tensor], index: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Forces ``(B, n_beads, 3)`` from the vector gradients ``(B, V, 3)`` of :func:`scatter_plan` (``matrix``
    with a leading dimension of 1)."""
    if matrix is not None and matrix.shape[1] == n_beads:
        return torch.bmm(matrix.to(gradient.dtype).expand(gradient.shape[0], -1, -1), gradient)
    forces = torch.zeros(gradient.shape[0], n_beads, 3, dtype=gradient.dtype, device=gradient.device)
    return forces.index_add_(1, index, torch.cat([gradient, gradient], 1) * weight.to(gradient.dtype))


def scatter_plan(head: np.ndarray, tail: np.ndarray, scale: np.ndarray,
                 n_beads: int) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """How the gradients ``g (B, V, 3)`` with respect to the vectors ``r_head - r_tail`` become forces.

    The gradient of the energy with respect to vector ``v`` is ``scale[v] * g[:, v]``; the forces are
    ``F = -dE/dr``.  Returns a dense ``(n_beads, V)`` matrix ``W`` with ``F = W @ g`` when it has at most
    :data:`DENSE_SCATTER_MAX` entries (else ``None``), and the ``index (2 V,)`` and ``weight (2 V, 1)`` of
    ``F.index_add_(1, index, cat([g, g], 1) * weight)``.
    """
    head = np.asarray(head, dtype=np.int64)
    tail = np.asarray(tail, dtype=np.int64)
    scale = np.asarray(scale, dtype=np.float64)
    index = np.concatenate([head, tail])
    weight = np.concatenate([-scale, scale])[:, None]
    matrix = None
    if n_beads * len(head) <= DENSE_SCATTER_MAX:
        matrix = np.zeros((n_beads, len(head)))
        columns = np.arange(len(head))
        np.add.at(matrix, (head, columns), -scale)
        np.add.at(matrix, (tail, columns), scale)
    return matrix, index, weight


# ------------------------------------------------------------------------------------------------ priors
class _Prior(torch.nn.Module):
    """Base of the priors: keeps the normalised constructor arguments for :meth:`config`, and computes
    energies and forces analytically (:meth:`energy_and_forces`) from the subclass's
    :meth:`energy_terms_and_gradient` over difference vectors of bead positions."""

    __jit_ignored_attributes__ = ["_config"]

    def __init__(self, config: Dict[str, Any]) -> None:
        super().__init__()
        self._config = config

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments: ``type(self)(**self.config())`` rebuilds this prior."""
        return copy.deepcopy(self._config)

    @property
    def num_interactions(self) -> int:
        """Number of interactions (bonds, angles, dihedrals or bead pairs) evaluated."""
        return int(self.atoms.shape[0])

    def _register_atoms(self, atoms: np.ndarray) -> None:
        self.register_buffer("atoms", torch.from_numpy(np.ascontiguousarray(atoms, dtype=np.int64)))

    def _register_floats(self, **values: np.ndarray) -> None:
        for name, value in values.items():
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))

    def _register_vectors(self, head: np.ndarray, tail: np.ndarray, scale: np.ndarray, *, n_beads: int,
                          n_energy_terms: int, energy_scale: float) -> None:
        """Difference vectors ``r_head - r_tail`` that :meth:`energy_terms_and_gradient` takes, the scale of
        each vector's gradient (see :func:`scatter_plan`), and the energy as ``energy_scale`` times the sum
        of the ``n_energy_terms`` terms.  These buffers are derived from ``atoms`` and not saved."""
        self.energy_scale = float(energy_scale)
        self.n_energy_terms = int(n_energy_terms)
        self.n_vectors = len(head)
        matrix, index, weight = scatter_plan(head, tail, scale, n_beads)
        for name, value in [("vector_head", head), ("vector_tail", tail), ("scatter_index", index)]:
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64)),
                                 persistent=False)
        for name, value in [("vector_scale", scale), ("scatter_weight", weight), ("scatter_matrix", matrix)]:
            tensor = None if value is None else torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
            if name == "scatter_matrix" and tensor is not None:
                tensor = tensor.unsqueeze(0)
            self.register_buffer(name, tensor, persistent=False)

    @torch.jit.export
    def energy_and_forces(self, positions: torch.Tensor,
                          box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies ``(B,)`` in kJ/mol and forces ``(B, n_beads, 3)`` in kJ/mol/nm, without autograd.

        The same energies as :meth:`forward`; the forces are its negative gradient, written out.
        """
        vectors = _difference_vectors(positions, self.vector_head, self.vector_tail, box)
        terms, gradient = self.energy_terms_and_gradient(vectors)
        forces = _scatter_forces(gradient, positions.shape[1], self.scatter_matrix, self.scatter_index,
                                 self.scatter_weight)
        return terms.sum(-1) * self.energy_scale, forces

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energy terms ``(B, n_energy_terms)`` (the energy is ``energy_scale`` times their sum) and the
        vector gradients ``(B, n_vectors, 3)`` (see :func:`scatter_plan`) from the difference vectors
        ``(B, n_vectors, 3)``."""
        raise NotImplementedError


class HarmonicBondPrior(_Prior):
    """Harmonic bonds ``E = sum_b k_b/2 (r_b - r0_b)^2``.

    This is OpenMM's convention; seed 004 (eq. 5) writes ``k_b (l - l0)^2``, i.e. half our ``k``.

    Parameters
    ----------
    bonds
        ``(M, 2)`` bead index pairs.
    r0_nm
        ``(M,)`` equilibrium lengths in nm.
    k_kj_mol_nm2
        ``(M,)`` force constants in kJ mol^-1 nm^-2.
    """

    def __init__(self, bonds: Any, r0_nm: Any, k_kj_mol_nm2: Any) -> None:
        atoms = _index_array(bonds, 2, "bonds")
        r0 = _parameter_array(r0_nm, (len(atoms),), "r0_nm", minimum=0.0)
        k = _parameter_array(k_kj_mol_nm2, (len(atoms),), "k_kj_mol_nm2", minimum=0.0)
        super().__init__({"bonds": atoms.tolist(), "r0_nm": r0.tolist(), "k_kj_mol_nm2": k.tolist()})
        self._register_atoms(atoms)
        self._register_floats(r0=r0, k=k)
        # vectors r_j - r_i, one per bond
        self._register_vectors(atoms[:, 1], atoms[:, 0], np.ones(len(atoms)), n_beads=int(atoms.max()) + 1,
                               n_energy_terms=len(atoms), energy_scale=0.5)

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm."""
        dr = _distances(positions, self.atoms, box) - self.r0.to(positions.dtype)
        return 0.5 * (self.k.to(positions.dtype) * dr * dr).sum(-1)

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``k (r - r0)^2`` per bond and ``dE/dd = k (r - r0) d / r`` for the bond vectors ``d``."""
        r = torch.linalg.vector_norm(vectors, dim=-1)
        dr = r - self.r0.to(vectors.dtype)
        kdr = self.k.to(vectors.dtype) * dr
        # zero force between coincident beads, as autograd through the norm
        return kdr * dr, (kdr / r.clamp(min=1e-30)).unsqueeze(-1) * vectors


class HarmonicAnglePrior(_Prior):
    """Harmonic angles ``E = sum_a k_a/2 (theta_a - theta0_a)^2``, ``theta = atan2(|u x v|, u . v)``.

    Parameters
    ----------
    angles
        ``(M, 3)`` bead index triplets ``(i, j, k)``; the angle is at ``j``.
    theta0_rad
        ``(M,)`` equilibrium angles in rad, in ``[0, pi]``.
    k_kj_mol_rad2
        ``(M,)`` force constants in kJ mol^-1 rad^-2.
    """

    def __init__(self, angles: Any, theta0_rad: Any, k_kj_mol_rad2: Any) -> None:
        atoms = _index_array(angles, 3, "angles")
        theta0 = _parameter_array(theta0_rad, (len(atoms),), "theta0_rad", minimum=0.0)
        if (theta0 > math.pi).any():
            raise ValueError(f"theta0_rad must lie in [0, pi]; got {theta0.max()}")
        k = _parameter_array(k_kj_mol_rad2, (len(atoms),), "k_kj_mol_rad2", minimum=0.0)
        super().__init__({"angles": atoms.tolist(), "theta0_rad": theta0.tolist(), "k_kj_mol_rad2": k.tolist()})
        self._register_atoms(atoms)
        self._register_floats(theta0=theta0, k=k)
        self._register_vectors(*_angle_vectors(atoms), n_beads=int(atoms.max()) + 1, n_energy_terms=len(atoms),
                               energy_scale=0.5)

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm."""
        dtheta = _angles(positions, self.atoms, box) - self.theta0.to(positions.dtype)
        return 0.5 * (self.k.to(positions.dtype) * dtheta * dtheta).sum(-1)

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``k (theta - theta0)^2`` per angle, and the gradient for ``u`` and ``-v`` (:func:`_angle_gradient`)."""
        pair, normal, sine, theta = _angle_geometry(vectors)
        dtheta = theta - self.theta0.to(vectors.dtype)
        kdt = self.k.to(vectors.dtype) * dtheta
        return kdt * dtheta, _angle_gradient(kdt, pair, normal, sine)


class CosineAnglePrior(_Prior):
    """Angles with a cosine-series potential ``E = sum_a sum_{n=0..K} c_an cos(n theta_a)``.

    For angles whose potential of mean force is not harmonic (several maxima of the angle distribution, as the
    end-middle-end angle of a flexible chain). A cosine series in ``theta`` is smooth on the sphere (its slope is
    zero at 0 and pi, where the angle itself is not differentiable), so forces stay finite at straight angles.

    Parameters
    ----------
    angles
        ``(M, 3)`` bead index triplets ``(i, j, k)``; the angle is at ``j``.
    coefficients_kj_mol
        ``(M, K + 1)`` coefficients ``c_a0 ... c_aK`` in kJ/mol.
    """

    def __init__(self, angles: Any, coefficients_kj_mol: Any) -> None:
        atoms = _index_array(angles, 3, "angles")
        coefficients = np.asarray(coefficients_kj_mol, dtype=np.float64)
        if coefficients.ndim != 2 or len(coefficients) != len(atoms) or coefficients.shape[1] < 1:
            raise ValueError(f"coefficients_kj_mol must have shape ({len(atoms)}, K + 1); got {coefficients.shape}")
        if not np.isfinite(coefficients).all():
            raise ValueError("coefficients_kj_mol must be finite")
        super().__init__({"angles": atoms.tolist(), "coefficients_kj_mol": coefficients.tolist()})
        self._register_atoms(atoms)
        self._register_floats(coefficients=coefficients, orders=np.arange(coefficients.shape[1], dtype=np.float64))
        self._register_vectors(*_angle_vectors(atoms), n_beads=int(atoms.max()) + 1, n_energy_terms=len(atoms),
                               energy_scale=1.0)

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm."""
        theta = _angles(positions, self.atoms, box)
        series = torch.cos(theta.unsqueeze(-1) * self.orders.to(positions.dtype))
        return (series * self.coefficients.to(positions.dtype)).sum((-1, -2))

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``E(theta)`` per angle, and the gradient for ``u`` and ``-v`` (:func:`_angle_gradient`, with
        ``dE/dtheta = -sum_n n c_n sin(n theta)``)."""
        pair, normal, sine, theta = _angle_geometry(vectors)
        n_theta = theta.unsqueeze(-1) * self.orders.to(vectors.dtype)
        c = self.coefficients.to(vectors.dtype)
        energy = (torch.cos(n_theta) * c).sum(-1)
        slope = -(torch.sin(n_theta) * c * self.orders.to(vectors.dtype)).sum(-1)
        return energy, _angle_gradient(slope, pair, normal, sine)


def _angle_vectors(atoms: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Difference vectors of angle priors (see :meth:`_Prior._register_vectors`): ``u = r_i - r_j`` for all
    angles, then ``v = r_k - r_j``, whose gradient is returned for ``-v``."""
    i, j, k = atoms.T
    n = len(atoms)
    return np.concatenate([i, k]), np.concatenate([j, j]), np.concatenate([np.ones(n), -np.ones(n)])


def _angle_geometry(vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the vectors of :func:`_angle_vectors` ``(B, 2M, 3)``: the pairs ``(B, 2, M, 3)`` (u, v), the normals
    ``w = u x v``, ``|w|`` and the angles ``theta = atan2(|w|, u . v)`` ``(B, M)``."""
    pair = vectors.unflatten(1, [2, -1])
    u, v = pair.unbind(1)
    normal = torch.linalg.cross(u, v, dim=-1)
    sine = torch.linalg.vector_norm(normal, dim=-1)
    return pair, normal, sine, torch.atan2(sine, (u * v).sum(-1))


def _angle_gradient(slope: torch.Tensor, pair: torch.Tensor, normal: torch.Tensor,
                    sine: torch.Tensor) -> torch.Tensor:
    """Gradient ``(B, 2M, 3)`` for ``u`` and ``-v`` of an angle energy with ``dE/dtheta = slope`` ``(B, M)``.

    With ``w = u x v``: ``dtheta/du = u x w / (|u|^2 |w|)`` and ``dtheta/dv = -v x w / (|v|^2 |w|)``,
    perpendicular to ``u`` (``v``) in the plane of the angle, of length ``1/|u|`` (``1/|v|``) however close the
    angle is to 0 or pi.  At exactly 0 or pi (``w = 0``) the gradient is 0, as autograd's.
    """
    coef = (slope / sine.clamp(min=1e-30)).unsqueeze(1) / (pair * pair).sum(-1)
    return (coef.unsqueeze(-1) * torch.linalg.cross(pair, normal.unsqueeze(1), dim=-1)).flatten(1, 2)


class FourierDihedralPrior(_Prior):
    """Fourier series in the dihedral angle ``E = sum_d sum_{n=1..K} a_dn cos(n phi_d) + b_dn sin(n phi_d)``.

    The constant term is left out (it only shifts the energy).  ``phi`` follows the IUPAC sign convention.

    Parameters
    ----------
    dihedrals
        ``(M, 4)`` bead index quadruplets.
    cos_coeffs
        ``(M, K)`` coefficients ``a_dn`` in kJ/mol.
    sin_coeffs
        ``(M, K)`` coefficients ``b_dn`` in kJ/mol; zeros if not given.
    """

    def __init__(self, dihedrals: Any, cos_coeffs: Any, sin_coeffs: Any = None) -> None:
        atoms = _index_array(dihedrals, 4, "dihedrals")
        a = _float_array(cos_coeffs, "cos_coeffs")
        if a.ndim != 2 or a.shape[1] < 1:
            raise ValueError(f"cos_coeffs must have shape (n_dihedrals, K) with K >= 1; got {a.shape}")
        a = _parameter_array(a, (len(atoms), a.shape[1]), "cos_coeffs")
        b = _parameter_array(np.zeros_like(a) if sin_coeffs is None else sin_coeffs, a.shape, "sin_coeffs")
        super().__init__({"dihedrals": atoms.tolist(), "cos_coeffs": a.tolist(), "sin_coeffs": b.tolist()})
        self._register_atoms(atoms)
        self._register_floats(cos_coeffs=a, sin_coeffs=b, multiples=np.arange(1, a.shape[1] + 1))
        # vectors b0 = r_j - r_i, b2 = r_l - r_k, b1 = r_k - r_j and -b1 (each for all dihedrals); the
        # gradients for the last two are returned negated (see energy_terms_and_gradient)
        i, j, k, l = atoms.T
        n = len(atoms)
        self._register_vectors(np.concatenate([j, l, k, j]), np.concatenate([i, k, j, k]),
                               np.concatenate([np.ones(2 * n), -np.ones(2 * n)]), n_beads=int(atoms.max()) + 1,
                               n_energy_terms=2 * a.size, energy_scale=1.0)
        for name in ("energy_coeffs", "slope_coeffs", "harmonics"):
            self.register_buffer(name, None, persistent=False)
        self._derive_coefficients()

    def _derive_coefficients(self) -> None:
        """``[a, b]``, ``[b, -a]`` per dihedral and ``[1..K, 1..K]`` from ``cos_coeffs`` (a), ``sin_coeffs``
        (b) and ``multiples``: exact copies, which convert between dtypes as the coefficients do.  Called
        again when a state dict is loaded."""
        with torch.no_grad():
            a, b = self.cos_coeffs, self.sin_coeffs
            self.energy_coeffs = torch.cat([a, b], 1)
            self.slope_coeffs = torch.cat([b, -a], 1)
            self.harmonics = torch.cat([self.multiples, self.multiples])

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._derive_coefficients()

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm."""
        dtype = positions.dtype
        n_phi = _dihedrals(positions, self.atoms, box).unsqueeze(-1) * self.multiples.to(dtype)
        terms = self.cos_coeffs.to(dtype) * torch.cos(n_phi) + self.sin_coeffs.to(dtype) * torch.sin(n_phi)
        return terms.sum(dim=[1, 2])

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Terms ``a_n cos(n phi)`` and ``b_n sin(n phi)`` per dihedral, and the gradient for the vectors
        ``b0, b2, b1, -b1`` (Blondel and Karplus, J. Comput. Chem. 17, 1132 (1996)).

        With ``n1 = b0 x b1`` and ``n2 = b1 x b2``: ``dphi/db0 = |b1| n1 / |n1|^2`` and
        ``dphi/db2 = |b1| n2 / |n2|^2``, with no division by ``sin phi``, so exact at and near 0 and 180
        degrees.  The gradient for the axis, ``dE/db1 = -(b0 . b1) / |b1|^2 dE/db0 - (b2 . b1) / |b1|^2
        dE/db2``, is split between its two copies: ``b1`` takes the first term, ``-b1`` minus the second;
        both are returned negated (scale -1 in the scatter).
        """
        dtype = vectors.dtype
        quad = vectors.unflatten(1, [2, 2, -1])  # (B, 2, 2, M, 3): [b0, b2], [b1, -b1]
        outer, axis = quad.unbind(1)
        normals = torch.linalg.cross(outer, axis, dim=-1)  # [b0 x b1, b2 x -b1] = [n1, n2]
        n1, n2 = normals.unbind(1)
        length = torch.linalg.vector_norm(axis.select(1, 0), dim=-1)
        phi = torch.atan2((outer.select(1, 0) * n2).sum(-1) * length, (n1 * n2).sum(-1))
        waves = phi.unsqueeze(-1) * self.multiples.to(dtype)
        waves = torch.cat([torch.cos(waves), torch.sin(waves)], -1)  # (B, M, 2K)
        slope = torch.matmul(waves * self.slope_coeffs.to(dtype), self.harmonics.to(dtype))  # dE/dphi
        coef = (slope * length).unsqueeze(1) / (normals * normals).sum(-1).clamp(min=1e-30)
        gradient = coef.unsqueeze(-1) * normals  # dE/db0, dE/db2
        along = ((outer * axis).sum(-1) / (axis * axis).sum(-1)).unsqueeze(-1) * gradient
        terms = waves * self.energy_coeffs.to(dtype)
        return terms.flatten(1), torch.cat([gradient, along], 1).flatten(1, 2)


class ExcludedVolumePrior(_Prior):
    """Excluded-volume repulsion ``E = sum_(i,j) (sigma_ij / r_ij)^n`` (seed 004, eq. 4), in kJ/mol.

    As in seed 004 the energy scale is fixed (1 kJ/mol): ``sigma`` sets both the range and the strength.

    With a cutoff ``rc`` the energy is shifted to vanish there: ``E = sum_(r_ij < rc) (sigma_ij/r_ij)^n -
    (sigma_ij/rc)^n``.  The energy is continuous at ``rc``; the force jumps by ``n sigma^n / rc^(n+1)``,
    which is negligible for ``rc`` of a few ``sigma``.  Pairs with ``sigma = 0`` are left out.

    The pairs are given either explicitly (``pairs``) or by the exclusion rule of :func:`nonbonded_pairs`
    (``n_beads``, ``bonds``, ``exclusion_bonds``).  Every listed pair is evaluated at every call (no
    neighbour list), so the cost grows with ``n_beads^2`` for the rule form.

    Parameters
    ----------
    pairs
        ``(P, 2)`` bead index pairs; or ``None`` to use the exclusion rule.
    sigma_nm
        In nm: one value for all pairs; ``(P,)`` values, one per pair (in the order of ``pairs`` or of
        :func:`nonbonded_pairs`); or, with ``bead_types``, a symmetric ``(T, T)`` matrix per bead-type pair.
    exponent
        Exponent ``n`` (a positive integer).
    cutoff_nm
        Cutoff in nm, or ``None`` for no cutoff.
    n_beads, bonds, exclusion_bonds
        The exclusion rule: all pairs of ``n_beads`` beads except those within ``exclusion_bonds`` bonds
        of each other along ``bonds`` (default 2: 1-2 and 1-3 neighbours excluded).
    bead_types
        ``(n_beads,)`` type names (strings or integers); types are numbered in order of first appearance,
        which is the order of the rows and columns of ``sigma_nm``.
    """

    def __init__(
        self,
        pairs: Any = None,
        *,
        sigma_nm: Any,
        exponent: int = 12,
        cutoff_nm: Optional[float] = None,
        n_beads: Optional[int] = None,
        bonds: Any = None,
        exclusion_bonds: int = 2,
        bead_types: Optional[Sequence[Any]] = None,
    ) -> None:
        if (pairs is None) == (n_beads is None):
            raise ValueError("give either pairs or the exclusion rule (n_beads, bonds, exclusion_bonds)")
        if pairs is not None:
            if bonds is not None:
                raise ValueError("bonds belongs to the exclusion rule; give it with n_beads instead of pairs")
            atoms = _index_array(pairs, 2, "pairs")
            config: Dict[str, Any] = {"pairs": atoms.tolist()}
            n_needed = int(atoms.max()) + 1
        else:
            n_beads = _positive_int(n_beads, "n_beads")
            bond_list = _index_array(bonds, 2, "bonds", n_beads=n_beads, allow_empty=True)
            exclusion_bonds = _positive_int(exclusion_bonds, "exclusion_bonds", minimum=0)
            atoms = nonbonded_pairs(n_beads, bond_list, exclusion_bonds)
            if len(atoms) == 0:
                raise ValueError(f"no bead pair is more than {exclusion_bonds} bonds apart")
            config = {"n_beads": n_beads, "bonds": bond_list.tolist(), "exclusion_bonds": exclusion_bonds}
            n_needed = n_beads
        exponent = _positive_int(exponent, "exponent")
        if cutoff_nm is not None:
            cutoff_nm = float(cutoff_nm)
            if not (math.isfinite(cutoff_nm) and cutoff_nm > 0):
                raise ValueError(f"cutoff_nm must be positive and finite, or None; got {cutoff_nm}")

        if bead_types is not None:
            codes, names = _type_codes(bead_types, len(bead_types))
            if len(codes) < n_needed or (pairs is None and len(codes) != n_beads):
                raise ValueError(f"bead_types has {len(codes)} entries for {n_needed} beads")
            matrix = _parameter_array(sigma_nm, (len(names), len(names)), "sigma_nm (per bead-type pair)",
                                      minimum=0.0)
            if not np.array_equal(matrix, matrix.T):
                raise ValueError("sigma_nm per bead-type pair must be a symmetric matrix")
            sigma = matrix[codes[atoms[:, 0]], codes[atoms[:, 1]]]
            type_list = [t if isinstance(t, str) else int(t) for t in bead_types]
            config.update(sigma_nm=matrix.tolist(), bead_types=type_list)
        elif np.ndim(sigma_nm) == 0:
            sigma = np.full(len(atoms), float(_parameter_array(sigma_nm, (), "sigma_nm", minimum=0.0)))
            config.update(sigma_nm=float(sigma_nm))
        else:
            sigma = _parameter_array(sigma_nm, (len(atoms),), "sigma_nm (per pair)", minimum=0.0)
            config.update(sigma_nm=sigma.tolist())
        config.update(exponent=exponent, cutoff_nm=cutoff_nm)
        keep = sigma > 0
        if not keep.any():
            raise ValueError("every sigma_nm is zero: the prior would be empty")

        super().__init__(config)
        self.exponent = exponent
        cutoff = math.inf if cutoff_nm is None else cutoff_nm
        self.cutoff_squared = cutoff * cutoff
        self.has_cutoff = cutoff_nm is not None
        self._register_atoms(atoms[keep])
        self._register_floats(sigma_squared=sigma[keep] ** 2, shift=(sigma[keep] / cutoff) ** exponent)
        # vectors r_j - r_i, one per pair; dE/dd = -n E_pair / r^2 d
        kept = atoms[keep]
        self._register_vectors(kept[:, 1], kept[:, 0], np.full(len(kept), -float(exponent)), n_beads=n_needed,
                               n_energy_terms=len(kept), energy_scale=1.0)

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm."""
        delta = _chain_vectors(positions, self.atoms, box)[:, :, 0]
        r2 = (delta * delta).sum(-1)
        energy = torch.pow(self.sigma_squared.to(positions.dtype) / r2, 0.5 * self.exponent)
        energy = torch.where(r2 < self.cutoff_squared, energy - self.shift.to(positions.dtype),
                             torch.zeros_like(energy))
        return energy.sum(-1)

    def energy_terms_and_gradient(self, vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sigma / r)^n`` (shifted, zero beyond the cutoff) per pair, and ``(sigma / r)^n / r^2 d`` for the
        pair vectors ``d`` (the gradient is ``-n`` times that)."""
        r2 = (vectors * vectors).sum(-1)
        energy = torch.pow(self.sigma_squared.to(vectors.dtype) / r2, 0.5 * self.exponent)
        coef = energy / r2
        if self.has_cutoff:
            inside = r2 < self.cutoff_squared
            energy = torch.where(inside, energy - self.shift.to(vectors.dtype), 0.0)
            coef = torch.where(inside, coef, 0.0)
        return energy, coef.unsqueeze(-1) * vectors


#: Above this many candidate pairs, a fitted excluded-volume prior with a cutoff and typed sigma is the
#: neighbour-searched :class:`NeighborExcludedVolumePrior` (measured on one core: a 900-bead benzene box,
#: 405 000 pairs, costs ~8x more per step with the fixed list).
NEIGHBOR_SEARCH_MIN_PAIRS = 20_000


class NeighborExcludedVolumePrior(torch.nn.Module):
    """The excluded volume of :class:`ExcludedVolumePrior` (exclusion rule, cutoff) over the pairs found by a
    neighbour search at every call instead of a fixed list of all bead pairs.

    ``E = sum_(r_ij < rc) (sigma_ij / r_ij)^n - (sigma_ij / rc)^n`` over the pairs of beads more than
    ``exclusion_bonds`` bonds apart, with ``sigma`` per bead-type pair: the same energy as
    :class:`ExcludedVolumePrior` with the same arguments, at a cost that grows linearly with the number of
    beads (:func:`.neighbors.neighbor_pairs`: all pairs below 800 beads, a cell grid above) where the fixed
    pair list grows as its square.  Meant for large boxes (a potential transferred to a larger system, see
    :meth:`.model.CGPotential.transfer`).  With a box, the cutoff must not exceed half the smallest box
    height.

    It has no ``energy_terms_and_gradient`` (its pairs change from call to call), so
    :class:`.model.CGPotential` evaluates it on its own, with :meth:`energy_and_forces`, or with
    :meth:`energy_and_forces_with_pairs` on a neighbour search it shares with the network.

    Parameters
    ----------
    n_beads, bonds, exclusion_bonds
        The exclusion rule of :func:`nonbonded_pairs`: pairs joined by at most ``exclusion_bonds`` bonds are
        left out.
    sigma_nm
        In nm: one value for all pairs, or with ``bead_types`` a symmetric ``(T, T)`` matrix per bead-type pair
        (types numbered in order of first appearance).  Pairs with ``sigma = 0`` do not interact.
    cutoff_nm
        Cutoff in nm (required).
    exponent
        Exponent ``n`` (a positive integer).
    bead_types
        ``(n_beads,)`` type names (strings or integers), or ``None`` with a single ``sigma_nm``.
    """

    __jit_ignored_attributes__ = ["_config"]

    def __init__(
        self,
        *,
        n_beads: int,
        sigma_nm: Any,
        cutoff_nm: float,
        bonds: Any = None,
        exclusion_bonds: int = 2,
        exponent: int = 12,
        bead_types: Optional[Sequence[Any]] = None,
    ) -> None:
        super().__init__()
        n_beads = _positive_int(n_beads, "n_beads")
        bond_list = _index_array(bonds, 2, "bonds", n_beads=n_beads, allow_empty=True)
        exclusion_bonds = _positive_int(exclusion_bonds, "exclusion_bonds", minimum=0)
        exponent = _positive_int(exponent, "exponent")
        try:
            cutoff = float(cutoff_nm)
        except (TypeError, ValueError):
            raise ValueError(f"cutoff_nm must be a positive number; got {cutoff_nm!r}") from None
        if not (math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff_nm must be positive and finite; got {cutoff_nm}")
        config: Dict[str, Any] = {"n_beads": n_beads, "bonds": bond_list.tolist(),
                                  "exclusion_bonds": exclusion_bonds}
        if bead_types is not None:
            codes, names = _type_codes(bead_types, n_beads)
            matrix = _parameter_array(sigma_nm, (len(names), len(names)), "sigma_nm (per bead-type pair)",
                                      minimum=0.0)
            if not np.array_equal(matrix, matrix.T):
                raise ValueError("sigma_nm per bead-type pair must be a symmetric matrix")
            config.update(sigma_nm=matrix.tolist(),
                          bead_types=[t if isinstance(t, str) else int(t) for t in bead_types])
        else:
            if np.ndim(sigma_nm) != 0:
                raise ValueError("sigma_nm must be one value, or a matrix per bead-type pair with bead_types")
            matrix = _parameter_array(sigma_nm, (), "sigma_nm", minimum=0.0).reshape(1, 1)
            codes = np.zeros(n_beads, dtype=np.int64)
            config.update(sigma_nm=float(matrix[0, 0]))
        if not (matrix > 0).any():
            raise ValueError("every sigma_nm is zero: the prior would be empty")
        config.update(exponent=exponent, cutoff_nm=cutoff)
        self._config = config
        self.n_beads = n_beads
        self.exponent = exponent
        self.cutoff = cutoff
        excluded = excluded_pairs(n_beads, bond_list, exclusion_bonds)
        self.register_buffer("types", torch.from_numpy(codes), persistent=False)
        self.register_buffer("exclusions", torch.from_numpy(excluded) if len(excluded) else None, persistent=False)
        self.register_buffer("sigma_squared", torch.from_numpy(matrix ** 2))
        self.register_buffer("shift", torch.from_numpy((matrix / cutoff) ** exponent))

    @torch.jit.unused
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments: ``type(self)(**self.config())`` rebuilds this prior."""
        return copy.deepcopy(self._config)

    def _pairs(self, positions: torch.Tensor, box: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs ``i < j`` within the cutoff: configurations and flat bead indices ``batch * n + i``,
        ``batch * n + j`` ``(P,)``, displacements ``r_j - r_i`` ``(P, 3)``, ``(sigma/r)^n / r^2`` and the
        shifted pair energies ``(P,)``."""
        return self._pair_terms(positions, neighbor_pairs(positions, self.cutoff, box, self.exclusions))

    def _pair_terms(self, positions: torch.Tensor,
                    pairs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_pairs` of the pairs found by a neighbour search."""
        batch, i, j, displacement, _ = pairs
        ti = self.types.index_select(0, i)
        tj = self.types.index_select(0, j)
        dtype = positions.dtype
        r2 = (displacement * displacement).sum(-1)
        raw = torch.pow(self.sigma_squared.to(dtype)[ti, tj] / r2, 0.5 * self.exponent)
        offset = batch * positions.shape[1]
        return batch, offset + i, offset + j, displacement, raw / r2, raw - self.shift.to(dtype)[ti, tj]

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Energies ``(B,)`` in kJ/mol of positions ``(B, n_beads, 3)`` in nm (differentiable)."""
        batch, _, _, _, _, energy = self._pairs(positions, box)
        return torch.zeros(positions.shape[0], dtype=positions.dtype, device=positions.device).index_add(
            0, batch, energy)

    @torch.jit.export
    def energy_and_forces(self, positions: torch.Tensor,
                          box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies ``(B,)`` in kJ/mol and forces ``(B, n_beads, 3)`` in kJ/mol/nm, without autograd."""
        with torch.no_grad():
            x = positions.detach()
            return self.energy_and_forces_with_pairs(x, neighbor_pairs(x, self.cutoff, box, self.exclusions))

    @torch.jit.export
    def energy_and_forces_with_pairs(
        self, positions: torch.Tensor,
        pairs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`energy_and_forces` over given pairs: those ``neighbor_pairs(positions, cutoff, box,
        exclusions)`` returns for this prior's cutoff and exclusions (a search shared with other terms, see
        :func:`.neighbors.select_pairs`)."""
        with torch.no_grad():
            x = positions.detach()
            batch, i, j, displacement, coef, energy = self._pair_terms(x, pairs)
            total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device).index_add(0, batch, energy)
            # E = (sigma/r)^n with d = r_j - r_i: F_j = n (sigma/r)^n / r^2 d, F_i = -F_j
            force = (self.exponent * coef).unsqueeze(-1) * displacement
            forces = torch.zeros_like(x).view(-1, 3)
            forces.index_add_(0, j, force).index_add_(0, i, -force)
            return total, forces.view(x.shape)


def excluded_pairs(n_beads: int, bonds: Any, exclusion_bonds: int = 2) -> np.ndarray:
    """Bead pairs ``(i, j)``, ``i < j``, joined by a path of at most ``exclusion_bonds`` bonds: the pairs
    :func:`nonbonded_pairs` leaves out, found without listing all pairs.

    Parameters
    ----------
    n_beads
        Number of beads.
    bonds
        ``(M, 2)`` bead index pairs.
    exclusion_bonds
        Longest path (in bonds) of an excluded pair; 0 excludes nothing.

    Returns
    -------
    numpy.ndarray
        ``(E, 2)`` ``int64``, sorted.
    """
    n_beads = _positive_int(n_beads, "n_beads")
    exclusion_bonds = _positive_int(exclusion_bonds, "exclusion_bonds", minimum=0)
    bond_array = _index_array(bonds, 2, "bonds", n_beads=n_beads, allow_empty=True)
    step = sp.coo_matrix((np.ones(len(bond_array)), (bond_array[:, 0], bond_array[:, 1])), shape=(n_beads,) * 2)
    step = ((step + step.T + sp.identity(n_beads)) > 0).astype(np.float64).tocsr()
    reach = sp.identity(n_beads, format="csr")
    for _ in range(exclusion_bonds):
        reach = ((reach @ step) > 0).astype(np.float64)
    excluded = sp.triu(reach, k=1).tocoo()
    pairs = np.stack([excluded.row, excluded.col], axis=1).astype(np.int64).reshape(-1, 2)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]

#: Prior classes by name, for :func:`prior_from_dict`.
PRIOR_CLASSES: Dict[str, type] = {
    cls.__name__: cls
    for cls in (HarmonicBondPrior, HarmonicAnglePrior, CosineAnglePrior, FourierDihedralPrior, ExcludedVolumePrior,
                NeighborExcludedVolumePrior)
}


def prior_to_dict(prior: torch.nn.Module) -> Dict[str, Any]:
    """``{"class": name, "config": prior.config()}``, a JSON-serialisable description of a prior."""
    name = type(prior).__name__
    if name not in PRIOR_CLASSES:
        raise ValueError(f"{name} is not a prior class of this module ({', '.join(PRIOR_CLASSES)})")
    return {"class": name, "config": prior.config()}


def prior_from_dict(spec: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild a prior from the output of :func:`prior_to_dict`."""
    try:
        cls = PRIOR_CLASSES[spec["class"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a prior description (want 'class' in {list(PRIOR_CLASSES)}): {spec!r}") from exc
    return cls(**spec["config"])


# -------------------------------------------------------------------------------------------- topology
def _neighbours(bonds: np.ndarray) -> Dict[int, List[int]]:
    adjacency: Dict[int, List[int]] = {}
    for i, j in bonds.tolist():
        adjacency.setdefault(i, []).append(j)
        adjacency.setdefault(j, []).append(i)
    return {i: sorted(n) for i, n in adjacency.items()}


def angles_from_bonds(bonds: Any) -> np.ndarray:
    """All bead triplets ``(i, j, k)`` with bonds i-j and j-k, each once (``i < k``), sorted.

    Parameters
    ----------
    bonds
        ``(M, 2)`` bead index pairs (each bond once, in either order).

    Returns
    -------
    numpy.ndarray
        ``(n_angles, 3)`` ``int64``.
    """
    angles = [
        (i, j, k)
        for j, neighbours in _neighbours(_index_array(bonds, 2, "bonds", allow_empty=True)).items()
        for a, i in enumerate(neighbours)
        for k in neighbours[a + 1:]
    ]
    return np.array(sorted(angles), dtype=np.int64).reshape(-1, 3)


def dihedrals_from_bonds(bonds: Any) -> np.ndarray:
    """All paths ``(i, j, k, l)`` of four distinct beads along bonds, each once (``j < k``), sorted.

    Parameters
    ----------
    bonds
        ``(M, 2)`` bead index pairs (each bond once, in either order).

    Returns
    -------
    numpy.ndarray
        ``(n_dihedrals, 4)`` ``int64``.
    """
    bond_array = _index_array(bonds, 2, "bonds", allow_empty=True)
    neighbours = _neighbours(bond_array)
    dihedrals = [
        (i, j, k, l)
        for j, k in np.sort(bond_array, axis=1).tolist()
        for i in neighbours[j]
        for l in neighbours[k]
        if len({i, j, k, l}) == 4
    ]
    return np.array(sorted(dihedrals), dtype=np.int64).reshape(-1, 4)


def nonbonded_pairs(n_beads: int, bonds: Any, exclusion_bonds: int = 2) -> np.ndarray:
    """Bead pairs ``(i, j)``, ``i < j``, more than ``exclusion_bonds`` bonds apart (or not connected).

    ``exclusion_bonds = 0`` keeps every pair, 1 excludes bonded (1-2) pairs, 2 (default) also 1-3 pairs,
    3 also 1-4 pairs.

    Parameters
    ----------
    n_beads
        Number of beads.
    bonds
        ``(M, 2)`` bead index pairs.
    exclusion_bonds
        Pairs joined by a path of at most this many bonds are excluded.

    Returns
    -------
    numpy.ndarray
        ``(P, 2)`` ``int64``, sorted.
    """
    n_beads = _positive_int(n_beads, "n_beads")
    excluded = excluded_pairs(n_beads, bonds, exclusion_bonds)
    i, j = np.triu_indices(n_beads, k=1)
    keep = ~np.isin(i * n_beads + j, excluded[:, 0] * n_beads + excluded[:, 1])
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)


# ------------------------------------------------------------------------------------------ Boltzmann fit
def fit_priors(
    positions: Any,
    bonds: Any,
    temperature_K: Any,
    *,
    box: Any = None,
    bead_types: Optional[Sequence[Any]] = None,
    terms: Optional[Sequence[str]] = None,
    n_fourier: int = 3,
    exclusion_bonds: int = 2,
    exponent: int = 12,
    cutoff_nm: Optional[float] = None,
    n_bins: Optional[int] = None,
    dihedral_bins: Optional[int] = None,
    pseudo_count: float = 1.0,
    sigma_quantile: float = 1e-3,
    sigma_energy_kT: float = 1.0,
) -> List[torch.nn.Module]:
    """Fit the priors of a CG model to mapped CG frames by direct Boltzmann inversion.

    Each interaction's potential of mean force ``w(x) = -kT ln(p(x) / J(x))`` is estimated from a
    histogram and fitted with the prior's functional form:

    * **bonds**: ``J(r) = r^2``; ``w`` over the central 99.8 % of the observed lengths is fitted by a
      parabola ``k/2 (r - r0)^2 + c``, least squares weighted by the bin counts (the inverse variance of
      ``ln`` count) over populated bins.
    * **angles**: ``J(theta) = sin(theta)``, same fit, for every angle except those closing a three-bead
      ring (their values follow from the ring's bond lengths, so an angle prior would count the same
      fluctuations twice); ``theta0`` is kept in ``[0, pi]`` (if the vertex
      falls outside, ``theta0`` is clipped and ``k`` refitted).
    * Bonds whose fitted parabola is not convex or whose minimum lies more than 10 % of the histogram range
      outside it (multimodal or flat distributions) take the harmonic term from the mean and variance of the
      Jacobian-corrected histogram (``k = kT / variance``), with a ``RuntimeWarning``. Such angles instead
      get a :class:`CosineAnglePrior`: ``sum_{n<=16} c_n cos(n theta)`` fitted to the PMF on 72 bins over
      ``[0, pi]``, held at 10 kT above the minimum where the angle was (almost) never seen
      (:func:`_fit_cosine_angle`).
    * **dihedrals**: ``J = 1``; ``w`` on equal bins over ``[-pi, pi)`` with ``pseudo_count`` added to
      every bin (so empty bins get a finite, high free energy) is fitted by ``c + sum_{n<=K} a_n cos(n phi)
      + b_n sin(n phi)``, least squares weighted by the (pseudo-)counts: sparse bins, whose ``ln`` count is
      noisy, pull little.
    * **excluded volume**: for the pairs of :func:`nonbonded_pairs`, ``d_q`` is the ``sigma_quantile``
      quantile (the ``ceil(q N)``-th smallest of the ``N`` observed distances) of a pair type, and
      ``sigma`` is chosen so that the prior energy of one pair at ``d_q`` is ``sigma_energy_kT`` kT:
      ``sigma = d_q (eps kT)^(1/n)`` without cutoff, ``sigma = (eps kT / (d_q^-n - rc^-n))^(1/n)`` with the
      shifted cutoff.  The prior is then about kT at the closest approaches seen in the data, negligible at
      typical distances (``(d_q/r)^n`` kT) and steep below them.  Pair types whose ``d_q`` is beyond the
      cutoff get no prior (warning).

    Without ``bead_types`` every interaction (bond, angle, dihedral, bead pair) is fitted on its own; with
    ``bead_types``, interactions whose bead types agree (in either direction along the path) share one fit
    over their pooled samples.  Pass bead types for liquids.

    Parameters
    ----------
    positions
        ``(F, n_beads, 3)`` mapped CG frames in nm (array or OpenMM Quantity), molecules whole.
    bonds
        ``(M, 2)`` CG bonds; angles and dihedrals are derived from them (:func:`angles_from_bonds`,
        :func:`dihedrals_from_bonds`).  May be empty (then only the excluded volume applies).
    temperature_K
        Temperature in K (or an OpenMM Quantity).
    box
        Box vectors in nm, ``(F, 3, 3)`` or one ``(3, 3)`` box for all frames, rows a, b, c; ``None`` for no
        periodic boundaries.
    bead_types
        ``(n_beads,)`` type names (strings or integers) for pooling, or ``None``.
    terms
        Subset of ``("bonds", "angles", "dihedrals", "excluded_volume")``; ``None`` fits every term that
        has interactions.  A term named here that has no interactions is an error.
    n_fourier
        Number ``K`` of Fourier harmonics per dihedral.
    exclusion_bonds, exponent, cutoff_nm
        Pairs and form of the excluded volume (:class:`ExcludedVolumePrior`).
    n_bins
        Histogram bins for bonds and angles; ``None`` for the Rice rule ``ceil(2 N^(1/3))`` over the ``N``
        samples of a fit, clipped to [10, 100] (too many bins for the samples bias ``k`` low).
    dihedral_bins
        Histogram bins for dihedrals over ``[-pi, pi)``; ``None`` for the Rice rule clipped to
        [max(24, 4 K), 72].
    pseudo_count
        Count added to every dihedral bin.
    sigma_quantile
        Quantile ``q`` of the pair distances that defines the closest approach ``d_q``.
    sigma_energy_kT
        Prior energy per pair at ``d_q``, in units of kT.

    Returns
    -------
    list of torch.nn.Module
        The fitted priors in the order bonds, angles, dihedrals, excluded volume (those fitted); their sum
        is the priors-only CG model.
    """
    xyz = as_coordinates(positions, name="positions")
    if xyz.ndim != 3 or len(xyz) < 2:
        raise ValueError(f"positions must have shape (n_frames >= 2, n_beads, 3); got {xyz.shape}")
    n_frames, n_beads = xyz.shape[:2]
    boxes = _frame_boxes(box, n_frames)
    kT = BOLTZMANN_KJ_MOL_K * _temperature(temperature_K)
    bond_list = _index_array(bonds, 2, "bonds", n_beads=n_beads, allow_empty=True)
    codes = None if bead_types is None else _type_codes(bead_types, n_beads)[0]
    type_list = None if bead_types is None else list(bead_types)
    n_fourier = _positive_int(n_fourier, "n_fourier")
    if n_bins is not None:
        n_bins = _positive_int(n_bins, "n_bins", minimum=3)
    if dihedral_bins is not None:
        dihedral_bins = _positive_int(dihedral_bins, "dihedral_bins", minimum=2 * n_fourier + 2)
    if not (math.isfinite(pseudo_count) and pseudo_count > 0):
        raise ValueError(f"pseudo_count must be positive; got {pseudo_count}")
    if not 0 < sigma_quantile < 1:
        raise ValueError(f"sigma_quantile must lie in (0, 1); got {sigma_quantile}")
    if not (math.isfinite(sigma_energy_kT) and sigma_energy_kT > 0):
        raise ValueError(f"sigma_energy_kT must be positive; got {sigma_energy_kT}")

    interactions = {
        "bonds": bond_list,
        "angles": _open_angles(angles_from_bonds(bond_list), bond_list),
        "dihedrals": dihedrals_from_bonds(bond_list),
        "excluded_volume": nonbonded_pairs(n_beads, bond_list, exclusion_bonds),
    }
    if terms is None:
        selected = [t for t in TERMS if len(interactions[t])]
    else:
        terms = [terms] if isinstance(terms, str) else list(terms)
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown terms {sorted(unknown)}; choose from {TERMS}")
        empty = [t for t in terms if not len(interactions[t])]
        if empty:
            raise ValueError(f"no interactions for terms {empty} (bonds given: {len(bond_list)})")
        selected = [t for t in TERMS if t in terms]

    pos = torch.from_numpy(xyz if xyz.flags.writeable else xyz.copy())
    box_t = None if boxes is None else torch.from_numpy(boxes)
    priors: List[torch.nn.Module] = []
    for term in selected:
        atoms = interactions[term]
        if term == "excluded_volume":
            priors.append(_fit_excluded_volume(
                pos, box_t, n_beads, bond_list, atoms, codes, type_list, kT, exclusion_bonds=exclusion_bonds,
                exponent=_positive_int(exponent, "exponent"), cutoff_nm=cutoff_nm, quantile=sigma_quantile,
                energy_kT=sigma_energy_kT,
            ))
            continue
        groups = _groups(atoms, codes)
        with torch.no_grad():
            values = {"bonds": _distances, "angles": _angles, "dihedrals": _dihedrals}[term](
                pos, torch.from_numpy(atoms), box_t).numpy()
        if term == "dihedrals":
            a = np.zeros((len(atoms), n_fourier))
            b = np.zeros((len(atoms), n_fourier))
            for members in groups:
                samples = values[:, members].ravel()
                bins = dihedral_bins or _rice_bins(len(samples), max(24, 4 * n_fourier), 72)
                a[members], b[members] = _fit_fourier(samples, kT, n_fourier, bins, pseudo_count,
                                                      f"dihedral {atoms[members[0]].tolist()}")
            priors.append(FourierDihedralPrior(atoms, a, b))
            continue
        x0 = np.zeros(len(atoms))
        k = np.zeros(len(atoms))
        series = np.zeros((len(atoms), ANGLE_SERIES_TERMS + 1))
        harmonic = np.ones(len(atoms), dtype=bool)
        for members in groups:
            samples = values[:, members].ravel()
            bins = n_bins or _rice_bins(len(samples), 10, 100)
            what = f"{term[:-1]} {atoms[members[0]].tolist()}"
            if term == "bonds":
                x0[members], k[members] = _fit_harmonic(samples, kT, _mean_r2, (0.0, math.inf), bins, what)
                continue
            fit = _fit_harmonic(samples, kT, _mean_sin, (0.0, math.pi), bins, what, fallback=False)
            if fit is None:  # not harmonic: a cosine series in theta instead
                harmonic[members] = False
                series[members] = _fit_cosine_angle(samples, kT, ANGLE_SERIES_TERMS, what)
            else:
                x0[members], k[members] = fit
        if term == "bonds":
            priors.append(HarmonicBondPrior(atoms, x0, k))
            continue
        if harmonic.any():
            priors.append(HarmonicAnglePrior(atoms[harmonic], x0[harmonic], k[harmonic]))
        if not harmonic.all():
            priors.append(CosineAnglePrior(atoms[~harmonic], series[~harmonic]))
    return priors


def _open_angles(angles: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """The angles ``(i, j, k)`` whose ends are not bonded: in a three-bead ring the angles are functions of
    the three bond lengths, and Boltzmann-inverted angle priors on top of the bond priors would count the
    same fluctuations twice (the CG triangle comes out too stiff)."""
    if not len(angles) or not len(bonds):
        return angles
    n = int(max(angles.max(), bonds.max())) + 1
    lo, hi = np.minimum(bonds[:, 0], bonds[:, 1]), np.maximum(bonds[:, 0], bonds[:, 1])
    closing = np.isin(np.minimum(angles[:, 0], angles[:, 2]) * n + np.maximum(angles[:, 0], angles[:, 2]),
                      lo * n + hi)
    return angles[~closing]


def _temperature(value: Any) -> float:
    if _unit is not None:
        value = strip_unit(value, _unit.kelvin)
    try:
        temperature = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"temperature_K must be a number in K; got {value!r}") from exc
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature_K must be positive and finite; got {temperature}")
    return temperature


def _frame_boxes(box: Any, n_frames: int) -> Optional[np.ndarray]:
    """Box vectors ``(F, 3, 3)`` in nm, or ``None``."""
    if box is None:
        return None
    boxes = as_box_vectors(box, name="box")
    if boxes.ndim == 2:
        boxes = np.broadcast_to(boxes, (n_frames, 3, 3))
    if len(boxes) != n_frames:
        raise ValueError(f"box has {len(boxes)} frames but positions have {n_frames}")
    if not (np.diagonal(boxes, axis1=1, axis2=2) > 0).all():
        raise ValueError("box vectors must be in reduced form with positive diagonal (a_x, b_y, c_z > 0)")
    return np.ascontiguousarray(boxes)


def _groups(atoms: np.ndarray, codes: Optional[np.ndarray]) -> List[np.ndarray]:
    """Interaction indices fitted together: each alone, or those with the same types along the path."""
    if codes is None:
        return [np.array([m]) for m in range(len(atoms))]
    keys = _canonical_paths(codes[atoms])
    _, labels = np.unique(keys, axis=0, return_inverse=True)
    labels = labels.ravel()
    return [np.flatnonzero(labels == g) for g in range(labels.max() + 1)]


def _rice_bins(n_samples: int, lowest: int, highest: int) -> int:
    """Histogram bins by the Rice rule ``ceil(2 n^(1/3))``, clipped to ``[lowest, highest]``."""
    return int(np.clip(math.ceil(2.0 * n_samples ** (1.0 / 3.0)), lowest, highest))


def _mean_r2(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mean of the distance Jacobian ``r^2`` over bins ``[lo, hi]``."""
    return (hi ** 3 - lo ** 3) / (3.0 * (hi - lo))


def _mean_sin(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Mean of the angle Jacobian ``sin(theta)`` over bins ``[lo, hi]``."""
    return (np.cos(lo) - np.cos(hi)) / (hi - lo)


def _fit_harmonic(
    values: np.ndarray,
    kT: float,
    jacobian: Callable[[np.ndarray, np.ndarray], np.ndarray],
    bounds: Tuple[float, float],
    n_bins: int,
    what: str,
    fallback: bool = True,
) -> Optional[Tuple[float, float]]:
    """``(x0, k)`` of ``k/2 (x - x0)^2`` fitted to ``-kT ln(p(x) / J(x))`` of the samples ``values``; for a PMF
    that is not harmonic, the moments of the Jacobian-corrected distribution (``fallback``) or ``None``."""
    lo, hi = np.quantile(values, [_RANGE_TAIL, 1.0 - _RANGE_TAIL])
    if not hi - lo > 1e-9 * max(1.0, abs(hi)):
        raise ValueError(f"{what}: the observed values do not vary; cannot fit a force constant")
    counts, edges = np.histogram(values, bins=n_bins, range=(lo, hi))
    jac = jacobian(edges[:-1], edges[1:])
    populated = (counts > 0) & (jac > 0)
    if populated.sum() < 3:
        raise ValueError(f"{what}: fewer than 3 populated histogram bins; give more frames")
    x = 0.5 * (edges[:-1] + edges[1:])[populated]
    density = counts[populated] / jac[populated]
    pmf = -kT * np.log(density)
    weights = counts[populated].astype(np.float64)
    center = np.average(x, weights=weights)
    curvature, slope, _ = np.polyfit(x - center, pmf, 2, w=np.sqrt(weights))
    margin = 0.1 * (hi - lo)
    if curvature > 0:
        vertex = center - slope / (2.0 * curvature)
        x0 = float(np.clip(vertex, *bounds))
        if x0 == vertex and lo - margin <= x0 <= hi + margin:
            return x0, float(2.0 * curvature)
        if lo - margin <= x0 <= hi + margin:  # minimum beyond a bound (theta0 > pi): refit k at the bound
            design = np.stack([np.ones_like(x), 0.5 * (x - x0) ** 2], axis=1) * np.sqrt(weights)[:, None]
            k = np.linalg.lstsq(design, pmf * np.sqrt(weights), rcond=None)[0][1]
            if k > 0:
                return x0, float(k)
    if not fallback:
        return None
    warnings.warn(f"{what}: the potential of mean force is not harmonic (not convex, or its minimum lies "
                  "outside the sampled range); harmonic term from the mean and variance of the "
                  "Jacobian-corrected distribution", RuntimeWarning, stacklevel=3)
    mean = np.average(x, weights=density)
    variance = np.average((x - mean) ** 2, weights=density)
    return float(np.clip(mean, *bounds)), float(kT / variance)


def _fit_cosine_angle(values: np.ndarray, kT: float, n_terms: int, what: str) -> np.ndarray:
    """``c_0 ... c_K`` of ``sum_n c_n cos(n theta)`` fitted to ``-kT ln(p(theta) / sin(theta))`` of ``values``.

    The histogram has :data:`ANGLE_SERIES_BINS` equal bins over ``[0, pi]``; bins with a Jacobian-corrected
    density below ``exp(-ANGLE_SERIES_WALL_KT)`` of the highest (empty ones included) are held at that level,
    plus :data:`ANGLE_SERIES_WALL_SLOPE_KT_PER_RAD` times their distance from the range of angles seen, so the
    series rises to a wall over angles never seen that keeps pushing back, instead of extrapolating freely.
    Least squares weighted by the bin counts, with every bin weighted at least 1 % of the fullest so the wall
    holds.
    """
    counts, edges = np.histogram(values, bins=ANGLE_SERIES_BINS, range=(0.0, math.pi))
    if (counts > 0).sum() < 3:
        raise ValueError(f"{what}: fewer than 3 populated histogram bins; give more frames")
    density = counts / _mean_sin(edges[:-1], edges[1:])
    floor = density.max() * math.exp(-ANGLE_SERIES_WALL_KT)
    pmf = -kT * np.log(np.maximum(density, floor))
    centres = 0.5 * (edges[:-1] + edges[1:])
    seen = centres[density > floor]
    outside = np.maximum(seen.min() - centres, 0.0) + np.maximum(centres - seen.max(), 0.0)
    pmf = pmf + kT * ANGLE_SERIES_WALL_SLOPE_KT_PER_RAD * outside
    weights = np.sqrt(np.maximum(counts, 0.01 * counts.max()))
    design = np.cos(np.outer(centres, np.arange(n_terms + 1)))
    coeffs = np.linalg.lstsq(design * weights[:, None], pmf * weights, rcond=None)[0]
    return coeffs


def _fit_fourier(
    values: np.ndarray, kT: float, n_terms: int, n_bins: int, pseudo_count: float, what: str
) -> Tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of ``sum_n a_n cos(n phi) + b_n sin(n phi)`` fitted to ``-kT ln p(phi)`` of ``values``."""
    counts, edges = np.histogram(values, bins=n_bins, range=(-math.pi, math.pi))
    if counts.sum() == 0:
        raise ValueError(f"{what}: no finite dihedral angles observed")
    smoothed = counts + pseudo_count
    pmf = -kT * np.log(smoothed / smoothed.sum())
    phi = 0.5 * (edges[:-1] + edges[1:])
    n_phi = np.outer(phi, np.arange(1, n_terms + 1))
    design = np.concatenate([np.ones((n_bins, 1)), np.cos(n_phi), np.sin(n_phi)], axis=1)
    sqrt_w = np.sqrt(smoothed)
    coeffs = np.linalg.lstsq(design * sqrt_w[:, None], pmf * sqrt_w, rcond=None)[0]
    return coeffs[1:n_terms + 1], coeffs[n_terms + 1:]


def _fit_excluded_volume(
    positions: torch.Tensor,
    box: Optional[torch.Tensor],
    n_beads: int,
    bonds: np.ndarray,
    pairs: np.ndarray,
    codes: Optional[np.ndarray],
    bead_types: Optional[List[Any]],
    kT: float,
    *,
    exclusion_bonds: int,
    exponent: int,
    cutoff_nm: Optional[float],
    quantile: float,
    energy_kT: float,
) -> ExcludedVolumePrior:
    """:class:`ExcludedVolumePrior` with ``sigma`` per pair type from the closest approaches (see
    :func:`fit_priors`); ``codes`` are the type numbers of ``bead_types`` (order of first appearance)."""
    if cutoff_nm is not None and not (math.isfinite(cutoff_nm) and cutoff_nm > 0):
        raise ValueError(f"cutoff_nm must be positive and finite, or None; got {cutoff_nm}")
    if codes is None:
        labels = np.arange(len(pairs))
        type_pairs = pairs
    else:
        type_pairs, labels = np.unique(np.sort(codes[pairs], axis=1), axis=0, return_inverse=True)
        labels = labels.ravel()
    closest = _closest_approach(positions, box, pairs, labels, len(type_pairs), quantile)
    energy = energy_kT * kT
    if cutoff_nm is None:
        sigma = closest * energy ** (1.0 / exponent)
    else:
        reach = closest < cutoff_nm
        sigma = np.zeros(len(closest))
        sigma[reach] = (energy / (closest[reach] ** -exponent - cutoff_nm ** -exponent)) ** (1.0 / exponent)
        if not reach.all():
            if not reach.any():
                raise ValueError(f"cutoff_nm = {cutoff_nm} is shorter than the closest approach of every pair "
                                 "type; no excluded-volume prior can act within it")
            kind = "pairs" if codes is None else "bead-type pairs (type numbers in order of appearance)"
            warnings.warn(f"no excluded-volume prior for {kind} {type_pairs[~reach].tolist()}: their "
                          f"closest approach exceeds cutoff_nm = {cutoff_nm}", RuntimeWarning, stacklevel=3)
    rule = {"n_beads": n_beads, "bonds": bonds, "exclusion_bonds": exclusion_bonds, "exponent": exponent,
            "cutoff_nm": cutoff_nm}
    if codes is None:
        return ExcludedVolumePrior(sigma_nm=sigma, **rule)
    n_types = int(codes.max()) + 1
    matrix = np.zeros((n_types, n_types))
    matrix[type_pairs[:, 0], type_pairs[:, 1]] = sigma
    matrix[type_pairs[:, 1], type_pairs[:, 0]] = sigma
    if cutoff_nm is not None and len(pairs) > NEIGHBOR_SEARCH_MIN_PAIRS:
        # a liquid box: searching the pairs within the cutoff at every call beats a fixed list of all pairs
        return NeighborExcludedVolumePrior(sigma_nm=matrix, bead_types=bead_types, **rule)
    return ExcludedVolumePrior(sigma_nm=matrix, bead_types=bead_types, **rule)


def _closest_approach(
    positions: torch.Tensor,
    box: Optional[torch.Tensor],
    pairs: np.ndarray,
    labels: np.ndarray,
    n_groups: int,
    quantile: float,
) -> np.ndarray:
    """Per group of pairs, the ``ceil(q N)``-th smallest of its ``N`` distances over all frames (nm).

    Frames are scanned in chunks, keeping only the smallest distances of each group.
    """
    n_frames = positions.shape[0]
    sizes = np.bincount(labels, minlength=n_groups) * n_frames
    keep = np.maximum(1, np.ceil(quantile * sizes)).astype(np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_groups))])
    atoms = torch.from_numpy(pairs[order])
    chunk = max(1, _CHUNK_ELEMENTS // len(pairs))
    kept = [np.zeros(0) for _ in range(n_groups)]
    per_pair = n_groups == len(pairs)  # one pair per group: keep an array (keep, P) instead
    smallest = np.zeros((0, len(pairs)))
    for start in range(0, n_frames, chunk):
        with torch.no_grad():
            frame_box = None if box is None else box[start:start + chunk]
            d = _distances(positions[start:start + chunk], atoms, frame_box).numpy()
        if per_pair:
            smallest = np.concatenate([smallest, d])
            if len(smallest) > keep[0]:
                smallest = np.partition(smallest, keep[0] - 1, axis=0)[:keep[0]]
            continue
        for g in range(n_groups):
            values = np.concatenate([kept[g], d[:, bounds[g]:bounds[g + 1]].ravel()])
            kept[g] = values if len(values) <= keep[g] else np.partition(values, keep[g] - 1)[:keep[g]]
    if per_pair:
        result = np.empty(n_groups)
        result[labels[order]] = smallest.max(axis=0)
        return result
    return np.array([k.max() for k in kept])
