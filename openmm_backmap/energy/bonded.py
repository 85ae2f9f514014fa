"""Bonded energy terms: harmonic bonds and angles, periodic, Ryckaert-Bellemans and CMAP torsions.

Each class is a batched, differentiable torch port of one OpenMM force, built with ``from_force``.
Energies follow OpenMM's Reference platform:

* :class:`HarmonicBond`: ``E = k/2 (r - r0)^2``.
* :class:`HarmonicAngle`: ``E = k/2 (theta - theta0)^2``.
* :class:`PeriodicTorsion`: ``E = k (1 + cos(n phi - phi0))``.
* :class:`RBTorsion`: ``E = sum_i C_i cos(psi)^i`` with ``psi = phi - pi``.
* :class:`CMAPTorsion`: bicubic patches fitted to a periodic energy grid over two torsions.

Atom indices are ``int64`` buffers and parameters ``float64`` buffers; ``forward`` computes in the dtype
of the positions.  Forces whose ``usesPeriodicBoundaryConditions()`` is true apply the minimum-image
convention to every bond vector and need box vectors; the others ignore any box passed.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import openmm
import torch
from numpy.typing import ArrayLike
from openmm import unit

from ._base import EnergyTerm, Vectors, bond_vectors, cross, dihedral_from_bonds, dot, keep_interactions, norm

_NM = unit.nanometer
_RAD = unit.radian
_KJ = unit.kilojoule_per_mole

#: Hermite basis: the cubic ``sum_i a_i u^i`` on ``[0, 1]`` with values ``f(0), f(1)`` and slopes
#: ``f'(0), f'(1)`` has ``a = _HERMITE @ (f(0), f(1), f'(0), f'(1))``.
_HERMITE = np.array([[1.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 1.0, 0.0],
                     [-3.0, 3.0, -2.0, -1.0],
                     [2.0, -2.0, 1.0, 1.0]])


def _value(quantity: Any, units: unit.Unit) -> float:
    """A plain float from an OpenMM quantity (or a bare number, taken to be in ``units``)."""
    return quantity.value_in_unit(units) if unit.is_quantity(quantity) else float(quantity)


def _tensor(value: ArrayLike | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a tensor of ``dtype``, keeping the device of a tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)


class _BondedTerm(EnergyTerm):
    """Storage, periodic-box handling and :meth:`subset` shared by the bonded terms.

    Subclasses name their per-interaction buffers in ``_per_interaction`` and the buffers shared by all
    interactions in ``_shared``; both are keyword arguments of their constructor, next to ``atoms`` and
    ``periodic``.  The geometry of an interaction comes from the vectors between its atoms listed in
    ``_vectors`` (see :meth:`_tuple_vectors`); interactions of the same atoms (e.g. the Fourier terms
    of one torsion) share it.
    """

    _per_interaction: ClassVar[tuple[str, ...]] = ()
    _shared: ClassVar[tuple[str, ...]] = ()
    #: Number of atoms per interaction.
    _n_atoms: ClassVar[int] = 0
    #: Vectors ``r[end] - r[start]`` each interaction needs, as ``(start, end)`` positions in its atom list.
    _vectors: ClassVar[tuple[tuple[int, int], ...]] = ()

    def __init__(self, atoms: ArrayLike | torch.Tensor, periodic: bool) -> None:
        super().__init__()
        self.register_buffer("atoms", _tensor(atoms, torch.int64).reshape(-1, self._n_atoms))
        #: Whether bond vectors use the minimum-image convention (a box is then required).
        self.periodic = bool(periodic)
        # Geometry is evaluated once per distinct atom tuple; ``_tuple`` maps each interaction to its tuple
        # (when some interactions share one; otherwise the tuples are the interactions, in order).
        tuples, index = np.unique(self.atoms.cpu().numpy(), axis=0, return_inverse=True)
        self._shared_geometry = len(tuples) < self.num_interactions
        self.register_buffer("_tuple", torch.as_tensor(index.reshape(-1), device=self.atoms.device),
                             persistent=False)
        tuples = torch.as_tensor(tuples, device=self.atoms.device) if self._shared_geometry else self.atoms
        # Vector-major atom lists: entries v * T ... (v + 1) * T - 1 belong to vector v of every tuple.
        start, end = (list(positions) for positions in zip(*self._vectors))
        self.register_buffer("_start", tuples[:, start].T.reshape(-1), persistent=False)
        self.register_buffer("_end", tuples[:, end].T.reshape(-1), persistent=False)

    @property
    def num_interactions(self) -> int:
        """Number of interactions (bonds, angles, torsions or torsion pairs)."""
        return self.atoms.shape[0]

    def extra_repr(self) -> str:
        return f"num_interactions={self.num_interactions}, periodic={self.periodic}"

    def _parameter(self, name: str, coordinates: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` in the dtype of ``coordinates``."""
        return getattr(self, name).to(coordinates.dtype)

    def _tuple_vectors(self, coordinates: torch.Tensor, box: torch.Tensor | None) -> list[Vectors]:
        """The vectors of ``_vectors`` of every distinct atom tuple, as components ``(T, B)``, of coordinates
        ``(3, n, B)``; minimum image for a periodic force (``box`` is then required).  Quantities computed
        from them go to the interactions through :meth:`_per_interaction_rows`."""
        delta = bond_vectors(coordinates, self._start, self._end, self._box(coordinates, box))
        n = len(self._vectors)
        components = delta.view(3 * n, -1, delta.shape[-1]).unbind(0)
        return [components[v::n] for v in range(n)]

    def _per_interaction_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tuple ``values (T, ...)`` (from :meth:`_tuple_vectors`) as per-interaction rows ``(M, ...)``."""
        return values.index_select(0, self._tuple) if self._shared_geometry else values

    def _box(self, coordinates: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor | None:
        """The box to use: ``None`` for a non-periodic force, else ``box`` in the dtype of ``coordinates``.

        Raises
        ------
        ValueError
            If the force is periodic and ``box`` is ``None``.
        """
        if not self.periodic:
            return None
        if box is None:
            raise ValueError(
                f"{type(self).__name__} uses periodic boundary conditions; pass box vectors (B, 3, 3) in nm"
            )
        return box.to(coordinates.dtype)

    def subset(self, new_index: np.ndarray, in_subset: np.ndarray) -> "_BondedTerm | None":
        """The same term restricted to a subset of atoms; see :meth:`EnergyTerm.subset`."""
        new_index = np.asarray(new_index, dtype=np.int64)
        atoms = self.atoms.cpu().numpy()
        keep = keep_interactions(atoms, new_index, np.asarray(in_subset, dtype=bool))
        if not keep.any():
            return None
        rows = torch.as_tensor(np.flatnonzero(keep), device=self.atoms.device)
        kwargs = {name: getattr(self, name)[rows] for name in self._per_interaction}
        kwargs.update({name: getattr(self, name) for name in self._shared})
        term = type(self)(atoms=new_index[atoms[keep]], periodic=self.periodic, **kwargs)
        float_dtype = next(buffer.dtype for buffer in self.buffers() if buffer.is_floating_point())
        return term.to(device=self.atoms.device, dtype=float_dtype)


class HarmonicBond(_BondedTerm):
    """Harmonic bonds ``E = k/2 (r - r0)^2`` (OpenMM ``HarmonicBondForce``); category ``"bond"``.

    Parameters
    ----------
    atoms
        ``(M, 2)`` atom indices.
    length
        ``(M,)`` equilibrium lengths ``r0`` in nm.
    k
        ``(M,)`` force constants in kJ/mol/nm^2.
    periodic
        Apply the minimum-image convention to bond vectors.
    """

    categories = ("bond",)
    _per_interaction = ("length", "k")
    _n_atoms = 2
    _vectors = ((0, 1),)

    def __init__(self, atoms: ArrayLike, length: ArrayLike, k: ArrayLike, periodic: bool = False) -> None:
        super().__init__(atoms, periodic)
        self.register_buffer("length", _tensor(length, torch.float64))
        self.register_buffer("k", _tensor(k, torch.float64))

    @classmethod
    def from_force(cls, force: openmm.HarmonicBondForce) -> "HarmonicBond | None":
        """Term with the bonds of ``force``; ``None`` if it has none."""
        rows = [force.getBondParameters(i) for i in range(force.getNumBonds())]
        if not rows:
            return None
        return cls(
            atoms=[row[:2] for row in rows],
            length=[_value(row[2], _NM) for row in rows],
            k=[_value(row[3], _KJ / _NM**2) for row in rows],
            periodic=force.usesPeriodicBoundaryConditions(),
        )

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Bond energy ``(B,)`` in kJ/mol of coordinates ``(3, n, B)`` in nm."""
        (bond,) = self._tuple_vectors(coordinates, box)
        length = self._per_interaction_rows(norm(bond))
        stretch = length - self._parameter("length", coordinates)[:, None]
        return {"bond": 0.5 * self._parameter("k", coordinates) @ stretch.square()}


