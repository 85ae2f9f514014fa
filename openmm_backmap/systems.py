"""Test systems built by our own code from public facts.

Everything here is generated from a sequence or a residue template shipped with OpenMM: peptides
(alanine dipeptide, chignolin, any one-letter sequence) with the Amber ff14SB force field in vacuum,
implicit (OBC2, GBn2) or TIP3P solvent, and neat liquids of the CGenFF small molecules in OpenMM's
``charmm36.xml`` (benzene ``BENZ``, cumene ``CUME``, hexane ``HEXA``, toluene ``TOLU``, ...).
Nothing is downloaded and no structure file is copied from elsewhere.

Every builder returns a :class:`TestSystem`, which unpacks like openmmtools' test systems::

    topology, system, positions = alanine_dipeptide("obc2")

Positions are *built*, not equilibrated: call :meth:`TestSystem.minimized` before running dynamics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import openmm
from openmm import app, unit
from rdkit import Chem
from rdkit.Chem import AllChem, rdDetermineBonds, rdMolTransforms
from scipy.optimize import minimize
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ._validation import as_box_vectors, as_coordinates
from .platforms import choose_platform

__all__ = [
    "LIQUID_DENSITIES",
    "TestSystem",
    "alanine_dipeptide",
    "chignolin",
    "liquid",
    "peptide",
    "replicate",
]

#: Experimental densities of neat liquids at 25 °C (298.15 K) and 1 atm, in g/cm³, keyed by the
#: CGenFF residue name in OpenMM's ``charmm36.xml``.  Source: CRC Handbook of Chemistry and Physics
#: (97th ed., "Density of Liquids" / "Physical Constants of Organic Compounds").  Cumene is tabulated
#: there at 20 °C (0.862 g/cm³); 0.857 is that value carried to 25 °C with its thermal expansion
#: coefficient (about 1.0e-3 K⁻¹).
LIQUID_DENSITIES: dict[str, float] = {
    "BENZ": 0.874,  # benzene
    "CUME": 0.857,  # cumene (isopropylbenzene)
    "HEXA": 0.655,  # n-hexane
    "TOLU": 0.862,  # toluene
}

PEPTIDE_SOLVENTS = ("vacuum", "obc2", "gbn2", "tip3p")
_PEPTIDE_FORCEFIELDS = {
    "vacuum": ("amber14-all.xml",),
    "obc2": ("amber14-all.xml", "implicit/obc2.xml"),
    "gbn2": ("amber14-all.xml", "implicit/gbn2.xml"),
    "tip3p": ("amber14-all.xml", "amber14/tip3p.xml"),
}
_LIQUID_FORCEFIELD = "charmm36.xml"
_AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWY")
_AVOGADRO = 6.02214076e23
#: Packing aims this much beyond the tolerance so that the converged penalty leaves every pair clear of it.
_PACK_MARGIN = 1.1
#: Heavy atoms four or more bonds apart closer than this (nm) count as a clash in a built peptide.
_PEPTIDE_CLASH_NM = 0.25


@dataclass
class TestSystem:
    """An OpenMM topology, system and starting positions, with a record of how they were made.

    Attributes
    ----------
    name
        Short identifier, e.g. ``"alanine_dipeptide_obc2"``.
    topology
        Topology with bonds; periodic box vectors are set for periodic systems.
    system
        The OpenMM system.
    positions
        Quantity wrapping an ``(n_atoms, 3)`` float64 array in nm.
    metadata
        JSON-serialisable description: force-field files, solvent, nonbonded method, cutoff (nm),
        constraints, molecule counts, density (g/cm³), seed, ...
    """

    __test__ = False  # not a pytest test class despite its name

    name: str
    topology: app.Topology
    system: openmm.System
    positions: unit.Quantity
    metadata: dict = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        yield self.topology
        yield self.system
        yield self.positions

    @property
    def positions_nm(self) -> np.ndarray:
        """Positions as a plain ``(n_atoms, 3)`` float64 array in nm."""
        return as_coordinates(self.positions, self.system.getNumParticles(), allow_batch=False)

    def minimized(
        self,
        tolerance: float = 10.0,
        max_iterations: int = 0,
        platform: str | openmm.Platform | None = None,
    ) -> "TestSystem":
        """Return a copy with energy-minimized positions (constraints satisfied).

        Parameters
        ----------
        tolerance
            Convergence criterion on the root-mean-square force, in kJ/mol/nm.
        max_iterations
            Upper limit on minimizer iterations; 0 means until converged.
        platform
            OpenMM platform or its name; ``None`` uses :func:`~openmm_backmap.platforms.choose_platform`.

        Raises
        ------
        RuntimeError
            If the energy before or after minimization is not finite.
        """
        context = openmm.Context(
            self.system, openmm.VerletIntegrator(0.001), choose_platform(self.system, platform)
        )
        context.setPositions(self.positions)
        _check_finite_energy(context, f"{self.name} before minimization")
        openmm.LocalEnergyMinimizer.minimize(context, tolerance, max_iterations)
        _check_finite_energy(context, f"{self.name} after minimization")
        positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return dataclasses.replace(self, positions=unit.Quantity(np.array(positions), unit.nanometer))


def _check_finite_energy(context: openmm.Context, what: str) -> None:
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    if not np.isfinite(energy):
        raise RuntimeError(f"potential energy of {what} is not finite ({energy}); the structure has overlapping atoms")


@contextlib.contextmanager
def _seeded_stdlib_random(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` (which OpenMM's Modeller uses) for a block, restoring its state afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _rdkit_seed(seed: int, attempt: int = 0, attempts_per_seed: int = 1000) -> int:
    """RDKit random seed for a user seed >= 0 and a retry number (RDKit treats seeds 0 and 1 alike)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return 1 + int(seed) * attempts_per_seed + attempt


