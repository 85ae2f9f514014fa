"""Linear all-atom (AA) to coarse-grained (CG) maps.

A :class:`CGMapping` places each CG bead at a weighted average of its atoms and assigns it a linear
combination of the atomic forces:

.. math::

    R_I = \\sum_i P_{Ii} r_i, \\qquad F_I = \\sum_i G_{Ii} f_i,

with the position matrix :math:`P` (rows sum to one) and the force matrix :math:`G`
(:attr:`CGMapping.position_matrix`, :attr:`CGMapping.force_matrix`).

Shares
    An atom may belong to several beads (DBM's octane and cumene maps, where neighbouring beads share a
    CH or CH2 group). Its *share* :math:`s_{Ii}` in bead :math:`I` is ``1/k`` for an atom in ``k``
    beads unless given explicitly. A centre-of-mass (COM) bead weights atom ``i`` by
    :math:`s_{Ii} m_i`, a centre-of-geometry (COG) bead by :math:`s_{Ii}`; the bead mass is
    :math:`\\sum_i s_{Ii} m_i` and, by default, :math:`G_{Ii} = s_{Ii}`: each bead gets the share
    of the atom's force.

Force map and constraints (multiscale coarse-graining, MS-CG)
    Force matching fits a CG force field to the mapped forces, whose conditional mean is the mean
    force of the many-body PMF only if the force map is *consistent* with the position map:
    :math:`G P^T = I` (Noid et al. 2008; satisfied by the net force on non-overlapping beads, not
    by overlapping beads with fractional shares). With constrained bonds (``HBonds``, rigid water)
    the recorded forces lack the unknown constraint forces, which cancel in the mapped force only if
    :math:`G_{Ii}` is the same for every atom ``i`` of a cluster of atoms joined by constraints
    (cf. aggforce, Krämer et al. 2023). Therefore, when constraints are known
    (``CGMapping(..., system=system)`` or :meth:`CGMapping.with_constraints`), every atom that belongs
    to no bead but sits in a constraint cluster with mapped atoms gets, for each bead, the mean of
    those mapped atoms' shares in that bead: a hydrogen goes with its heavy atom's bead(s) with
    the heavy atom's share(s), and a cluster touching several beads splits its unmapped atoms' forces
    equally between them. Clusters touching no bead are dropped, as are unmapped unconstrained atoms.
    :attr:`CGMapping.is_force_map_consistent` reports whether both conditions hold.
    :meth:`CGMapping.with_optimized_force_map` replaces this map by the consistent one whose mapped forces
    have the least noise on given AA forces (statistically optimal force aggregation, ``_forcemap``).

Periodic boundaries
    With box vectors, each molecule (connected component of the AA bond graph) is made whole before
    the beads are placed, so a bead should not combine atoms of different molecules.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import mdtraj as md
import numpy as np
import openmm
import openmm.app as app
import scipy.sparse as sp
import yaml
from openmm import unit
from scipy.sparse.csgraph import connected_components

from ._topology import topology_fingerprint
from ._validation import as_box_vectors, as_coordinates, strip_unit

if TYPE_CHECKING:  # data sits upstream of mapping; imported lazily at run time
    from .data import AADataset

__all__ = [
    "Bead",
    "CGMapping",
    "available_presets",
    "BUILTIN_PRESETS",
    "FORMAT",
    "FORMAT_VERSION",
    "FRAGMENTS_FORMAT",
    "FRAGMENTS_FORMAT_VERSION",
    "WEIGHT_SCHEMES",
    "map_dataset",
]

#: ``format`` tag and version of files written by :meth:`CGMapping.save`.
FORMAT = "openmm-backmap-mapping"
FORMAT_VERSION = 1
#: ``format`` tag and version of per-residue fragment maps (:meth:`CGMapping.from_fragments`).
FRAGMENTS_FORMAT = "openmm-backmap-fragments"
FRAGMENTS_FORMAT_VERSION = 1
#: Presets computed from the topology; further presets are the fragment maps in ``data/``.
BUILTIN_PRESETS = ("ca", "backbone-cb", "residue", "molecule")
WEIGHT_SCHEMES = ("com", "cog")

_DATA_DIR = Path(__file__).parent / "data"
_BACKBONE = ("N", "CA", "C")
_BACKBONE_CB = ("N", "CA", "CB", "C")
#: Cap atoms kept by the ``backbone-cb`` preset; they get the type of the backbone atom they mimic.
_CAP_ATOMS = {"ACE": "C", "NME": "N"}
_TOLERANCE = 1e-9

AnyTopology = Union[app.Topology, md.Topology]


@dataclass(frozen=True)
class Bead:
    """One CG bead.

    Parameters
    ----------
    name
        Bead name, used as the atom name in the CG topology.
    atoms
        An mdtraj selection string or a sequence of atom indices.
    type
        Bead type (what a CG force field distinguishes); defaults to ``name``.
    shares
        Fraction of each atom's mass and force that goes to this bead, parallel to ``atoms`` (to the
        selected atoms in index order for a selection). ``None``: ``1/k`` for an atom in ``k`` beads.
    """

    name: str
    atoms: str | tuple[int, ...]
    type: str | None = None
    shares: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"bead name must be a non-empty string; got {self.name!r}")
        if not isinstance(self.atoms, str):
            object.__setattr__(self, "atoms", tuple(self.atoms))
        if self.shares is not None:
            object.__setattr__(self, "shares", tuple(float(s) for s in self.shares))
        if self.type is None:
            object.__setattr__(self, "type", self.name)
        if not isinstance(self.type, str) or not self.type:
            raise ValueError(f"bead type must be a non-empty string; got {self.type!r}")


class CGMapping:
    """A linear AA → CG map (see the module docstring for the theory).

    Parameters
    ----------
    topology
        The AA topology (``openmm.app.Topology`` or ``mdtraj.Topology``).
    beads
        :class:`Bead` objects or dicts with the same keys, in CG order.
    weights
        ``"com"`` (centre of mass, element masses in amu) or ``"cog"`` (centre of geometry).
    system
        An ``openmm.System`` for the same atoms; its constraints make the force map constraint-aware
        (see :meth:`with_constraints`).

    Raises
    ------
    ValueError
        A selection matching nothing, an atom index out of range, an empty bead, bad shares, or an atom
        whose shares add up to more than one.
    """

    def __init__(
        self,
        topology: AnyTopology,
        beads: Sequence[Bead | Mapping[str, Any]],
        *,
        weights: str = "com",
        system: openmm.System | None = None,
    ) -> None:
        if weights not in WEIGHT_SCHEMES:
            raise ValueError(f"weights must be one of {WEIGHT_SCHEMES}; got {weights!r}")
        self._aa_top, self._box = _as_mdtraj(topology)
        self._fingerprint = topology_fingerprint(_as_openmm(topology))
        self._weights = weights
        n_atoms = self._aa_top.n_atoms
        resolved = [self._resolve(_as_bead(bead), k) for k, bead in enumerate(beads)]
        if not resolved:
            raise ValueError("a mapping needs at least one bead")
        self._beads = _fill_default_shares(resolved, n_atoms)
        self._masses = np.array([atom.element.mass for atom in self._aa_top.atoms], dtype=np.float64)
        self._shares = _share_matrix(self._beads, n_atoms)
        total = np.asarray(self._shares.sum(axis=0)).ravel()
        if np.any(total > 1.0 + _TOLERANCE):
            i = int(np.argmax(total))
            raise ValueError(f"the shares of atom {i} ({self._atom_label(i)}) add up to {total[i]:g} > 1")
        self._position = self._position_matrix()
        self._constraints = np.zeros((0, 2), dtype=np.int64)
        self._force = self._shares
        self._force_optimized = False
        self._cg_top: md.Topology | None = None
        self._tree_levels: list[tuple[np.ndarray, np.ndarray]] | None = None
        if system is not None:
            self._set_constraints(system)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(
        cls,
        topology: AnyTopology,
        name: str,
        *,
        weights: str | None = None,
        system: openmm.System | None = None,
    ) -> "CGMapping":
        """Build a named map.

        Parameters
        ----------
        topology
            The AA topology.
        name
            ``"ca"``: one bead per amino-acid residue at its CA (type = residue name).
            ``"backbone-cb"``: single-atom beads on the ACE carbonyl C, then N, CA, CB (where present)
            and C of every amino-acid residue, then the NME N: residues in topology order, atoms in
            this role order whatever the AA atom order. Bead names and types are the roles (``"N"``,
            ``"CA"``, ``"CB"``, ``"C"``; the ACE C is typed ``"C"`` and the NME N ``"N"``, like the
            backbone atoms they mimic). For alanine dipeptide this is the 6-bead map of seed 003
            §8.2.1: ACE C, ALA N, CA, CB, C, NME N.
            ``"residue"``: one bead per residue, named and typed by the residue name.
            ``"molecule"``: one bead per molecule (connected component of the bond graph), named and
            typed by the residue of its first atom.
            Any other name is a shipped fragment map (``available_presets()``), e.g.
            ``"benzene-3bead"`` for ``data/benzene_3bead.yaml``.
            Amino-acid residues are those with atoms named N, CA and C.
        weights
            ``"com"`` or ``"cog"``; ``None`` takes the preset's default (COM for the built-in presets,
            the file's ``weights`` for fragment maps).
        system
            Optional ``openmm.System`` whose constraints make the force map constraint-aware.
        """
        if name not in BUILTIN_PRESETS:
            presets = available_presets()
            if name not in presets:
                raise ValueError(f"unknown mapping preset {name!r}; available: {', '.join(presets)}")
            path = _DATA_DIR / f"{name.replace('-', '_')}.yaml"
            return cls.from_fragments(topology, path, weights=weights, system=system)
        aa_top, _ = _as_mdtraj(topology)
        beads = _PRESET_BUILDERS[name](aa_top)
        if not beads:
            raise ValueError(f"preset {name!r} found no beads in this topology (no amino-acid residues?)")
        return cls(topology, beads, weights=weights or "com", system=system)

    @classmethod
    def from_fragments(
        cls,
        topology: AnyTopology,
        spec: Mapping[str, Any] | str | Path,
        *,
        weights: str | None = None,
        system: openmm.System | None = None,
    ) -> "CGMapping":
        """Build a map from per-residue fragment definitions (atom names within a residue).

        Parameters
        ----------
        topology
            The AA topology. Residues whose name the spec does not list get no beads.
        spec
            A dict (``format`` keys optional) or the path of a YAML file::

                format: openmm-backmap-fragments
                format_version: 1
                weights: com                # optional, com (default) or cog
                residues:
                  BENZ:
                    - {name: B1, type: B, atoms: [CG, HG, CD1, HD1]}
                    - ...
                  CUME:
                    - {name: A1, type: A, atoms: [C3, H31, H32, H33, C4, H41], shares: [1, 1, 1, 1, 0.5, 0.5]}

            ``type`` defaults to ``name``; ``shares`` as in :class:`Bead`.
        weights
            Overrides the spec's weighting scheme.
        system
            Optional ``openmm.System`` whose constraints make the force map constraint-aware.
        """
        if isinstance(spec, (str, Path)):
            source, data = str(spec), _read_yaml(Path(spec))
            _check_format(data, FRAGMENTS_FORMAT, FRAGMENTS_FORMAT_VERSION, source)
        else:
            source, data = "fragment spec", spec
            if not isinstance(data, Mapping):
                raise TypeError(f"spec must be a dict or a path; got {type(spec).__name__}")
            if "format" in data or "format_version" in data:
                _check_format(data, FRAGMENTS_FORMAT, FRAGMENTS_FORMAT_VERSION, source)
        residues = data.get("residues")
        if not isinstance(residues, Mapping) or not residues:
            raise ValueError(f"{source}: 'residues' must map residue names to lists of beads")
        aa_top, _ = _as_mdtraj(topology)
        beads = []
        for res in aa_top.residues:
            for entry in residues.get(res.name, ()):
                beads.append(_fragment_bead(res, entry, source))
        if not beads:
            raise ValueError(
                f"{source}: none of the residues {sorted(residues)} occurs in the topology "
                f"(residue names present: {sorted({r.name for r in aa_top.residues})})"
            )
        return cls(topology, beads, weights=weights or data.get("weights", "com"), system=system)

    def with_constraints(self, constraints: openmm.System | Sequence[Sequence[int]]) -> "CGMapping":
        """Return a copy whose force map is constraint-aware.

        Parameters
        ----------
        constraints
            An ``openmm.System`` for the same atoms (its constraints are used) or a sequence of
            constrained atom pairs ``(i, j)``.

        Notes
        -----
        Each unmapped atom in a constraint cluster with mapped atoms gets, per bead, the mean share of
        the cluster's mapped atoms (see the module docstring). A ``UserWarning`` is issued when the
        resulting force map still differs between constrained atoms, i.e. when constraint forces would
        enter the mapped forces (e.g. a bond constrained between atoms of different beads).
        """
        if self._force_optimized:
            raise ValueError("this mapping has an optimised force map; set the constraints first, then optimise "
                             "(with_optimized_force_map)")
        new = copy.copy(self)
        new._set_constraints(constraints)
        return new

    def with_optimized_force_map(
        self, forces: "AADataset | str | Path | Any", *, max_frames: int = 20_000
    ) -> "CGMapping":
        """Return a copy whose force map has the least noise: statistically optimal force aggregation.

        Every force map consistent with the position map yields mapped forces with the same conditional mean,
        the mean force that force matching learns; their noise differs. This one minimises the mean square of the
        mapped forces over the given AA frames subject to :math:`G P^T = I` and equal weights on atoms joined by
        constraints (Krämer et al., J. Phys. Chem. Lett. 14, 3970, 2023), with each bead's row over the atoms of
        its molecule. Copies of one molecule (same residue and atom names, beads and constraints: the molecules of
        a liquid) share one map fitted to all of them. On alanine dipeptide in OBC2 (``backbone-cb``, HBonds) it
        lowers the mean-square mapped force by about a third, from 0.99e6 to 0.68e6 (kJ/mol/nm)² on held-out
        frames; since the mean force is the same for both maps, that is the noise of the targets going down (see
        ``docs/potential.md``).

        Parameters
        ----------
        forces
            An :class:`~openmm_backmap.data.AADataset` (or its path) with forces, or an array of AA forces,
            shape ``(n_frames, n_atoms, 3)``, kJ/mol/nm. With a dataset whose System has constraints, a mapping
            that knows none is first made constraint-aware with them (:meth:`with_constraints`).
        max_frames
            Use at most this many frames (evenly strided) to estimate the force second moment.

        Raises
        ------
        ValueError
            Forces of the wrong shape, non-finite, fewer than two frames, a dataset without forces or of
            another topology, a bead combining atoms of several molecules, or a molecule too large
            (``_forcemap.MAX_MOLECULE_ATOMS`` atoms).
        """
        from ._forcemap import optimal_force_matrix
        from .data import AADataset

        if int(max_frames) < 2:
            raise ValueError(f"max_frames must be >= 2, got {max_frames}")
        chunk = 512

        def strided(n: int) -> np.ndarray:
            return np.arange(n) if n <= max_frames else np.linspace(0, n - 1, int(max_frames)).round().astype(int)

        def checked(block: np.ndarray, index: np.ndarray) -> np.ndarray:
            bad = ~np.isfinite(block).all(axis=(1, 2))
            if bad.any():
                raise ValueError(f"forces of frame {int(index[np.argmax(bad)])} are not finite")
            return block

        base, own, aa = self, False, None
        if isinstance(forces, (AADataset, str, Path)):
            own = not isinstance(forces, AADataset)
            aa = AADataset(forces) if own else forces
        try:
            if aa is not None:
                if aa.topology_fingerprint != self._fingerprint or aa.n_atoms != self.n_atoms:
                    raise ValueError(f"{aa.path} holds another topology ({aa.n_atoms} atoms) than the mapping's "
                                     f"({self.n_atoms} atoms)")
                if "forces" not in aa.fields:
                    raise ValueError(f"{aa.path} stores no forces")
                frames = strided(aa.n_frames)
                system = None if len(self._constraints) else _constrained_system(aa)
                if system is not None:
                    base = self.with_constraints(system)
                chunks = (checked(aa.forces[frames[i:i + chunk]].astype(np.float64), frames[i:i + chunk])
                          for i in range(0, len(frames), chunk))
            else:
                values = np.asarray(strip_unit(forces, unit.kilojoule_per_mole / unit.nanometer), dtype=np.float64)
                if values.ndim != 3 or values.shape[1:] != (self.n_atoms, 3):
                    raise ValueError(f"forces must have shape (n_frames, {self.n_atoms}, 3), got {values.shape}")
                frames = strided(len(values))
                chunks = (checked(values[frames[i:i + chunk]], frames[i:i + chunk])
                          for i in range(0, len(frames), chunk))
            if len(frames) < 2:
                raise ValueError(f"need at least two frames of forces to optimise the force map, got {len(frames)}")
            _, molecules = connected_components(_bond_graph(self._aa_top), directed=False)
            _, labels = np.unique([f"{a.residue.name}\0{a.name}\0{a.element.symbol if a.element else ''}"
                                   for a in self._aa_top.atoms], return_inverse=True)
            matrix = optimal_force_matrix(base._position, chunks, molecules, base._constraints, labels)
        finally:
            if own:
                aa.close()
        new = copy.copy(base)
        new._force = matrix
        new._force_optimized = True
        return new

    # ------------------------------------------------------------------ properties
    @property
    def n_atoms(self) -> int:
        """Number of AA atoms."""
        return self._aa_top.n_atoms

    @property
    def n_beads(self) -> int:
        """Number of CG beads."""
        return len(self._beads)

    @property
    def beads(self) -> tuple[Bead, ...]:
        """The beads, with atom indices and shares resolved."""
        return self._beads

    @property
    def bead_names(self) -> list[str]:
        """Bead names, in CG order (the atom names of :attr:`cg_topology`)."""
        return [bead.name for bead in self._beads]

    @property
    def bead_types(self) -> list[str]:
        """Bead types, in CG order."""
        return [bead.type for bead in self._beads]

    @property
    def weights(self) -> str:
        """Weighting scheme, ``"com"`` or ``"cog"``."""
        return self._weights

    @property
    def bead_masses(self) -> np.ndarray:
        """Bead masses in amu, ``sum_i share_Ii * m_i``, shape ``(n_beads,)``."""
        return np.asarray(self._shares @ self._masses).ravel()

    @property
    def position_matrix(self) -> np.ndarray:
        """Dense position map ``P``, shape ``(n_beads, n_atoms)``; rows sum to one."""
        return self._position.toarray()

    @property
    def position_matrix_sparse(self) -> sp.csr_matrix:
        """:attr:`position_matrix` as a SciPy CSR matrix (a copy): what large boxes should use."""
        return self._position.copy()

    @property
    def force_matrix(self) -> np.ndarray:
        """Dense force map ``G``, shape ``(n_beads, n_atoms)``; bead forces are ``G @ f``."""
        return self._force.toarray()

    @property
    def has_optimized_force_map(self) -> bool:
        """Whether the force map was optimised on AA forces (:meth:`with_optimized_force_map`)."""
        return self._force_optimized

    @property
    def constraints(self) -> np.ndarray:
        """Constrained atom pairs the force map accounts for, shape ``(n_constraints, 2)``."""
        return self._constraints.copy()

    @property
    def is_force_map_consistent(self) -> bool:
        """Whether ``G P^T = I`` and ``G`` is equal on constrained atom pairs (module docstring)."""
        deviation = self._force @ self._position.T - sp.identity(self.n_beads)
        if deviation.nnz and abs(deviation).max() > 1e-8:
            return False
        return self._first_inconsistent_constraint() is None

    @property
    def topology_fingerprint(self) -> str:
        """Fingerprint of the AA topology (:func:`openmm_backmap._topology.topology_fingerprint`)."""
        return self._fingerprint

    @property
    def aa_topology(self) -> md.Topology:
        """The AA topology as an mdtraj topology (a copy)."""
        return self._aa_top.copy()

    @property
    def cg_topology(self) -> md.Topology:
        """The CG topology (a copy): one atom per bead, named by the bead.

        Chains and residues mirror those of each bead's lowest-index atom (a new CG residue starts
        whenever that AA residue changes along the bead order). A bead's element is that of its
        heaviest atom (lowest index on ties), so PDB files of CG frames open in VMD, PyMOL and mdtraj;
        the real bead masses are :attr:`bead_masses` and the types :attr:`bead_types`. Two beads are
        bonded when they share an atom, when an atom of one is bonded to an atom of the other, or when
        they are joined through a path of atoms that belong to no bead.
        """
        if self._cg_top is None:
            self._cg_top = self._build_cg_topology()
        return self._cg_top.copy()

    def to_openmm_topology(self) -> app.Topology:
        """The CG topology as an ``openmm.app.Topology`` (with the AA box vectors, if known)."""
        top = self.cg_topology.to_openmm()
        if self._box is not None:
            top.setPeriodicBoxVectors(self._box)
        return top

    # ------------------------------------------------------------------ maps
    def make_molecules_whole(self, xyz: Any, box_vectors: Any) -> np.ndarray:
        """Undo periodic wrapping inside each molecule.

        Every molecule (connected component of the bond graph) keeps its lowest-index atom in place;
        the other atoms are placed by walking a breadth-first spanning tree, each tree bond taken at
        its minimum image (OpenMM's triclinic convention: subtract ``c*round(dz/cz)``, then
        ``b*round(dy/by)``, then ``a*round(dx/ax)``).

        Parameters
        ----------
        xyz
            Positions in nm, shape ``(n_atoms, 3)`` or ``(n_frames, n_atoms, 3)``.
        box_vectors
            Rows a, b, c in nm, shape ``(3, 3)`` or ``(n_frames, 3, 3)``, in OpenMM's reduced
            triclinic form (a along x, b in the xy plane).

        Returns
        -------
        numpy.ndarray
            Positions in nm, same shape as ``xyz``.
        """
        xyz = as_coordinates(xyz, self.n_atoms, name="xyz")
        box = _check_box(box_vectors, xyz)
        frames = xyz if xyz.ndim == 3 else xyz[None]
        boxes = box if box.ndim == 3 else box[None]
        out = frames.copy()
        for children, parents in self._spanning_tree_levels():
            # The minimum image of a bond vector does not depend on lattice shifts already applied
            # to its parent atom, so it is taken on the input coordinates.
            bond = _minimum_image(frames[:, children] - frames[:, parents], boxes)
            out[:, children] = out[:, parents] + bond
        return out if xyz.ndim == 3 else out[0]

    def map_positions(self, xyz: Any, box_vectors: Any | None = None) -> np.ndarray:
        """Bead positions in nm.

        Parameters
        ----------
        xyz
            AA positions in nm (array or OpenMM Quantity), ``(n_atoms, 3)`` or
            ``(n_frames, n_atoms, 3)``.
        box_vectors
            Optional box (see :meth:`make_molecules_whole`); molecules are made whole first.

        Returns
        -------
        numpy.ndarray
            ``(n_beads, 3)`` or ``(n_frames, n_beads, 3)``, nm.
        """
        xyz = as_coordinates(xyz, self.n_atoms, name="xyz")
        if box_vectors is not None:
            xyz = self.make_molecules_whole(xyz, box_vectors)
        return _apply(self._position, xyz)

    def map_forces(self, forces: Any) -> np.ndarray:
        """Bead forces in kJ/mol/nm: ``G @ f`` (see :attr:`force_matrix`).

        Parameters
        ----------
        forces
            AA forces in kJ/mol/nm (array or OpenMM Quantity), ``(n_atoms, 3)`` or
            ``(n_frames, n_atoms, 3)``.

        Returns
        -------
        numpy.ndarray
            ``(n_beads, 3)`` or ``(n_frames, n_beads, 3)``, kJ/mol/nm.
        """
        forces = strip_unit(forces, unit.kilojoule_per_mole / unit.nanometer)
        forces = as_coordinates(forces, self.n_atoms, name="forces")
        return _apply(self._force, forces)

    # ------------------------------------------------------------------ I/O
    def to_yaml(self) -> str:
        """The map as YAML text (bead atoms, shares, weights, constraints, AA fingerprint); see :meth:`save`."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weights": self._weights,
            "n_atoms": self.n_atoms,
            "topology_fingerprint": self._fingerprint,
            "beads": [
                {"name": b.name, "type": b.type, "atoms": list(b.atoms), "shares": list(b.shares)}
                for b in self._beads
            ],
        }
        if len(self._constraints):
            doc["constraints"] = self._constraints.tolist()
        if self._force_optimized:
            force = self._force.tocoo()
            doc["force_map"] = [[int(i), int(j), float(v)] for i, j, v in zip(force.row, force.col, force.data)]
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> None:
        """Write the map to a YAML file (bead atoms, shares, weights, constraints, AA fingerprint)."""
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path, topology: AnyTopology) -> "CGMapping":
        """Read a map written by :meth:`save` for ``topology``.

        Raises
        ------
        ValueError
            The file is not a mapping file, has an unsupported version, is malformed, or was made for
            another topology (different atom count or fingerprint).
        """
        return cls._from_doc(_read_yaml(Path(path)), topology, str(path))

    @classmethod
    def from_yaml(cls, text: str, topology: AnyTopology, *, source: str = "<yaml>") -> "CGMapping":
        """Read a map from YAML text (as written by :meth:`to_yaml`) for ``topology``; see :meth:`load`."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: expected a YAML mapping at the top level")
        return cls._from_doc(doc, topology, source)

    @classmethod
    def _from_doc(cls, doc: dict[str, Any], topology: AnyTopology, source: str) -> "CGMapping":
        _check_format(doc, FORMAT, FORMAT_VERSION, source)
        missing = [key for key in ("weights", "n_atoms", "topology_fingerprint", "beads") if key not in doc]
        if missing:
            raise ValueError(f"{source}: mapping file lacks {', '.join(missing)}")
        omm_top = _as_openmm(topology)
        n_atoms, fingerprint = omm_top.getNumAtoms(), topology_fingerprint(omm_top)
        if doc["n_atoms"] != n_atoms or doc["topology_fingerprint"] != fingerprint:
            raise ValueError(
                f"{source} was made for another topology ({doc['n_atoms']} atoms, fingerprint "
                f"{doc['topology_fingerprint']}) than the one given ({n_atoms} atoms, fingerprint {fingerprint})"
            )
        beads = doc["beads"]
        if not isinstance(beads, list) or not all(isinstance(b, Mapping) for b in beads):
            raise ValueError(f"{source}: 'beads' must be a list of mappings")
        try:
            mapping = cls(topology, beads, weights=doc["weights"])
            if "constraints" in doc:
                mapping._set_constraints(doc["constraints"])
            if "force_map" in doc:
                mapping._set_force_map(doc["force_map"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: invalid mapping: {exc}") from exc
        return mapping

    def __repr__(self) -> str:
        return f"CGMapping(n_atoms={self.n_atoms}, n_beads={self.n_beads}, weights={self._weights!r})"

    # ------------------------------------------------------------------ internals
    def _atom_label(self, index: int) -> str:
        atom = self._aa_top.atom(index)
        return f"{atom.residue}-{atom.name}"

    def _resolve(self, bead: Bead, position: int) -> Bead:
        """Turn a selection into atom indices and check indices and shares."""
        label = f"bead {position} ({bead.name!r})"
        if isinstance(bead.atoms, str):
            try:
                atoms = tuple(int(i) for i in self._aa_top.select(bead.atoms))
            except Exception as exc:  # mdtraj raises several exception types for bad selections
                raise ValueError(f"{label}: invalid selection {bead.atoms!r}: {exc}") from exc
            if not atoms:
                raise ValueError(f"{label}: selection {bead.atoms!r} matches no atom")
        else:
            atoms = bead.atoms
            if not atoms:
                raise ValueError(f"{label} has no atoms")
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in atoms):
                raise ValueError(f"{label}: atom indices must be integers; got {list(atoms)}")
            bad = [int(i) for i in atoms if not 0 <= i < self._aa_top.n_atoms]
            if bad:
                raise ValueError(f"{label}: atom index {bad[0]} out of range for {self._aa_top.n_atoms} atoms")
            atoms = tuple(int(i) for i in atoms)
        if len(set(atoms)) != len(atoms):
            raise ValueError(f"{label} lists an atom more than once: {list(atoms)}")
        if bead.shares is not None:
            shares = np.asarray(bead.shares)
            if len(shares) != len(atoms):
                raise ValueError(f"{label}: {len(shares)} shares for {len(atoms)} atoms")
            if not np.all((shares > 0) & (shares <= 1)):
                raise ValueError(f"{label}: shares must lie in (0, 1]; got {list(bead.shares)}")
        return Bead(bead.name, atoms, type=bead.type, shares=bead.shares)

    def _position_matrix(self) -> sp.csr_matrix:
        weights = self._shares.multiply(self._masses[None, :]) if self._weights == "com" else self._shares
        weights = sp.csr_matrix(weights, copy=True)
        norm = np.asarray(weights.sum(axis=1)).ravel()
        if np.any(norm <= 0):
            bead = self._beads[int(np.argmin(norm))]
            raise ValueError(f"bead {bead.name!r} has no mass; use weights='cog'")
        weights.data /= np.repeat(norm, np.diff(weights.indptr))  # exact 1.0 for single-atom beads
        return weights

    def _set_constraints(self, constraints: openmm.System | Any) -> None:
        pairs = _constraint_pairs(constraints, self.n_atoms)
        self._constraints = pairs
        self._force = self._shares
        if not len(pairs):
            return
        n = self.n_atoms
        graph = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        n_clusters, labels = connected_components(graph, directed=False)
        membership = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, n_clusters))
        mapped = np.asarray(self._shares.sum(axis=0)).ravel() > 0
        n_mapped = membership.T @ mapped.astype(np.float64)
        inverse = np.divide(1.0, n_mapped, out=np.zeros(n_clusters), where=n_mapped > 0)
        mean_share = self._shares @ membership @ sp.diags(inverse)  # (n_beads, n_clusters)
        constrained = np.zeros(n, dtype=bool)
        constrained[pairs.ravel()] = True
        targets = np.flatnonzero(constrained & ~mapped)
        gather = sp.csr_matrix((np.ones(len(targets)), (labels[targets], targets)), shape=(n_clusters, n))
        self._force = sp.csr_matrix(self._shares + mean_share @ gather)
        self._force.eliminate_zeros()
        bad = self._first_inconsistent_constraint()
        if bad is not None:
            i, j = bad
            warnings.warn(
                f"the force map differs between constrained atoms {i} ({self._atom_label(i)}) and {j} "
                f"({self._atom_label(j)}): constraint forces will enter the mapped forces",
                UserWarning,
                stacklevel=3,
            )

    def _set_force_map(self, entries: Any) -> None:
        """Install an explicit force map given as ``[bead, atom, weight]`` triples (a saved optimised map)."""
        table = np.asarray(entries, dtype=np.float64)
        if table.ndim != 2 or table.shape[1] != 3 or not np.isfinite(table).all():
            raise ValueError("'force_map' must be a list of finite [bead, atom, weight] triples")
        rows, cols = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
        if np.any(rows != table[:, 0]) or np.any(cols != table[:, 1]) or rows.min(initial=0) < 0 \
                or cols.min(initial=0) < 0 or rows.max(initial=0) >= self.n_beads or cols.max(initial=0) >= self.n_atoms:
            raise ValueError("'force_map' has bead or atom indices out of range")
        self._force = sp.csr_matrix((table[:, 2], (rows, cols)), shape=(self.n_beads, self.n_atoms))
        self._force_optimized = True
        if not self.is_force_map_consistent:
            raise ValueError("'force_map' is not consistent with the position map (G P^T != I, or unequal on "
                             "constrained atoms)")

    def _first_inconsistent_constraint(self) -> tuple[int, int] | None:
        if not len(self._constraints):
            return None
        force = self._force.tocsc()
        diff = abs(force[:, self._constraints[:, 0]] - force[:, self._constraints[:, 1]])
        worst = np.asarray(diff.max(axis=0).todense()).ravel()
        if np.all(worst <= 1e-12):
            return None
        i, j = self._constraints[int(np.argmax(worst > 1e-12))]
        return int(i), int(j)

    def _spanning_tree_levels(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Breadth-first spanning forest of the bond graph as (children, parents) arrays per depth."""
        if self._tree_levels is None:
            graph = _bond_graph(self._aa_top)
            _, labels = connected_components(graph, directed=False)
            _, roots = np.unique(labels, return_index=True)
            visited = np.zeros(self.n_atoms, dtype=bool)
            visited[roots] = True
            frontier, levels = roots, []
            while len(frontier):
                edges = graph[frontier].tocoo()
                parents, children = frontier[edges.row], edges.col
                keep = ~visited[children]
                children, first = np.unique(children[keep], return_index=True)
                parents = parents[keep][first]
                if len(children):
                    levels.append((children, parents))
                visited[children] = True
                frontier = children
            self._tree_levels = levels
        return self._tree_levels

    def _cg_bonds(self) -> list[tuple[int, int]]:
        member = sp.csr_matrix((self._shares > 0).astype(np.float64))
        graph = _bond_graph(self._aa_top)
        eye = sp.identity(self.n_atoms, format="csr")
        direct = member @ (graph + eye) @ member.T
        unmapped = np.asarray(member.sum(axis=0)).ravel() == 0
        keep = sp.diags(unmapped.astype(np.float64))
        n_parts, labels = connected_components(keep @ graph @ keep, directed=False)
        parts = sp.csr_matrix(
            (np.ones(unmapped.sum()), (np.flatnonzero(unmapped), labels[unmapped])), shape=(self.n_atoms, n_parts)
        )
        touching = member @ graph @ parts  # beads adjacent to each connected set of unmapped atoms
        linked = sp.triu(direct + touching @ touching.T, k=1).tocoo()
        return sorted(zip(linked.row.tolist(), linked.col.tolist()))

    def _build_cg_topology(self) -> md.Topology:
        top = md.Topology()
        atoms, chain, residue, last_aa_chain, last_aa_residue = [], None, None, None, None
        for bead in self._beads:
            aa_residue = self._aa_top.atom(min(bead.atoms)).residue
            if aa_residue.chain is not last_aa_chain:
                chain = top.add_chain(chain_id=aa_residue.chain.chain_id)
                last_aa_chain, last_aa_residue = aa_residue.chain, None
            if aa_residue is not last_aa_residue:
                residue = top.add_residue(aa_residue.name, chain, resSeq=aa_residue.resSeq)
                last_aa_residue = aa_residue
            heaviest = max(bead.atoms, key=lambda i: (self._masses[i], -i))
            atoms.append(top.add_atom(bead.name, self._aa_top.atom(heaviest).element, residue))
        for i, j in self._cg_bonds():
            top.add_bond(atoms[i], atoms[j])
        return top