class HarmonicAngle(_BondedTerm):
    """Harmonic angles ``E = k/2 (theta - theta0)^2`` (OpenMM ``HarmonicAngleForce``); category ``"angle"``.

    The angle at the central (second) atom is ``atan2(|u x v|, u . v)``, accurate near 0 and pi where an
    ``acos`` of the cosine loses precision and has an infinite derivative.

    Parameters
    ----------
    atoms
        ``(M, 3)`` atom indices, the vertex in the middle.
    angle
        ``(M,)`` equilibrium angles ``theta0`` in rad.
    k
        ``(M,)`` force constants in kJ/mol/rad^2.
    periodic
        Apply the minimum-image convention to bond vectors.
    """

    categories = ("angle",)
    _per_interaction = ("angle", "k")
    _n_atoms = 3
    _vectors = ((1, 0), (1, 2))  # the arms from the vertex

    def __init__(self, atoms: ArrayLike, angle: ArrayLike, k: ArrayLike, periodic: bool = False) -> None:
        super().__init__(atoms, periodic)
        self.register_buffer("angle", _tensor(angle, torch.float64))
        self.register_buffer("k", _tensor(k, torch.float64))

    @classmethod
    def from_force(cls, force: openmm.HarmonicAngleForce) -> "HarmonicAngle | None":
        """Term with the angles of ``force``; ``None`` if it has none."""
        rows = [force.getAngleParameters(i) for i in range(force.getNumAngles())]
        if not rows:
            return None
        return cls(
            atoms=[row[:3] for row in rows],
            angle=[_value(row[3], _RAD) for row in rows],
            k=[_value(row[4], _KJ / _RAD**2) for row in rows],
            periodic=force.usesPeriodicBoundaryConditions(),
        )

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Angle energy ``(B,)`` in kJ/mol of coordinates ``(3, n, B)`` in nm."""
        u, v = self._tuple_vectors(coordinates, box)
        theta = self._per_interaction_rows(torch.atan2(norm(cross(u, v)), dot(u, v)))
        bend = theta - self._parameter("angle", coordinates)[:, None]
        return {"angle": 0.5 * self._parameter("k", coordinates) @ bend.square()}


class PeriodicTorsion(_BondedTerm):
    """Periodic torsions ``E = k (1 + cos(n phi - phi0))`` (OpenMM ``PeriodicTorsionForce``).

    Proper and improper torsions alike; category ``"torsion"``.

    Parameters
    ----------
    atoms
        ``(M, 4)`` atom indices.
    periodicity
        ``(M,)`` multiplicities ``n``.
    phase
        ``(M,)`` phases ``phi0`` in rad.
    k
        ``(M,)`` barrier constants in kJ/mol.
    periodic
        Apply the minimum-image convention to bond vectors.
    """

    categories = ("torsion",)
    _per_interaction = ("periodicity", "phase", "k")
    _n_atoms = 4
    _vectors = ((0, 1), (1, 2), (2, 3))

    def __init__(
        self, atoms: ArrayLike, periodicity: ArrayLike, phase: ArrayLike, k: ArrayLike, periodic: bool = False
    ) -> None:
        super().__init__(atoms, periodic)
        self.register_buffer("periodicity", _tensor(periodicity, torch.float64))
        self.register_buffer("phase", _tensor(phase, torch.float64))
        self.register_buffer("k", _tensor(k, torch.float64))

    @classmethod
    def from_force(cls, force: openmm.PeriodicTorsionForce) -> "PeriodicTorsion | None":
        """Term with the torsions of ``force``; ``None`` if it has none."""
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        if not rows:
            return None
        return cls(
            atoms=[row[:4] for row in rows],
            periodicity=[row[4] for row in rows],
            phase=[_value(row[5], _RAD) for row in rows],
            k=[_value(row[6], _KJ) for row in rows],
            periodic=force.usesPeriodicBoundaryConditions(),
        )

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Torsion energy ``(B,)`` in kJ/mol of coordinates ``(3, n, B)`` in nm."""
        phi = self._per_interaction_rows(dihedral_from_bonds(*self._tuple_vectors(coordinates, box)))
        periodicity, phase, k = (self._parameter(name, coordinates) for name in ("periodicity", "phase", "k"))
        return {"torsion": k.sum() + k @ torch.cos(periodicity[:, None] * phi - phase[:, None])}