def _constraints_name(constraints: Any) -> str | None:
    return None if constraints is None else str(constraints)


# ---------------------------------------------------------------------------------------------------
# Peptides
# ---------------------------------------------------------------------------------------------------


def alanine_dipeptide(
    solvent: str = "vacuum",
    *,
    constraints: Any = app.HBonds,
    padding_nm: float = 1.0,
    cutoff_nm: float = 1.0,
    seed: int = 0,
) -> TestSystem:
    """Alanine dipeptide (ACE-ALA-NME, 22 atoms) with Amber ff14SB, in an extended (β) conformation.

    Parameters
    ----------
    solvent
        ``"vacuum"``, ``"obc2"`` or ``"gbn2"`` (implicit solvent; no cutoff), or ``"tip3p"`` (cubic
        water box, PME).
    constraints
        OpenMM constraints (``app.HBonds``, ``app.AllBonds``, ``None``, ...).
    padding_nm
        For ``"tip3p"``: distance between the solute's bounding sphere and each face of the cubic
        water box, in nm (periodic images of the solute stay at least twice this apart).
    cutoff_nm
        Nonbonded cutoff for ``"tip3p"``, in nm.
    seed
        Seed of the conformer embedding and of the ion placement.
    """
    built = peptide(
        "A", caps=True, solvent=solvent, constraints=constraints, padding_nm=padding_nm, cutoff_nm=cutoff_nm, seed=seed
    )
    return dataclasses.replace(built, name=f"alanine_dipeptide_{solvent}")


def chignolin(solvent: str = "obc2", **kwargs: Any) -> TestSystem:
    """Chignolin (GYDPETGTWG, charged termini) with Amber ff14SB, as an extended chain.

    Parameters
    ----------
    solvent
        See :func:`peptide`; implicit OBC2 solvent by default.
    **kwargs
        Further keyword arguments of :func:`peptide`.
    """
    built = peptide("GYDPETGTWG", solvent=solvent, **kwargs)
    return dataclasses.replace(built, name=f"chignolin_{solvent}")


def peptide(
    sequence: str,
    *,
    caps: bool = False,
    solvent: str = "obc2",
    constraints: Any = app.HBonds,
    padding_nm: float = 1.0,
    cutoff_nm: float = 1.0,
    phi_deg: float = -150.0,
    psi_deg: float = 150.0,
    seed: int = 0,
) -> TestSystem:
    """A linear peptide with Amber ff14SB, built as an extended chain from its one-letter sequence.

    Heavy atoms are embedded by RDKit (ETKDG, L-amino acids), every backbone φ/ψ is then set to
    ``phi_deg``/``psi_deg`` (proline φ stays at its ring value) and every ω to 180°.  Hydrogens are
    added by OpenMM's :class:`~openmm.app.Modeller` at pH 7, and every bond is then brought to its
    force-field equilibrium length (CCMA, least displacement).  Atom names follow the PDB convention
    that ``Modeller`` writes (e.g. NME's methyl carbon is ``C``).

    Parameters
    ----------
    sequence
        One-letter codes of the 20 standard amino acids, N- to C-terminus.
    caps
        Add ACE/NME caps; otherwise the termini are charged (NH3+, COO-).
    solvent
        ``"vacuum"``, ``"obc2"``, ``"gbn2"`` (no cutoff) or ``"tip3p"`` (PME, cubic box, neutralized
        with Na+/Cl-).
    constraints
        OpenMM constraints (``app.HBonds``, ``app.AllBonds``, ``None``, ...).
    padding_nm
        For ``"tip3p"``: distance between the solute's bounding sphere and each face of the cubic
        water box, in nm (periodic images of the solute stay at least twice this apart).
    cutoff_nm
        Nonbonded cutoff for ``"tip3p"``, in nm.
    phi_deg, psi_deg
        Backbone dihedrals of the built chain, in degrees.
    seed
        Seed of the conformer embedding and of the ion placement.
    """
    sequence = _check_sequence(sequence)
    if solvent not in _PEPTIDE_FORCEFIELDS:
        raise ValueError(f"unknown solvent {solvent!r}; choose one of {', '.join(PEPTIDE_SOLVENTS)}")
    _check_positive(padding_nm=padding_nm, cutoff_nm=cutoff_nm)
    files = _PEPTIDE_FORCEFIELDS[solvent]
    forcefield = _forcefield(*files)

    topology, positions = _peptide_heavy_atoms(sequence, caps, phi_deg, psi_deg, seed)
    modeller = app.Modeller(topology, positions * unit.nanometer)
    with _seeded_stdlib_random(seed):
        # Reference platform: addHydrogens minimizes the new hydrogens, and the multi-threaded CPU platform sums in
        # a varying order, which made the structure (and every trajectory from it) differ between processes.
        modeller.addHydrogens(forcefield, pH=7.0, platform=openmm.Platform.getPlatformByName("Reference"))
    positions = _ideal_bond_lengths(modeller.topology, _modeller_positions(modeller))
    modeller = app.Modeller(modeller.topology, positions * unit.nanometer)

    metadata: dict[str, Any] = {
        "sequence": sequence,
        "caps": caps,
        "forcefield": list(files),
        "solvent": solvent,
        "constraints": _constraints_name(constraints),
        "phi_deg": phi_deg,
        "psi_deg": psi_deg,
        "seed": seed,
    }
    if solvent == "tip3p":
        edge = _solvent_box_edge(positions, padding_nm, cutoff_nm)
        with _seeded_stdlib_random(seed):
            modeller.addSolvent(forcefield, model="tip3p", boxSize=openmm.Vec3(edge, edge, edge) * unit.nanometer)
        system = forcefield.createSystem(
            modeller.topology,
            nonbondedMethod=app.PME,
            nonbondedCutoff=cutoff_nm * unit.nanometer,
            constraints=constraints,
        )
        resnames = [res.name for res in modeller.topology.residues()]
        metadata.update(nonbonded_method="PME", cutoff_nm=cutoff_nm, box_nm=[edge] * 3, padding_nm=padding_nm,
                        n_waters=resnames.count("HOH"), n_ions={ion: resnames.count(ion) for ion in ("NA", "CL")})
    else:
        system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=constraints)
        metadata.update(nonbonded_method="NoCutoff", cutoff_nm=None)
        if solvent == "obc2":
            _use_native_obc2(system)
            metadata["gb_force"] = "GBSAOBCForce"
    metadata["n_atoms"] = system.getNumParticles()
    return TestSystem(
        name=f"peptide_{sequence}_{solvent}",
        topology=modeller.topology,
        system=system,
        positions=unit.Quantity(_modeller_positions(modeller), unit.nanometer),
        metadata=metadata,
    )