def available_presets() -> list[str]:
    """Names accepted by :meth:`CGMapping.from_preset`: built-ins, then the shipped fragment maps."""
    shipped = []
    for path in sorted(_DATA_DIR.glob("*.yaml")):
        doc = _read_yaml(path)
        if doc.get("format") == FRAGMENTS_FORMAT:
            shipped.append(path.stem.replace("_", "-"))
    return [*BUILTIN_PRESETS, *shipped]


# ---------------------------------------------------------------------- module helpers
def _bond_graph(top: md.Topology) -> sp.csr_matrix:
    """Symmetric adjacency matrix of the bond graph."""
    n = top.n_atoms
    bonds = np.array([[a.index, b.index] for a, b in top.bonds], dtype=np.int64).reshape(-1, 2)
    graph = sp.coo_matrix((np.ones(len(bonds)), (bonds[:, 0], bonds[:, 1])), shape=(n, n))
    return sp.csr_matrix(((graph + graph.T) > 0).astype(np.float64))


def _as_mdtraj(topology: AnyTopology) -> tuple[md.Topology, Any]:
    """The topology as mdtraj, plus the OpenMM box vectors when known (else ``None``)."""
    if isinstance(topology, md.Topology):
        return topology, None
    if isinstance(topology, app.Topology):
        return md.Topology.from_openmm(topology), topology.getPeriodicBoxVectors()
    raise TypeError(f"topology must be an openmm.app.Topology or mdtraj.Topology; got {type(topology).__name__}")


