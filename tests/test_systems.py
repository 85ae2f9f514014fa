"""Tests of the built-in test systems against OpenMM's force fields and analytic facts."""
from __future__ import annotations

import functools
import json

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_backmap import systems
from openmm_backmap.platforms import choose_platform

N_LIQUID = 100  # smallest round count whose box (>= 2.4 nm) fits the default 1.0 nm cutoff for all three liquids
CHIGNOLIN = ["GLY", "TYR", "ASP", "PRO", "GLU", "THR", "GLY", "THR", "TRP", "GLY"]
# (builder, argument) of every system that is minimized and simulated
CASES = {
    "adp_vacuum": (systems.alanine_dipeptide, "vacuum"),
    "adp_obc2": (systems.alanine_dipeptide, "obc2"),
    "adp_gbn2": (systems.alanine_dipeptide, "gbn2"),
    "adp_tip3p": (systems.alanine_dipeptide, "tip3p"),
    "chignolin_obc2": (systems.chignolin, "obc2"),
    "benzene": (functools.partial(systems.liquid, n_molecules=N_LIQUID), "BENZ"),
    "cumene": (functools.partial(systems.liquid, n_molecules=N_LIQUID), "CUME"),
    "hexane": (functools.partial(systems.liquid, n_molecules=N_LIQUID), "HEXA"),
}


@functools.lru_cache(maxsize=None)
def build(case: str) -> systems.TestSystem:
    builder, argument = CASES[case]
    return builder(argument)


def dihedral(x: np.ndarray, i: int, j: int, k: int, l: int) -> float:
    """Dihedral angle i-j-k-l in degrees (IUPAC sign convention)."""
    b0, b1, b2 = x[i] - x[j], x[k] - x[j], x[l] - x[k]
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - b0 @ b1 * b1, b2 - b2 @ b1 * b1
    return float(np.degrees(np.arctan2(np.cross(b1, v) @ w, v @ w)))