#: Radius offset (nm) of the OBC model, as in OpenMM's GBSAOBCForce and Amber igb=5.
_OBC_OFFSET = 0.009


def _use_native_obc2(system: openmm.System) -> None:
    """Replace the CustomGBForce of ``implicit/obc2.xml`` by the equivalent native GBSAOBCForce.

    OpenMM's ``implicit/obc2.xml`` builds Amber's igb=5 (OBC2, mbondi2 radii, ACE surface term) as a
    CustomGBForce with per-particle parameters (charge, radius - 0.009 nm, scale * (radius - 0.009 nm)).
    GBSAOBCForce implements the same functional form (alpha, beta, gamma = 1, 0.8, 4.85; ACE with
    2.25936 kJ/mol/nm^2 and a 0.14 nm probe; dielectrics 1 and 78.5).  Energies agree to ~1e-7 relative (the
    custom expression hard-codes 138.935485 as the Coulomb constant, the native force uses OpenMM's
    138.9354576), and it runs ~70x faster on the Reference platform (alanine dipeptide: ~39 000 vs ~560 steps/s).
    """
    index = next(i for i, f in enumerate(system.getForces()) if isinstance(f, openmm.CustomGBForce))
    custom = system.getForce(index)
    native = openmm.GBSAOBCForce()
    native.setNonbondedMethod(openmm.GBSAOBCForce.NoCutoff)
    native.setSoluteDielectric(1.0)
    native.setSolventDielectric(78.5)
    for i in range(custom.getNumParticles()):
        charge, offset_radius, scaled_radius = custom.getParticleParameters(i)
        native.addParticle(charge, offset_radius + _OBC_OFFSET, scaled_radius / offset_radius)
    native.setForceGroup(custom.getForceGroup())
    system.removeForce(index)
    system.addForce(native)


def _solvent_box_edge(positions: np.ndarray, padding_nm: float, cutoff_nm: float) -> float:
    """Edge (nm) of a cubic box leaving ``padding_nm`` between the solute's bounding sphere and each face."""
    centre = 0.5 * (positions.min(axis=0) + positions.max(axis=0))
    edge = 2 * (np.linalg.norm(positions - centre, axis=1).max() + padding_nm)
    if edge < 2 * cutoff_nm:
        raise ValueError(f"a {edge:.3f} nm box is less than twice the cutoff ({cutoff_nm} nm); increase padding_nm")
    return float(edge)


def _check_sequence(sequence: str) -> str:
    if not isinstance(sequence, str) or not sequence:
        raise ValueError("sequence must be a non-empty string of one-letter amino-acid codes")
    bad = sorted(set(sequence.upper()) - _AMINO_ACIDS)
    if bad:
        raise ValueError(
            f"invalid one-letter code(s) {', '.join(map(repr, bad))} in sequence {sequence!r}; "
            f"valid codes: {''.join(sorted(_AMINO_ACIDS))}"
        )
    return sequence.upper()


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive; got {value}")


@functools.lru_cache(maxsize=None)
def _forcefield(*files: str) -> app.ForceField:
    return app.ForceField(*files)


def _modeller_positions(modeller: app.Modeller) -> np.ndarray:
    return np.array(modeller.getPositions().value_in_unit(unit.nanometer), dtype=np.float64)


def _pdb_info(name: str, resname: str, resnum: int) -> Chem.AtomPDBResidueInfo:
    info = Chem.AtomPDBResidueInfo()
    info.SetName(f" {name:<3}" if len(name) < 4 else name)
    info.SetResidueName(resname)
    info.SetResidueNumber(resnum)
    return info