def _as_openmm(topology: AnyTopology) -> app.Topology:
    if isinstance(topology, md.Topology):
        return topology.to_openmm()
    if isinstance(topology, app.Topology):
        return topology
    raise TypeError(f"topology must be an openmm.app.Topology or mdtraj.Topology; got {type(topology).__name__}")


def _as_bead(bead: Bead | Mapping[str, Any]) -> Bead:
    if isinstance(bead, Bead):
        return bead
    if isinstance(bead, Mapping):
        unknown = set(bead) - {"name", "atoms", "type", "shares"}
        if unknown or "name" not in bead or "atoms" not in bead:
            raise ValueError(
                f"a bead needs the keys 'name' and 'atoms' (optional: 'type', 'shares'); got {sorted(bead)}"
            )
        return Bead(**bead)
    raise TypeError(f"beads must be Bead objects or dicts; got {type(bead).__name__}")


def _fill_default_shares(beads: list[Bead], n_atoms: int) -> tuple[Bead, ...]:
    """Give atoms without explicit shares ``1/k``, ``k`` being the number of beads holding the atom."""
    count = np.zeros(n_atoms, dtype=np.int64)
    for bead in beads:
        count[list(bead.atoms)] += 1
    return tuple(
        bead if bead.shares is not None
        else Bead(bead.name, bead.atoms, type=bead.type, shares=tuple(1.0 / count[i] for i in bead.atoms))
        for bead in beads
    )