def angle_difference(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def atom_index(topology: app.Topology) -> list[dict[str, int]]:
    """Per residue, atom name -> atom index."""
    return [{atom.name: atom.index for atom in residue.atoms()} for residue in topology.residues()]


def backbone(ts: systems.TestSystem) -> list[tuple[str, float | None, float | None, float | None]]:
    """(residue name, φ, ψ, ω to the next residue) of every amino acid."""
    x, residues, names = ts.positions_nm, list(ts.topology.residues()), atom_index(ts.topology)
    out = []
    for k, residue in enumerate(residues):
        if "CA" not in names[k]:
            continue
        here, prev, nxt = names[k], names[k - 1] if k else {}, names[k + 1] if k + 1 < len(residues) else {}
        phi = dihedral(x, prev["C"], here["N"], here["CA"], here["C"]) if "C" in prev else None
        psi = dihedral(x, here["N"], here["CA"], here["C"], nxt["N"]) if "N" in nxt else None
        next_carbon = nxt.get("CA", nxt.get("C"))
        omega = dihedral(x, here["CA"], here["C"], nxt["N"], next_carbon) if "N" in nxt else None
        out.append((residue.name, phi, psi, omega))
    return out


def bond_length_errors(ts: systems.TestSystem) -> np.ndarray:
    """Relative deviation of every topology bond from its force-field length (harmonic r0 or constraint)."""
    bonded = {frozenset((a.index, b.index)) for a, b in ts.topology.bonds()}
    reference = {}
    for force in ts.system.getForces():  # CHARMM's Urey-Bradley 1-3 terms are HarmonicBonds too: skip them
        if isinstance(force, openmm.HarmonicBondForce):
            for b in range(force.getNumBonds()):
                i, j, r0, _ = force.getBondParameters(b)
                if frozenset((i, j)) in bonded:
                    reference[frozenset((i, j))] = r0.value_in_unit(unit.nanometer)
    for c in range(ts.system.getNumConstraints()):
        i, j, r0 = ts.system.getConstraintParameters(c)
        reference[frozenset((i, j))] = r0.value_in_unit(unit.nanometer)
    assert bonded <= set(reference), "some topology bonds have no force-field length"
    x = ts.positions_nm
    pairs = np.array([tuple(p) for p in bonded])
    r0 = np.array([reference[frozenset(p)] for p in pairs])
    return np.linalg.norm(x[pairs[:, 0]] - x[pairs[:, 1]], axis=1) / r0 - 1.0


def potential_energy(context: openmm.Context) -> float:
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def total_charge(system: openmm.System) -> float:
    nonbonded = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    return sum(nonbonded.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
               for i in range(system.getNumParticles()))


def min_intermolecular_distance(ts: systems.TestSystem) -> float:
    """Brute-force minimum-image distance between atoms of different residues (nm)."""
    x = ts.positions_nm
    box = np.diag(ts.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    residue = np.array([atom.residue.index for atom in ts.topology.atoms()])
    best = np.inf
    for start in range(0, len(x), 256):
        d = x[start:start + 256, None] - x[None]
        d -= box * np.round(d / box)
        r = np.linalg.norm(d, axis=-1)
        r[residue[start:start + 256, None] == residue[None]] = np.inf
        best = min(best, r.min())
    return float(best)


# ---------------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solvent", systems.PEPTIDE_SOLVENTS)
def test_alanine_dipeptide_composition(solvent):
    ts = build(f"adp_{solvent}")
    residues = [r.name for r in ts.topology.residues()]
    assert residues[:3] == ["ACE", "ALA", "NME"]
    solute = [a for a in ts.topology.atoms() if a.residue.index < 3]
    assert len(solute) == 22
    formula = {e: sum(a.element.symbol == e for a in solute) for e in "CHNO"}
    assert formula == {"C": 6, "H": 12, "N": 2, "O": 2}  # C6H12N2O2
    assert ts.topology.getNumAtoms() == ts.system.getNumParticles() == ts.positions_nm.shape[0]
    assert total_charge(ts.system) == pytest.approx(0.0, abs=1e-6)
    if solvent == "tip3p":
        assert set(residues[3:]) == {"HOH"} and len(residues) - 3 == ts.metadata["n_waters"]
        assert ts.system.getNumParticles() == 22 + 3 * ts.metadata["n_waters"]
        box = ts.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)
        assert np.allclose(np.diag(box), ts.metadata["box_nm"]) and min(ts.metadata["box_nm"]) >= 2 * 1.0
        nonbonded = next(f for f in ts.system.getForces() if isinstance(f, openmm.NonbondedForce))
        assert nonbonded.getNonbondedMethod() == openmm.NonbondedForce.PME
    else:
        assert ts.topology.getPeriodicBoxVectors() is None
        assert not ts.system.usesPeriodicBoundaryConditions()
    gb = [f for f in ts.system.getForces() if isinstance(f, (openmm.GBSAOBCForce, openmm.CustomGBForce))]
    assert bool(gb) == (solvent in ("obc2", "gbn2"))


def test_chignolin_composition_matches_amber14_templates():
    ts = build("chignolin_obc2")
    assert [r.name for r in ts.topology.residues()] == CHIGNOLIN
    templates = app.ForceField("amber14-all.xml")._templates
    names = ["N" + CHIGNOLIN[0]] + CHIGNOLIN[1:-1] + ["C" + CHIGNOLIN[-1]]  # charged-terminus templates
    assert ts.system.getNumParticles() == sum(len(templates[n].atoms) for n in names) == 138
    assert total_charge(ts.system) == pytest.approx(-2.0, abs=1e-6)  # Asp-, Glu-; NH3+ and COO- cancel


def test_peptide_caps_and_termini():
    capped = systems.peptide("GG", caps=True, solvent="vacuum")
    assert [r.name for r in capped.topology.residues()] == ["ACE", "GLY", "GLY", "NME"]
    assert total_charge(capped.system) == pytest.approx(0.0, abs=1e-6)
    charged = systems.peptide("KG", solvent="vacuum")
    assert total_charge(charged.system) == pytest.approx(1.0, abs=1e-6)  # Lys+ at pH 7
    assert "OXT" in atom_index(charged.topology)[-1]


def test_chignolin_tip3p_is_neutralized():
    ts = systems.chignolin("tip3p")
    assert ts.metadata["n_ions"] == {"NA": 2, "CL": 0}
    assert total_charge(ts.system) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("case, atoms_per_molecule", [("benzene", 12), ("cumene", 21), ("hexane", 20)])
def test_liquid_composition(case, atoms_per_molecule):
    ts = build(case)
    resname = CASES[case][1]
    residues = list(ts.topology.residues())
    assert len(residues) == N_LIQUID and {r.name for r in residues} == {resname}
    assert all(len(list(r.atoms())) == atoms_per_molecule for r in residues)
    assert ts.system.getNumParticles() == N_LIQUID * atoms_per_molecule
    template = app.ForceField("charmm36.xml")._templates[resname]
    assert [a.name for a in residues[0].atoms()] == [a.name for a in template.atoms]
    assert ts.topology.getNumBonds() == N_LIQUID * len(template.bonds)
    n_hydrogen_bonds = sum(1 for a, b in ts.topology.bonds() if app.element.hydrogen in (a.element, b.element))
    assert ts.system.getNumConstraints() == n_hydrogen_bonds  # HBonds
    assert total_charge(ts.system) == pytest.approx(0.0, abs=1e-5)
    nonbonded = next(f for f in ts.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert nonbonded.getNonbondedMethod() == openmm.NonbondedForce.PME
    assert nonbonded.getUseDispersionCorrection() and nonbonded.getUseSwitchingFunction()
    assert nonbonded.getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(1.0)
    assert nonbonded.getSwitchingDistance().value_in_unit(unit.nanometer) == pytest.approx(0.9)


def test_metadata_and_unpacking():
    ts = build("adp_vacuum")
    topology, system, positions = ts
    assert topology is ts.topology and system is ts.system and positions is ts.positions
    assert ts.positions_nm.shape == (22, 3) and ts.positions_nm.dtype == np.float64
    for case in ("adp_tip3p", "benzene"):
        meta = json.loads(json.dumps(build(case).metadata))
        assert meta["constraints"] == "HBonds" and meta["nonbonded_method"] == "PME" and meta["cutoff_nm"] == 1.0
    assert build("adp_obc2").metadata["forcefield"] == ["amber14-all.xml", "implicit/obc2.xml"]
    assert build("benzene").metadata["n_molecules"] == N_LIQUID


# ---------------------------------------------------------------------------------------------------
# Chemistry of the built structures (before minimization)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["adp_vacuum", "chignolin_obc2", "benzene", "cumene", "hexane"])
def test_bond_lengths_match_force_field(case):
    errors = bond_length_errors(build(case))
    assert np.abs(errors).max() < 0.03


@pytest.mark.parametrize("case", ["adp_vacuum", "chignolin_obc2"])
def test_l_amino_acid_chirality(case):
    # For L (S) amino acids the improper N-C-CA-CB is about +122 deg (the value used to place a virtual CB
    # from the backbone); D amino acids give about -122 deg.
    ts = build(case)
    x = ts.positions_nm
    values = [dihedral(x, n["N"], n["C"], n["CA"], n["CB"]) for n in atom_index(ts.topology) if "CB" in n]
    assert len(values) == (1 if case.startswith("adp") else 7)
    assert all(100.0 < v < 145.0 for v in values), values


def test_extended_backbone_dihedrals():
    for ts in (build("adp_vacuum"), build("chignolin_obc2")):
        for name, phi, psi, omega in backbone(ts):
            if phi is not None:
                if name == "PRO":
                    assert -90.0 < phi < -50.0  # fixed by the pyrrolidine ring
                else:
                    assert angle_difference(phi, -150.0) < 5.0
            assert psi is None or angle_difference(psi, 150.0) < 5.0
            assert omega is None or angle_difference(omega, 180.0) < 5.0
    ppii = systems.peptide("AAA", caps=True, solvent="vacuum", phi_deg=-75.0, psi_deg=145.0)
    for _, phi, psi, _ in backbone(ppii):
        assert angle_difference(phi, -75.0) < 5.0 and angle_difference(psi, 145.0) < 5.0


def test_peptide_has_no_clashes():
    ts = build("chignolin_obc2")
    x = ts.positions_nm
    n = len(x)
    graph = np.full((n, n), np.inf)
    np.fill_diagonal(graph, 0)
    for a, b in ts.topology.bonds():
        graph[a.index, b.index] = graph[b.index, a.index] = 1
    for k in range(n):  # Floyd-Warshall on 138 atoms
        graph = np.minimum(graph, graph[:, k:k + 1] + graph[k:k + 1, :])
    distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert distances[graph >= 4].min() > 0.18  # no nonbonded pair inside the repulsive wall


@pytest.mark.parametrize("case, resname", [("benzene", "BENZ"), ("cumene", "CUME")])
def test_aromatic_rings_are_planar(case, resname):
    ts = build(case)
    x = ts.positions_nm
    ring_names = {"BENZ": ["CG", "CD1", "CD2", "CE1", "CE2", "CZ", "HG", "HD1", "HD2", "HE1", "HE2", "HZ"],
                  "CUME": ["CA1", "CA2", "CA3", "CA4", "CA5", "CA6"]}[resname]
    for names in atom_index(ts.topology)[:10]:
        ring = x[[names[a] for a in ring_names]]
        centred = ring - ring.mean(axis=0)
        thickness = np.linalg.svd(centred, compute_uv=False)[-1] / np.sqrt(len(ring))  # RMS distance from plane
        assert thickness < 0.002


# ---------------------------------------------------------------------------------------------------
# Liquids: box, packing, reproducibility
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["benzene", "cumene", "hexane"])
def test_liquid_box_matches_density(case):
    ts = build(case)
    box = ts.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)
    assert np.allclose(box, np.diag(np.diag(box))) and np.allclose(np.diag(box), box[0][0])  # cubic
    system_box = ts.system.getDefaultPeriodicBoxVectors()
    assert np.allclose([v.value_in_unit(unit.nanometer) for v in system_box], box)
    mass_g = sum(ts.system.getParticleMass(i).value_in_unit(unit.dalton)
                 for i in range(ts.system.getNumParticles())) / 6.02214076e23
    volume_cm3 = box[0][0] ** 3 * 1e-21
    assert mass_g / volume_cm3 == pytest.approx(systems.LIQUID_DENSITIES[CASES[case][1]], rel=1e-3)