def _residue_index(mol: Chem.Mol) -> tuple[dict[tuple[int, str], int], dict[int, str]]:
    """Map (residue number, atom name) to atom index, and residue number to residue name (atoms with PDB info)."""
    index, resnames = {}, {}
    for atom in mol.GetAtoms():
        info = atom.GetPDBResidueInfo()
        if info is not None:
            index[(info.GetResidueNumber(), info.GetName().strip())] = atom.GetIdx()
            resnames[info.GetResidueNumber()] = info.GetResidueName()
    return index, resnames


def _add_caps(mol: Chem.Mol) -> Chem.Mol:
    """Replace the charged termini of ``mol`` (from ``Chem.MolFromSequence``) by ACE and NME caps.

    The NME methyl carbon is named ``C`` as in OpenMM's ``hydrogens.xml`` (the PDB convention).
    """
    rw = Chem.RWMol(mol)
    atoms, resnames = _residue_index(rw)
    last = max(resnames)

    def add(symbol: str, name: str, resname: str, resnum: int) -> int:
        atom = Chem.Atom(symbol)
        atom.SetMonomerInfo(_pdb_info(name, resname, resnum))
        return rw.AddAtom(atom)

    ch3, c, o = add("C", "CH3", "ACE", 0), add("C", "C", "ACE", 0), add("O", "O", "ACE", 0)
    rw.AddBond(ch3, c, Chem.BondType.SINGLE)
    rw.AddBond(c, o, Chem.BondType.DOUBLE)
    rw.AddBond(c, atoms[(1, "N")], Chem.BondType.SINGLE)
    n, cm = add("N", "N", "NME", last + 1), add("C", "C", "NME", last + 1)
    rw.AddBond(atoms[(last, "C")], n, Chem.BondType.SINGLE)
    rw.AddBond(n, cm, Chem.BondType.SINGLE)
    rw.RemoveAtom(atoms[(last, "OXT")])
    mol = rw.GetMol()
    Chem.SanitizeMol(mol)
    return mol


def _backbone_dihedrals(mol: Chem.Mol, phi: float, psi: float) -> list[tuple[tuple[int, int, int, int], float]]:
    """(atom quadruple, value in degrees) of every φ, ψ and ω of the chain that can be set."""
    index, resnames = _residue_index(mol)
    # Carbon bonded to the amide N (CA, or the NME methyl) and to the carbonyl C (CA, or the ACE methyl).
    n_side = {r: index.get((r, "CA"), index.get((r, "C"))) for r in resnames}
    c_side = {r: index.get((r, "CA"), index.get((r, "CH3"))) for r in resnames}
    dihedrals = []
    for r in sorted(resnames):
        if (r + 1, "N") not in index:
            continue
        c, n_next = index[(r, "C")], index[(r + 1, "N")]
        dihedrals.append(((c_side[r], c, n_next, n_side[r + 1]), 180.0))  # omega
        if (r, "N") in index:
            dihedrals.append(((index[(r, "N")], index[(r, "CA")], c, n_next), psi))
        if (r + 1, "CA") in index and resnames[r + 1] != "PRO":
            dihedrals.append(((c, n_next, index[(r + 1, "CA")], index[(r + 1, "C")]), phi))
    return dihedrals


def _peptide_heavy_atoms(
    sequence: str, caps: bool, phi: float, psi: float, seed: int, attempts: int = 20
) -> tuple[app.Topology, np.ndarray]:
    """Heavy-atom topology and positions (nm) of an extended chain, free of clashes."""
    mol = Chem.MolFromSequence(sequence)
    if caps:
        mol = _add_caps(mol)
    mol = Chem.AddHs(mol, addCoords=False)
    heavy = [a.GetIdx() for a in mol.GetAtoms() if a.GetAtomicNum() > 1]
    topological = Chem.GetDistanceMatrix(mol)[np.ix_(heavy, heavy)]
    dihedrals = _backbone_dihedrals(mol, phi, psi)
    params = AllChem.ETKDGv3()
    for attempt in range(attempts):
        params.randomSeed = _rdkit_seed(seed, attempt)
        if AllChem.EmbedMolecule(mol, params) != 0:
            continue
        AllChem.MMFFOptimizeMolecule(mol, maxIters=5000)  # ETKDG alone leaves proline rings strained
        conf = mol.GetConformer()
        for (i, j, k, l), value in dihedrals:
            rdMolTransforms.SetDihedralDeg(conf, i, j, k, l, value)
        xyz = conf.GetPositions()[heavy] / 10.0
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
        if d[topological >= 4].min(initial=np.inf) >= _PEPTIDE_CLASH_NM:
            break
    else:
        raise RuntimeError(f"could not build a clash-free extended chain for {sequence!r} in {attempts} attempts")

    order = sorted(heavy, key=lambda i: (mol.GetAtomWithIdx(i).GetPDBResidueInfo().GetResidueNumber(), i))
    topology = app.Topology()
    chain = topology.addChain()
    residues: dict[int, app.Residue] = {}
    atoms: dict[int, app.Atom] = {}
    for i in order:
        info = mol.GetAtomWithIdx(i).GetPDBResidueInfo()
        resnum = info.GetResidueNumber()
        if resnum not in residues:
            residues[resnum] = topology.addResidue(info.GetResidueName(), chain, id=str(resnum))
        element = app.Element.getByAtomicNumber(mol.GetAtomWithIdx(i).GetAtomicNum())
        atoms[i] = topology.addAtom(info.GetName().strip(), element, residues[resnum])
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        if i in atoms and j in atoms:
            topology.addBond(atoms[i], atoms[j])
    return topology, conf.GetPositions()[order] / 10.0