def _share_matrix(beads: Sequence[Bead], n_atoms: int) -> sp.csr_matrix:
    rows = np.concatenate([np.full(len(b.atoms), k) for k, b in enumerate(beads)])
    cols = np.concatenate([np.asarray(b.atoms, dtype=np.int64) for b in beads])
    vals = np.concatenate([np.asarray(b.shares, dtype=np.float64) for b in beads])
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(beads), n_atoms))


def _fragment_bead(residue: md.core.topology.Residue, entry: Any, source: str) -> Bead:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("atoms"), list):
        raise ValueError(f"{source}: each bead of residue {residue.name} needs 'name' and a list 'atoms'")
    index = {atom.name: atom.index for atom in residue.atoms}
    missing = [name for name in entry["atoms"] if name not in index]
    if missing:
        raise ValueError(
            f"{source}: bead {entry.get('name')!r} of {residue.name}: atom(s) {missing} not in residue "
            f"{residue} (atoms: {sorted(index)})"
        )
    try:
        return _as_bead({**entry, "atoms": [index[name] for name in entry["atoms"]]})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad bead {entry!r}: {exc}") from exc


def _amino_acids(top: md.Topology) -> list:
    return [res for res in top.residues if set(_BACKBONE) <= {a.name for a in res.atoms}]