@pytest.mark.parametrize("case", ["benzene", "cumene", "hexane"])
def test_liquid_packing_tolerance(case):
    assert min_intermolecular_distance(build(case)) >= 0.2


def test_liquid_custom_density_and_tolerance():
    ts = systems.liquid("TOLU", 60, density_g_cm3=0.6, cutoff_nm=0.9, switch_nm=None, tolerance_nm=0.25)
    box_nm = (60 * ts.metadata["molar_mass_g_mol"] / (6.02214076e23 * 0.6) * 1e21) ** (1 / 3)
    assert ts.metadata["box_nm"][0] == pytest.approx(box_nm)
    assert min_intermolecular_distance(ts) >= 0.25
    nonbonded = next(f for f in ts.system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert not nonbonded.getUseSwitchingFunction()


def test_liquid_seed_reproducibility():
    kwargs = dict(n_molecules=50, cutoff_nm=0.8, switch_nm=0.7)
    a, b = systems.liquid("BENZ", seed=3, **kwargs), systems.liquid("BENZ", seed=3, **kwargs)
    c = systems.liquid("BENZ", seed=4, **kwargs)
    assert np.array_equal(a.positions_nm, b.positions_nm)
    assert not np.allclose(a.positions_nm, c.positions_nm)
    peptides = [systems.alanine_dipeptide(seed=2).positions_nm for _ in range(2)]
    assert np.array_equal(*peptides)


def test_lennard_jones_moved_to_nonbonded_force_keeps_energy():
    # charmm36.xml builds LJ as a tabulated CustomNonbondedForce; the liquid uses the equivalent
    # (and much faster) NonbondedForce. Both must give the same energy and forces.
    ts = systems.liquid("CUME", 60, cutoff_nm=0.9, switch_nm=0.8)
    assert ts.metadata["lennard_jones_force"] == "NonbondedForce"
    assert not any(isinstance(f, openmm.CustomNonbondedForce) for f in ts.system.getForces())
    original = app.ForceField("charmm36.xml").createSystem(
        ts.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.9, switchDistance=0.8, constraints=app.HBonds
    )
    for force in original.getForces():
        if isinstance(force, openmm.CustomNonbondedForce):
            force.setUseLongRangeCorrection(True)
    results = []
    for system in (ts.system, original):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(ts.positions)
        state = context.getState(getEnergy=True, getForces=True)
        results.append((state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                        state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-3)
    assert np.abs(results[0][1] - results[1][1]).max() < 1e-3


# ---------------------------------------------------------------------------------------------------
# Minimization and dynamics
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_minimize_and_run_dynamics(case):
    ts = build(case)
    platform = choose_platform(ts.system)
    start = openmm.Context(ts.system, openmm.VerletIntegrator(0.001), platform)
    start.setPositions(ts.positions)
    e_start = potential_energy(start)
    minimized = ts.minimized(max_iterations=300)
    assert minimized.positions_nm.shape == ts.positions_nm.shape
    assert minimized.topology is ts.topology and minimized.system is ts.system

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 2 * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(ts.system, integrator, platform)
    context.setPositions(minimized.positions)
    e_min = potential_energy(context)
    assert np.isfinite(e_min) and e_min < e_start
    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(1000)
    state = context.getState(getEnergy=True, getPositions=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    assert np.isfinite(positions).all() and np.isfinite(state.getPotentialEnergy()._value)
    # The molecules stay intact: every bond within 15% of its force-field length after 2 ps.
    moved = systems.TestSystem(ts.name, ts.topology, ts.system, unit.Quantity(positions, unit.nanometer))
    assert np.abs(bond_length_errors(moved)).max() < 0.15


def test_minimized_refuses_non_finite_energy():
    ts = build("adp_vacuum")
    collapsed = systems.TestSystem(ts.name, ts.topology, ts.system, unit.Quantity(np.zeros((22, 3)), unit.nanometer))
    with pytest.raises(RuntimeError, match="not finite"):
        collapsed.minimized()


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown solvent 'water'.*vacuum, obc2, gbn2, tip3p"):
        systems.alanine_dipeptide("water")
    with pytest.raises(ValueError, match="invalid one-letter code.*'B'.*'X'"):
        systems.peptide("GYXB")
    with pytest.raises(ValueError, match="non-empty"):
        systems.peptide("")
    with pytest.raises(ValueError, match="seed"):
        systems.peptide("AA", seed=-1)
    with pytest.raises(ValueError, match="'XYZW' is not in OpenMM's charmm36.xml"):
        systems.liquid("XYZW")
    with pytest.raises(ValueError, match="not a standalone molecule"):
        systems.liquid("ALA", density_g_cm3=1.0)
    with pytest.raises(ValueError, match="no tabulated density for 'FURA'"):
        systems.liquid("FURA")
    with pytest.raises(ValueError, match="n_molecules must be an integer >= 1"):
        systems.liquid("BENZ", 0)
    with pytest.raises(ValueError, match="n_molecules"):
        systems.liquid("BENZ", 2.5)
    for density in (0.0, -0.8):
        with pytest.raises(ValueError, match="density_g_cm3 must be positive"):
            systems.liquid("BENZ", density_g_cm3=density)
    with pytest.raises(ValueError, match="less than twice the cutoff"):
        systems.liquid("BENZ", 20)
    with pytest.raises(ValueError, match="switch_nm"):
        systems.liquid("BENZ", switch_nm=1.2)
    with pytest.raises(ValueError, match="padding_nm"):
        systems.alanine_dipeptide("tip3p", padding_nm=0.3)


def test_obc2_is_native_and_equals_openmm_obc2_xml():
    """The native GBSAOBCForce must reproduce OpenMM's implicit/obc2.xml (CustomGBForce) model."""
    ts = systems.alanine_dipeptide("obc2")
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in ts.system.getForces())
    assert not any(isinstance(f, openmm.CustomGBForce) for f in ts.system.getForces())
    stock = app.ForceField("amber14-all.xml", "implicit/obc2.xml").createSystem(
        ts.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x = ts.positions_nm + rng.normal(scale=0.01, size=ts.positions_nm.shape)
        out = []
        for system in (ts.system, stock):
            ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
            ctx.setPositions(x)
            state = ctx.getState(getEnergy=True, getForces=True)
            out.append((state.getPotentialEnergy()._value, state.getForces(asNumpy=True)._value))
        # identical model; the custom expression hard-codes 138.935485 instead of OpenMM's 138.9354576
        assert out[0][0] == pytest.approx(out[1][0], rel=5e-7)
        np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-3, rtol=1e-6)


def test_peptide_coordinates_are_identical_across_processes():
    """addHydrogens minimizes hydrogens; on the multi-threaded CPU platform that differed between processes."""
    import subprocess
    import sys

    code = ("import torch, numpy as np\nfrom openmm_backmap import systems\n"
            "print(repr(systems.alanine_dipeptide('obc2').positions_nm.round(12).tolist()))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1]