def _ideal_bond_lengths(topology: app.Topology, positions: np.ndarray) -> np.ndarray:
    """Put every bond at its Amber ff14SB equilibrium length with the least mass-weighted displacement (nm).

    RDKit builds carboxylates in their neutral acid form (C–OH about 0.136 nm) and Modeller puts
    hydrogens at 0.1 nm; constraining all bonds with CCMA corrects both while barely moving torsions.
    """
    forcefield = _forcefield("amber14-all.xml")
    system = forcefield.createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=app.AllBonds)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    context.applyConstraints(1e-10)
    return context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


# ---------------------------------------------------------------------------------------------------
# Neat liquids
# ---------------------------------------------------------------------------------------------------


def liquid(
    resname: str,
    n_molecules: int = 300,
    *,
    density_g_cm3: float | None = None,
    seed: int = 0,
    cutoff_nm: float = 1.0,
    switch_nm: float | None = 0.9,
    dispersion_correction: bool = True,
    constraints: Any = app.HBonds,
    tolerance_nm: float = 0.2,
) -> TestSystem:
    """A cubic periodic box of a neat CGenFF liquid from OpenMM's ``charmm36.xml``.

    One rigid conformer (the lowest-energy of a few RDKit ETKDG conformers after minimization with
    the force field) is packed at random positions and orientations, and overlaps are then removed
    until no two atoms of different molecules are closer than ``tolerance_nm`` (as packmol does).
    Electrostatics use PME; Lennard-Jones is cut off at ``cutoff_nm`` with OpenMM's potential switch
    from ``switch_nm`` and, by default, the long-range dispersion correction (which ``charmm36.xml``
    switches off, following the CHARMM lipid convention; neat-liquid densities need it).

    Parameters
    ----------
    resname
        Residue name of a standalone, neutral molecule in ``charmm36.xml`` (e.g. ``"BENZ"``).
    n_molecules
        Number of molecules.
    density_g_cm3
        Target density in g/cm³; defaults to the experimental value in :data:`LIQUID_DENSITIES`.
    seed
        Seed of the conformer embedding and of the packing.
    cutoff_nm, switch_nm
        Lennard-Jones and real-space cutoff, and start of the switching function (``None``: no
        switch), in nm.  The box edge must be at least twice the cutoff.
    dispersion_correction
        Apply the isotropic long-range dispersion correction.
    constraints
        OpenMM constraints (``app.HBonds`` by default).
    tolerance_nm
        Minimum distance between atoms of different molecules in the packed box, in nm.
    """
    names, elements, bonds, charge = _liquid_template(resname)
    if isinstance(n_molecules, bool) or not isinstance(n_molecules, (int, np.integer)) or n_molecules < 1:
        raise ValueError(f"n_molecules must be an integer >= 1; got {n_molecules!r}")
    if density_g_cm3 is None:
        if resname not in LIQUID_DENSITIES:
            raise ValueError(
                f"no tabulated density for {resname!r} (known: {', '.join(LIQUID_DENSITIES)}); pass density_g_cm3"
            )
        density_g_cm3 = LIQUID_DENSITIES[resname]
    _check_positive(density_g_cm3=density_g_cm3, cutoff_nm=cutoff_nm, tolerance_nm=tolerance_nm)
    if switch_nm is not None and not 0 < switch_nm < cutoff_nm:
        raise ValueError(f"switch_nm must lie between 0 and cutoff_nm={cutoff_nm}; got {switch_nm}")
    if abs(charge) > 1e-6:
        raise ValueError(
            f"residue {resname!r} carries a net charge of {charge:+.3g} e; a neat liquid needs a neutral molecule"
        )

    molar_mass = sum(e.mass.value_in_unit(unit.dalton) for e in elements)  # g/mol
    box = (n_molecules * molar_mass / (_AVOGADRO * density_g_cm3) * 1e21) ** (1.0 / 3.0)  # nm
    if box < 2 * cutoff_nm:
        raise ValueError(
            f"a box of {n_molecules} {resname} at {density_g_cm3} g/cm3 is {box:.3f} nm wide, less than twice the "
            f"cutoff ({cutoff_nm} nm); use more molecules or a shorter cutoff"
        )
    conformer = _liquid_conformer(resname, seed)
    positions = _pack_box(conformer, n_molecules, box, np.random.default_rng(seed), tolerance_nm)

    topology = app.Topology()
    chain = topology.addChain()
    for m in range(n_molecules):
        residue = topology.addResidue(resname, chain, id=str(m + 1))
        atoms = [topology.addAtom(name, element, residue) for name, element in zip(names, elements)]
        for i, j in bonds:
            topology.addBond(atoms[i], atoms[j])
    topology.setPeriodicBoxVectors(np.eye(3) * box * unit.nanometer)
    system = _forcefield(_LIQUID_FORCEFIELD).createSystem(
        topology,
        nonbondedMethod=app.PME,
        nonbondedCutoff=cutoff_nm * unit.nanometer,
        switchDistance=None if switch_nm is None else switch_nm * unit.nanometer,
        constraints=constraints,
    )
    lj_in_nonbonded = _move_lennard_jones_to_nonbonded(system)
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setUseDispersionCorrection(dispersion_correction)
        elif isinstance(force, openmm.CustomNonbondedForce):
            force.setUseLongRangeCorrection(dispersion_correction)
    metadata = {
        "resname": resname,
        "n_molecules": n_molecules,
        "atoms_per_molecule": len(names),
        "molar_mass_g_mol": molar_mass,
        "density_g_cm3": density_g_cm3,
        "box_nm": [box, box, box],
        "forcefield": [_LIQUID_FORCEFIELD],
        "solvent": "neat",
        "nonbonded_method": "PME",
        "cutoff_nm": cutoff_nm,
        "switch_nm": switch_nm,
        "dispersion_correction": dispersion_correction,
        "lennard_jones_force": "NonbondedForce" if lj_in_nonbonded else "CustomNonbondedForce",
        "constraints": _constraints_name(constraints),
        "tolerance_nm": tolerance_nm,
        "seed": seed,
        "n_atoms": system.getNumParticles(),
    }
    return TestSystem(
        name=f"liquid_{resname}_{n_molecules}",
        topology=topology,
        system=system,
        positions=unit.Quantity(positions, unit.nanometer),
        metadata=metadata,
    )