def _ca_beads(top: md.Topology) -> list[Bead]:
    return [Bead("CA", (res.atom("CA").index,), type=res.name) for res in _amino_acids(top)]


def _backbone_cb_beads(top: md.Topology) -> list[Bead]:
    amino = set(_amino_acids(top))
    beads = []
    for res in top.residues:
        roles = _BACKBONE_CB if res in amino else (_CAP_ATOMS.get(res.name),)
        by_name = {atom.name: atom.index for atom in res.atoms}
        beads.extend(Bead(role, (by_name[role],)) for role in roles if role in by_name)
    return beads


def _residue_beads(top: md.Topology) -> list[Bead]:
    return [Bead(res.name, tuple(a.index for a in res.atoms)) for res in top.residues if res.n_atoms]


def _molecule_beads(top: md.Topology) -> list[Bead]:
    _, labels = connected_components(_bond_graph(top), directed=False)
    beads = []
    for label in labels[np.sort(np.unique(labels, return_index=True)[1])]:
        atoms = tuple(int(i) for i in np.flatnonzero(labels == label))
        beads.append(Bead(top.atom(atoms[0]).residue.name, atoms))
    return beads


_PRESET_BUILDERS = {
    "ca": _ca_beads,
    "backbone-cb": _backbone_cb_beads,
    "residue": _residue_beads,
    "molecule": _molecule_beads,
}