class RBTorsion(_BondedTerm):
    """Ryckaert-Bellemans torsions (OpenMM ``RBTorsionForce``); category ``"torsion"``.

    ``E = sum_{i=0}^{5} C_i cos(psi)^i`` with ``psi = phi - pi`` (polymer convention: ``psi = 0`` is
    trans), so ``cos(psi) = -cos(phi)``.

    Parameters
    ----------
    atoms
        ``(M, 4)`` atom indices.
    c
        ``(M, 6)`` coefficients ``C_0 ... C_5`` in kJ/mol.
    periodic
        Apply the minimum-image convention to bond vectors.
    """

    categories = ("torsion",)
    _per_interaction = ("c",)
    _n_atoms = 4
    _vectors = ((0, 1), (1, 2), (2, 3))

    def __init__(self, atoms: ArrayLike, c: ArrayLike, periodic: bool = False) -> None:
        super().__init__(atoms, periodic)
        self.register_buffer("c", _tensor(c, torch.float64).reshape(-1, 6))

    @classmethod
    def from_force(cls, force: openmm.RBTorsionForce) -> "RBTorsion | None":
        """Term with the torsions of ``force``; ``None`` if it has none."""
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        if not rows:
            return None
        return cls(
            atoms=[row[:4] for row in rows],
            c=[[_value(value, _KJ) for value in row[4:10]] for row in rows],
            periodic=force.usesPeriodicBoundaryConditions(),
        )

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Torsion energy ``(B,)`` in kJ/mol of coordinates ``(3, n, B)`` in nm."""
        cos_psi = -torch.cos(self._per_interaction_rows(dihedral_from_bonds(*self._tuple_vectors(coordinates, box))))
        c = self._parameter("c", coordinates).T.unsqueeze(-1)  # (6, M, 1)
        energy = c[5]
        for i in range(4, -1, -1):  # Horner's scheme over the six coefficients
            energy = energy * cos_psi + c[i]
        return {"torsion": energy.sum(0)}


def _periodic_spline_slopes(values: np.ndarray, spacing: float, axis: int) -> np.ndarray:
    """Slopes at the knots of the periodic cubic spline through ``values`` along ``axis``.

    The knots are evenly spaced by ``spacing`` and the values wrap around (the point after the last one
    is the first).  The spline's second derivatives ``m`` solve the cyclic tridiagonal system
    ``m[i-1] + 4 m[i] + m[i+1] = 6 (y[i+1] - 2 y[i] + y[i-1]) / spacing^2``.
    """
    y = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
    n = y.shape[0]
    system = 4.0 * np.eye(n) + np.roll(np.eye(n), 1, axis=1) + np.roll(np.eye(n), -1, axis=1)
    y_next, y_prev = np.roll(y, -1, axis=0), np.roll(y, 1, axis=0)
    curvature = np.linalg.solve(system, 6.0 * (y_next - 2.0 * y + y_prev).reshape(n, -1) / spacing**2)
    curvature = curvature.reshape(y.shape)
    slopes = (y_next - y) / spacing - spacing * (2.0 * curvature + np.roll(curvature, -1, axis=0)) / 6.0
    return np.moveaxis(slopes, 0, axis)


def cmap_coefficients(size: int, energy: ArrayLike) -> np.ndarray:
    """Bicubic patch coefficients of one CMAP grid, as OpenMM computes them.

    Parameters
    ----------
    size
        Number of grid points along each torsion; the grid points are at ``2 pi i / size`` rad.
    energy
        ``size * size`` energies in kJ/mol, ``energy[i + size * j]`` at the first torsion's grid point
        ``i`` and the second torsion's grid point ``j`` (OpenMM's layout).

    Returns
    -------
    numpy.ndarray
        ``(size * size, 4, 4)`` coefficients: patch ``size * s + t`` covers ``[s, s + 1] x [t, t + 1]``
        grid spacings, and its energy is ``sum_ij c[i, j] u^i v^j`` at fractional offsets ``u, v`` in
        ``[0, 1]`` of the first and second torsion.

    Notes
    -----
    The values, first derivatives and cross derivative at the grid points come from periodic cubic
    splines along each axis (the cross derivative: spline slopes along the first axis of the slopes
    along the second); each patch is the bicubic Hermite interpolant of them.
    """
    spacing = 2.0 * math.pi / size
    grid = np.asarray(energy, dtype=np.float64).reshape(size, size).T  # grid[i, j] = energy[i + size * j]
    d_first = _periodic_spline_slopes(grid, spacing, axis=0) * spacing
    d_second = _periodic_spline_slopes(grid, spacing, axis=1) * spacing
    d_cross = _periodic_spline_slopes(d_second, spacing, axis=0) * spacing

    def corners(values: np.ndarray) -> np.ndarray:
        """``(size, size, 2, 2)``: values at the corners ``(s + a, t + b)`` of every patch."""
        next_s = np.roll(values, -1, axis=0)
        return np.stack([np.stack([values, np.roll(values, -1, axis=1)], -1),
                         np.stack([next_s, np.roll(next_s, -1, axis=1)], -1)], -2)

    # Rows: value, value, d/du, d/du at u = 0, 1; columns likewise in v.
    hermite_data = np.block([[corners(grid), corners(d_second)], [corners(d_first), corners(d_cross)]])
    coefficients = np.einsum("ia,stab,jb->stij", _HERMITE, hermite_data, _HERMITE)
    return coefficients.reshape(size * size, 4, 4)


class CMAPTorsion(_BondedTerm):
    """CMAP torsion-torsion correction maps (OpenMM ``CMAPTorsionForce``); category ``"cmap"``.

    Each interaction reads the energy of the two dihedral angles ``(phi, psi)`` of atoms ``0-3`` and
    ``4-7`` off a periodic grid through bicubic patches (see :func:`cmap_coefficients`), angles taken
    in ``[0, 2 pi)``.

    Parameters
    ----------
    atoms
        ``(M, 8)`` atom indices, the first torsion's four then the second's.
    map_offset
        ``(M,)`` row of each interaction's map's first patch in ``coefficients``.
    map_size
        ``(M,)`` grid size of each interaction's map.
    coefficients
        ``(P, 4, 4)`` patch coefficients of all maps in kJ/mol, each map's :func:`cmap_coefficients`
        in turn.
    periodic
        Apply the minimum-image convention to bond vectors.
    """

    categories = ("cmap",)
    _per_interaction = ("map_offset", "map_size")
    _shared = ("coefficients",)
    _n_atoms = 8
    _vectors = ((0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7))

    def __init__(
        self,
        atoms: ArrayLike,
        map_offset: ArrayLike,
        map_size: ArrayLike,
        coefficients: ArrayLike,
        periodic: bool = False,
    ) -> None:
        super().__init__(atoms, periodic)
        self.register_buffer("map_offset", _tensor(map_offset, torch.int64))
        self.register_buffer("map_size", _tensor(map_size, torch.int64))
        self.register_buffer("coefficients", _tensor(coefficients, torch.float64).reshape(-1, 4, 4))

    @classmethod
    def from_force(cls, force: openmm.CMAPTorsionForce) -> "CMAPTorsion | None":
        """Term with the torsion pairs and maps of ``force``; ``None`` if it has no torsion pairs."""
        if force.getNumTorsions() == 0:
            return None
        maps = [force.getMapParameters(i) for i in range(force.getNumMaps())]
        tables = [cmap_coefficients(size, [_value(e, _KJ) for e in energy]) for size, energy in maps]
        offsets = np.cumsum([0] + [len(table) for table in tables[:-1]])
        rows = [force.getTorsionParameters(i) for i in range(force.getNumTorsions())]
        map_index = [row[0] for row in rows]
        return cls(
            atoms=[row[1:9] for row in rows],
            map_offset=offsets[map_index],
            map_size=[maps[i][0] for i in map_index],
            coefficients=np.concatenate(tables),
            periodic=force.usesPeriodicBoundaryConditions(),
        )

    def energy(self, coordinates: torch.Tensor, box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CMAP energy ``(B,)`` in kJ/mol of coordinates ``(3, n, B)`` in nm."""
        vectors = self._tuple_vectors(coordinates, box)
        angles = torch.stack([dihedral_from_bonds(*vectors[:3]), dihedral_from_bonds(*vectors[3:])], 1)
        angles = self._per_interaction_rows(angles)  # (M, 2, B)
        size = self.map_size.to(coordinates.dtype)[:, None, None]
        # Grid coordinates in [0, size); the clamp catches a remainder rounded up to 2 pi.
        x = torch.remainder(angles, 2.0 * math.pi) / (2.0 * math.pi / size)
        cell = torch.minimum(torch.floor(x.detach()), size - 1)
        u = x - cell
        powers = torch.stack([torch.ones_like(u), u, u * u, u * u * u], dim=-1)  # (M, 2, B, 4)
        cell = cell.long()
        patch = self.map_offset[:, None] + cell[:, 0] * self.map_size[:, None] + cell[:, 1]
        c = self.coefficients.to(coordinates.dtype)[patch]  # (M, B, 4, 4)
        energy = torch.einsum("mbij,mbi,mbj->b", c, powers[:, 0], powers[:, 1])
        return {"cmap": energy}


#: OpenMM force class -> bonded energy term built by its ``from_force``.
BONDED_TERMS: dict[type[openmm.Force], type[EnergyTerm]] = {
    openmm.HarmonicBondForce: HarmonicBond,
    openmm.HarmonicAngleForce: HarmonicAngle,
    openmm.PeriodicTorsionForce: PeriodicTorsion,
    openmm.RBTorsionForce: RBTorsion,
    openmm.CMAPTorsionForce: CMAPTorsion,
}