def _move_lennard_jones_to_nonbonded(system: openmm.System) -> bool:
    """Move CHARMM's tabulated Lennard-Jones force into the NonbondedForce when no NBFIX applies.

    ``charmm36.xml`` builds Lennard-Jones as a CustomNonbondedForce with A/B tables per type pair so
    that NBFIX pairs can be expressed; that force is ~30x slower on the CPU platform than the
    NonbondedForce.  When every table entry follows the Lorentz–Berthelot rules, the per-type σ, ε are
    recovered from the diagonal and put into the NonbondedForce, whose exceptions already cover the
    same excluded pairs (with ε = 0; the 1-4 Lennard-Jones terms stay in their CustomBondForce).
    The energy is unchanged.  Returns whether the move was made.
    """
    forces = system.getForces()
    custom = [i for i, f in enumerate(forces) if isinstance(f, openmm.CustomNonbondedForce)]
    nonbonded = [f for f in forces if isinstance(f, openmm.NonbondedForce)]
    if len(custom) != 1 or len(nonbonded) != 1:
        return False
    lj, nonbonded = forces[custom[0]], nonbonded[0]
    tables = {}
    for k in range(lj.getNumTabulatedFunctions()):
        n_types, _, values = lj.getTabulatedFunction(k).getFunctionParameters()
        tables[lj.getTabulatedFunctionName(k)] = np.reshape(values, (n_types, n_types))
    a, b = tables["acoef"], tables["bcoef"]
    diag_a, diag_b = np.diag(a), np.diag(b)
    has_lj = diag_b > 0
    sigma = np.where(has_lj, (diag_a / np.where(has_lj, diag_b, 1.0)) ** (1 / 6), 1.0)
    epsilon = np.where(has_lj, diag_b**2 / (4 * np.where(has_lj, diag_a, 1.0)), 0.0)
    pair_sigma6 = (0.5 * (sigma[:, None] + sigma[None, :])) ** 6
    pair_epsilon = np.sqrt(epsilon[:, None] * epsilon[None, :])
    if not (np.allclose(4 * pair_epsilon * pair_sigma6**2, a, rtol=1e-8, atol=0)
            and np.allclose(4 * pair_epsilon * pair_sigma6, b, rtol=1e-8, atol=0)):
        return False  # NBFIX pairs: keep the tabulated force
    for i in range(system.getNumParticles()):
        charge, _, _ = nonbonded.getParticleParameters(i)
        t = int(lj.getParticleParameters(i)[0])
        nonbonded.setParticleParameters(i, charge, sigma[t], epsilon[t])
    nonbonded.setUseSwitchingFunction(lj.getUseSwitchingFunction())
    nonbonded.setSwitchingDistance(lj.getSwitchingDistance())
    system.removeForce(custom[0])
    return True


def _liquid_template(resname: str) -> tuple[list[str], list[app.Element], list[tuple[int, int]], float]:
    """Atom names, elements, bonds and net charge (e) of a standalone residue of ``charmm36.xml``."""
    templates = _forcefield(_LIQUID_FORCEFIELD)._templates
    template = templates.get(resname)
    if template is None:
        raise ValueError(
            f"residue {resname!r} is not in OpenMM's {_LIQUID_FORCEFIELD}; CGenFF examples: BENZ, CUME, HEXA, TOLU"
        )
    if template.externalBonds or any(a.element is None for a in template.atoms) or template.virtualSites:
        raise ValueError(f"residue {resname!r} of {_LIQUID_FORCEFIELD} is not a standalone molecule")
    charge = sum(a.parameters.get("charge", 0.0) for a in template.atoms)
    return [a.name for a in template.atoms], [a.element for a in template.atoms], list(template.bonds), charge