def _constraint_pairs(constraints: openmm.System | Any, n_atoms: int) -> np.ndarray:
    if isinstance(constraints, openmm.System):
        if constraints.getNumParticles() != n_atoms:
            raise ValueError(
                f"the system has {constraints.getNumParticles()} particles but the topology {n_atoms} atoms"
            )
        pairs = [constraints.getConstraintParameters(k)[:2] for k in range(constraints.getNumConstraints())]
    else:
        pairs = constraints
    arr = np.asarray(pairs, dtype=np.int64)
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"constraints must be atom index pairs, shape (n, 2); got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_atoms):
        raise ValueError(f"constraint atom indices must lie in [0, {n_atoms})")
    return arr


def _check_box(box_vectors: Any, xyz: np.ndarray) -> np.ndarray:
    box = as_box_vectors(box_vectors)
    if box.ndim == 3 and (xyz.ndim != 3 or box.shape[0] != xyz.shape[0]):
        n_frames = xyz.shape[0] if xyz.ndim == 3 else "a single frame of"
        raise ValueError(f"box_vectors has {box.shape[0]} frames but xyz has {n_frames} positions")
    upper = box[..., [0, 0, 1], [1, 2, 2]]
    diagonal = box[..., [0, 1, 2], [0, 1, 2]]
    if np.any(np.abs(upper) > 1e-9) or np.any(diagonal <= 0):
        raise ValueError(
            "box_vectors must be in OpenMM's reduced form: a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz) "
            "with ax, by, cz > 0"
        )
    return box


def _minimum_image(delta: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Minimum-image vectors; ``delta`` (n_frames, k, 3), ``boxes`` (n_frames or 1, 3, 3)."""
    for axis in (2, 1, 0):
        vector = boxes[:, None, axis]
        delta = delta - vector * np.round(delta[..., axis : axis + 1] / vector[..., axis : axis + 1])
    return delta


def _apply(matrix: sp.csr_matrix, arr: np.ndarray) -> np.ndarray:
    """``matrix @ arr`` over the atom axis of a ``(n, 3)`` or ``(n_frames, n, 3)`` array."""
    if arr.ndim == 2:
        return np.asarray(matrix @ arr)
    n_frames, n_atoms, _ = arr.shape
    flat = np.moveaxis(arr, 0, 1).reshape(n_atoms, n_frames * 3)
    return np.asarray(matrix @ flat).reshape(matrix.shape[0], n_frames, 3).transpose(1, 0, 2).copy()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            doc = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid YAML file: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return doc


def _check_format(doc: Mapping[str, Any], expected: str, version: int, source: str) -> None:
    if doc.get("format") != expected:
        raise ValueError(f"{source}: format is {doc.get('format')!r}, expected {expected!r}")
    if doc.get("format_version") != version:
        raise ValueError(
            f"{source}: unsupported format_version {doc.get('format_version')!r} (this version reads {version})"
        )


def _constrained_system(aa: "AADataset") -> openmm.System | None:
    """The dataset's stored System if it has constraints, else ``None`` (also when no System is stored)."""
    try:
        system = aa.system
    except ValueError:
        return None
    return system if system.getNumConstraints() else None


def map_dataset(
    dataset: "AADataset | str | Path",
    mapping: CGMapping,
    path: str | Path,
    *,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Map every frame of an AA dataset to CG and write a CG dataset.

    Positions are mapped with molecules made whole (periodic data), forces with the force map, velocities
    (if stored) with the position map; potential energy, time, step and box are copied.  If ``mapping``
    knows no constraints but the dataset's ``openmm.System`` has some, the map is made constraint-aware
    with them (see :meth:`CGMapping.with_constraints`).  The map itself is stored in the file
    (``CGDataset.text("mapping")``).

    Parameters
    ----------
    dataset
        An :class:`~openmm_backmap.data.AADataset` or the path of one.
    mapping
        A map made for the dataset's topology.
    path
        Output HDF5 file; written to a temporary name and renamed when complete, so a failure leaves
        no partial file.
    chunk_size
        Frames mapped per block (memory use ~ chunk_size x n_atoms x 3 x 8 bytes x fields).
    overwrite
        Replace an existing output file.

    Returns
    -------
    Path
        The CG dataset.
    """
    from tqdm.auto import tqdm

    from .data import AADataset, TrajectoryWriter

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    own = not isinstance(dataset, AADataset)
    aa = AADataset(dataset) if own else dataset
    try:
        if aa.topology_fingerprint != mapping.topology_fingerprint or aa.n_atoms != mapping.n_atoms:
            raise ValueError(
                f"the mapping was made for another topology ({mapping.n_atoms} atoms) than {aa.path} "
                f"({aa.n_atoms} atoms)"
            )
        if aa.n_frames == 0:
            raise ValueError(f"{aa.path} holds no frames")
        system = None if len(mapping.constraints) else _constrained_system(aa)
        if system is not None:
            if mapping.has_optimized_force_map:
                raise ValueError(f"the force map was optimised without constraints, but the System of {aa.path} "
                                 "has some: optimise it again with the dataset (with_optimized_force_map(aa))")
            mapping = mapping.with_constraints(system)
        fields = [f for f in aa.fields if f in ("positions", "forces", "velocities")]
        settings = {**aa.settings, "mapped_from": str(aa.path), "aa_topology_fingerprint": aa.topology_fingerprint,
                    "constraint_aware_forces": bool(len(mapping.constraints)),
                    "optimized_force_map": mapping.has_optimized_force_map}
        tmp = path.with_name(path.name + ".partial")
        tmp.unlink(missing_ok=True)
        try:
            with TrajectoryWriter(tmp, mapping.to_openmm_topology(), fields=fields, kind="cg",
                                  dtype=str(aa.positions.dtype), settings=settings,
                                  extra={"mapping": mapping.to_yaml()}) as writer:
                n = aa.n_frames
                energy, time, step = aa.potential_energy, aa.time, aa.step
                with tqdm(total=n, unit="frame", disable=not progress, desc=f"mapping -> {path.name}") as bar:
                    for start in range(0, n, chunk_size):
                        sl = slice(start, min(n, start + chunk_size))
                        box = aa.box_vectors[sl] if aa.periodic else None
                        xyz = aa.positions[sl].astype(np.float64)
                        if box is not None:
                            xyz = mapping.make_molecules_whole(xyz, box)
                        writer.append_frames(
                            step=step[sl], time_ps=time[sl], potential_energy=energy[sl], box_vectors=box,
                            positions=mapping.map_positions(xyz),
                            forces=mapping.map_forces(aa.forces[sl]) if "forces" in fields else None,
                            velocities=mapping.map_positions(aa.velocities[sl]) if "velocities" in fields else None,
                        )
                        bar.update(sl.stop - sl.start)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        if own:
            aa.close()
    return path