@functools.lru_cache(maxsize=None)
def _liquid_conformer(resname: str, seed: int, n_conformers: int = 10) -> np.ndarray:
    """Lowest-energy conformer (nm, centred on its centroid) of a ``charmm36.xml`` residue.

    RDKit embeds ``n_conformers`` ETKDG conformers from the template's graph (bond orders assigned
    from valences); each is minimized with the force field in vacuum.
    """
    names, elements, bonds, _ = _liquid_template(resname)
    rw = Chem.RWMol()
    for element in elements:
        atom = Chem.Atom(element.atomic_number)
        atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    for i, j in bonds:
        rw.AddBond(i, j, Chem.BondType.SINGLE)
    rdDetermineBonds.DetermineBondOrders(rw, charge=0, embedChiral=False)
    mol = rw.GetMol()
    Chem.SanitizeMol(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = _rdkit_seed(seed)
    conformer_ids = list(AllChem.EmbedMultipleConfs(mol, n_conformers, params))
    if not conformer_ids:
        raise RuntimeError(f"RDKit could not embed a 3D conformer of {resname!r}")

    topology = app.Topology()
    residue = topology.addResidue(resname, topology.addChain())
    atoms = [topology.addAtom(name, element, residue) for name, element in zip(names, elements)]
    for i, j in bonds:
        topology.addBond(atoms[i], atoms[j])
    system = _forcefield(_LIQUID_FORCEFIELD).createSystem(topology, nonbondedMethod=app.NoCutoff, constraints=None)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    best, best_energy = None, np.inf
    for cid in conformer_ids:
        context.setPositions(mol.GetConformer(cid).GetPositions() / 10.0)
        openmm.LocalEnergyMinimizer.minimize(context, 0.1, 0)
        state = context.getState(getEnergy=True, getPositions=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        if energy < best_energy - 1e-6:
            best_energy = energy
            best = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    best = np.array(best, dtype=np.float64) - np.mean(best, axis=0)
    best.setflags(write=False)  # cached: shared between calls
    return best


def _rotation_jacobian(w: np.ndarray) -> np.ndarray:
    """Left Jacobians of SO(3) for rotation vectors ``w`` (n, 3): d(angular displacement)/dw, shape (n, 3, 3)."""
    theta = np.linalg.norm(w, axis=1)
    small = theta < 1e-8
    t = np.where(small, 1.0, theta)
    a = np.where(small, 0.5, (1 - np.cos(t)) / t**2)
    b = np.where(small, 1.0 / 6.0, (t - np.sin(t)) / t**3)
    k = np.zeros((len(w), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    k -= k.transpose(0, 2, 1)
    return np.eye(3) + a[:, None, None] * k + b[:, None, None] * (k @ k)


def _intermolecular_pairs(xyz: np.ndarray, box: float, cutoff: float, molecule: np.ndarray) -> np.ndarray:
    """Atom pairs (i, j) of different molecules within ``cutoff`` under minimum-image PBC."""
    wrapped = xyz - box * np.floor(xyz / box)
    wrapped[wrapped >= box] = 0.0
    pairs = cKDTree(wrapped, boxsize=box).query_pairs(cutoff, output_type="ndarray")
    return pairs[molecule[pairs[:, 0]] != molecule[pairs[:, 1]]]


def _pack_box(
    conformer: np.ndarray,
    n_molecules: int,
    box: float,
    rng: np.random.Generator,
    tolerance: float,
    max_rounds: int = 20,
) -> np.ndarray:
    """Pack rigid copies of ``conformer`` (nm) into a cubic box of edge ``box`` (nm) without overlaps.

    Molecules start on a jittered cubic lattice with random orientations.  Rigid-body translations
    and rotation vectors are then optimized (L-BFGS, exact gradients) against the overlap penalty
    sum((r0 - d)²) over intermolecular atom pairs closer than r0 = 1.1 × ``tolerance``, under
    minimum-image PBC, until the minimum intermolecular distance reaches ``tolerance``.
    """
    n_atoms = len(conformer)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    spacing = box / per_side
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = sites[rng.permutation(len(sites))[:n_molecules]]
    centres = (sites + 0.5 + rng.uniform(-0.1, 0.1, size=(n_molecules, 3))) * spacing
    body = np.einsum("mij,aj->mai", Rotation.random(n_molecules, random_state=rng).as_matrix(), conformer)
    molecule = np.repeat(np.arange(n_molecules), n_atoms)
    r0 = _PACK_MARGIN * tolerance

    def positions(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, w = x[: 3 * n_molecules].reshape(-1, 3), x[3 * n_molecules:].reshape(-1, 3)
        rotated = np.einsum("mij,maj->mai", Rotation.from_rotvec(w).as_matrix(), body)
        return rotated, (rotated + t[:, None, :]).reshape(-1, 3)

    def penalty(x: np.ndarray) -> tuple[float, np.ndarray]:
        rotated, xyz = positions(x)
        pairs = _intermolecular_pairs(xyz, box, r0, molecule)
        d = xyz[pairs[:, 0]] - xyz[pairs[:, 1]]
        d -= box * np.round(d / box)
        r = np.linalg.norm(d, axis=1)
        overlap = np.clip(r0 - r, 0.0, None)
        g_pair = (-2.0 * overlap / np.maximum(r, 1e-12))[:, None] * d
        g_atom = np.zeros_like(xyz)
        np.add.at(g_atom, pairs[:, 0], g_pair)
        np.add.at(g_atom, pairs[:, 1], -g_pair)
        g_atom = g_atom.reshape(n_molecules, n_atoms, 3)
        torque = np.cross(rotated, g_atom).sum(axis=1)
        w = x[3 * n_molecules:].reshape(-1, 3)
        g_w = np.einsum("mji,mj->mi", _rotation_jacobian(w), torque)
        return float(overlap @ overlap), np.concatenate([g_atom.sum(axis=1).ravel(), g_w.ravel()])

    x = np.concatenate([centres.ravel(), np.zeros(3 * n_molecules)])
    for _ in range(max_rounds):
        x = minimize(penalty, x, jac=True, method="L-BFGS-B", options={"maxiter": 1000}).x
        if len(_intermolecular_pairs(positions(x)[1], box, tolerance, molecule)) == 0:
            break
    else:
        raise RuntimeError(
            f"could not pack {n_molecules} molecules into a {box:.3f} nm box with all intermolecular distances "
            f">= {tolerance} nm; lower the density or the tolerance"
        )
    centres = x[: 3 * n_molecules].reshape(-1, 3)
    shift = -box * np.floor(centres / box)  # put every molecule's centre inside the box
    return (positions(x)[0] + (centres + shift)[:, None, :]).reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------
# Periodic boxes
# ---------------------------------------------------------------------------------------------------


def replicate(
    topology: app.Topology,
    positions_nm: Any,
    box_vectors_nm: Any,
    repeats: int | tuple[int, int, int] = (2, 2, 2),
) -> tuple[app.Topology, np.ndarray, np.ndarray]:
    """Tile a periodic box ``repeats`` times along its box vectors (a supercell).

    Copy ``n = (i * ny + j) * nz + k`` (``0 <= i < nx`` etc.) is the input shifted by ``i a + j b + k c``;
    copy 0 is the input itself.  The topology is copied in the same copy-major order: for every copy, all
    chains with their residues, atoms and bonds (atom ``m`` of copy ``n`` has index ``n * n_atoms + m``).
    Chain and residue ids and names are kept, so each copy's chains repeat the input's ids.  The
    interactions of the tiled box equal those of the input box replicated exactly when every interaction
    range is at most half the smallest box height of the input (the minimum-image convention).

    Parameters
    ----------
    topology
        The periodic topology to tile.
    positions_nm
        ``(n_atoms, 3)`` positions in nm (array or Quantity); molecules need not be whole.
    box_vectors_nm
        ``(3, 3)`` box vectors in nm (rows a, b, c; array, Quantity or OpenMM's tuple of ``Vec3``), in
        OpenMM's reduced form (orthorhombic or triclinic).
    repeats
        Copies along a, b and c, ``(nx, ny, nz)``; one integer for the same number along all three.

    Returns
    -------
    topology : openmm.app.Topology
        The tiled topology, with the new box vectors set.
    positions : numpy.ndarray
        ``(n_atoms * nx * ny * nz, 3)`` float64 positions in nm.
    box : numpy.ndarray
        ``(3, 3)`` box vectors ``nx a, ny b, nz c`` in nm, brought back to OpenMM's reduced form for triclinic
        boxes (the same lattice).

    Examples
    --------
    >>> liq = liquid("BENZ", 300)                                         # doctest: +SKIP
    >>> top, xyz, box = replicate(liq.topology, liq.positions, liq.topology.getPeriodicBoxVectors())  # doctest: +SKIP
    """
    counts = (repeats,) * 3 if isinstance(repeats, (int, np.integer)) and not isinstance(repeats, bool) else repeats
    try:
        counts = tuple(counts)
    except TypeError:
        raise ValueError(f"repeats must be an integer or three integers; got {repeats!r}") from None
    if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in counts):
        raise ValueError(f"repeats must be an integer >= 1 or three of them; got {repeats!r}")
    counts = tuple(int(c) for c in counts)
    n_atoms = topology.getNumAtoms()
    xyz = as_coordinates(positions_nm, n_atoms, allow_batch=False)
    box = as_box_vectors(box_vectors_nm, allow_batch=False)
    if not (box[0, 1] == box[0, 2] == box[1, 2] == 0.0 and (np.diag(box) > 0).all()):
        raise ValueError("box_vectors_nm must be in OpenMM's reduced form: a = (ax, 0, 0), b = (bx, by, 0), "
                         f"c = (cx, cy, cz) with ax, by, cz > 0; got {box.tolist()}")

    shifts = np.array([[i, j, k] for i in range(counts[0]) for j in range(counts[1]) for k in range(counts[2])],
                      dtype=np.float64) @ box
    positions = (xyz[None, :, :] + shifts[:, None, :]).reshape(-1, 3)

    new_box = box * np.array(counts, dtype=np.float64)[:, None]
    # back to the reduced form (|c_y| <= b_y / 2, |c_x|, |b_x| <= a_x / 2): the same lattice
    new_box[2] -= np.round(new_box[2, 1] / new_box[1, 1]) * new_box[1]
    new_box[2] -= np.round(new_box[2, 0] / new_box[0, 0]) * new_box[0]
    new_box[1] -= np.round(new_box[1, 0] / new_box[0, 0]) * new_box[0]

    tiled = app.Topology()
    atoms = sorted(topology.atoms(), key=lambda atom: atom.index)
    bonds = [(bond[0].index, bond[1].index, bond.type, bond.order) for bond in topology.bonds()]
    for _ in range(len(shifts)):
        residues = {}
        for chain in topology.chains():
            new_chain = tiled.addChain(id=chain.id)
            for residue in chain.residues():
                residues[residue.index] = tiled.addResidue(residue.name, new_chain, id=residue.id,
                                                           insertionCode=residue.insertionCode)
        # atoms in index order, so that atom m of every copy has index n * n_atoms + m
        added = [tiled.addAtom(atom.name, atom.element, residues[atom.residue.index], id=atom.id,
                               formalCharge=atom.formalCharge) for atom in atoms]
        for i, j, kind, order in bonds:
            tiled.addBond(added[i], added[j], type=kind, order=order)
    tiled.setPeriodicBoxVectors(new_box * unit.nanometer)
    return tiled, positions, new_box
