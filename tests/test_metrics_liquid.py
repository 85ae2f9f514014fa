"""Condensed-phase metrics on a small benzene box: per-molecule Lennard-Jones energies checked against OpenMM,
intermolecular g(r) and its L1 distance, intermolecular clash score."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)
import openmm
import openmm.app as app
from openmm import unit

from openmm_backmap import metrics, systems

CUTOFF, SWITCH = 0.6, 0.5


@pytest.fixture(scope="module")
def liquid():
    """(TestSystem, minimized positions (240, 3) nm, box (3, 3) nm) of 20 benzene molecules."""
    liq = systems.liquid("BENZ", 20, cutoff_nm=CUTOFF, switch_nm=SWITCH)
    context = openmm.Context(liq.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(liq.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 200)
    state = context.getState(getPositions=True)
    xyz = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
    return liq, np.asarray(xyz), np.asarray(box)


def _molecules(topology: app.Topology) -> list[list[int]]:
    return sorted((sorted(a.index for a in mol) for mol in _mdtraj(topology).find_molecules()), key=lambda m: m[0])


def _mdtraj(topology):
    import mdtraj

    return mdtraj.Topology.from_openmm(topology)


def _openmm_lj(liq, xyz, box, silent=()) -> float:
    """OpenMM's intermolecular Lennard-Jones energy (kJ/mol): a System with only a charge-free NonbondedForce,
    every intramolecular pair excluded, no dispersion correction, atoms in ``silent`` with ε = 0."""
    source = next(f for f in liq.system.getForces() if isinstance(f, openmm.NonbondedForce))
    system = openmm.System()
    for i in range(liq.system.getNumParticles()):
        system.addParticle(liq.system.getParticleMass(i))
    system.setDefaultPeriodicBoxVectors(*box)
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(source.getCutoffDistance())
    force.setUseSwitchingFunction(source.getUseSwitchingFunction())
    force.setSwitchingDistance(source.getSwitchingDistance())
    force.setUseDispersionCorrection(False)
    for i in range(system.getNumParticles()):
        _, sigma, epsilon = source.getParticleParameters(i)
        force.addParticle(0.0, sigma, 0.0 if i in silent else epsilon)
    for mol in _molecules(liq.topology):
        for a in range(len(mol)):
            for b in range(a + 1, len(mol)):
                force.addException(mol[a], mol[b], 0.0, 1.0, 0.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPeriodicBoxVectors(*box)
    context.setPositions(xyz)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_molecule_lj_energies_match_openmm(liquid):
    liq, xyz, box = liquid
    energies = metrics.molecule_lj_energies(xyz, liq.system, liq.topology, box)
    assert energies.shape == (1, 20)
    assert (energies < 0).all()  # every molecule of a dense liquid is bound to its neighbours
    reference = _openmm_lj(liq, xyz, box)
    assert energies.sum() == pytest.approx(reference, rel=1e-4)  # halves of every pair sum to the total
    # one molecule's full interaction with its environment (OpenMM: switch its LJ off) is twice its share
    m = 7
    mol = _molecules(liq.topology)[m]
    full = reference - _openmm_lj(liq, xyz, box, silent=set(mol))
    assert 2 * energies[0, m] == pytest.approx(full, rel=1e-4)


def test_molecule_lj_energies_triclinic_box_and_frames(liquid):
    liq, xyz, box = liquid
    length = box[0, 0]
    tric = np.array([[length, 0, 0], [0.2, length, 0], [-0.15, 0.25, length]])
    reference = _openmm_lj(liq, xyz, tric)
    both = metrics.molecule_lj_energies(np.stack([xyz, xyz]), liq.system, liq.topology, np.stack([box, tric]))
    assert both[1].sum() == pytest.approx(reference, rel=1e-4)
    assert not np.allclose(both[0], both[1])
    # a molecule moved by a lattice vector is the same molecule
    moved = xyz.copy()
    moved[_molecules(liq.topology)[3]] += tric[1] - tric[2]
    np.testing.assert_allclose(metrics.molecule_lj_energies(moved, liq.system, liq.topology, tric)[0], both[1],
                               rtol=1e-10, atol=1e-10)
    # a cutoff below the force's switching distance leaves no switch: refused
    with pytest.raises(ValueError, match="switching distance"):
        metrics.molecule_lj_energies(xyz, liq.system, liq.topology, box, cutoff_nm=0.45)


def test_molecule_lj_energies_read_charmm_tabulated_lj(liquid):
    """charmm36.xml's own System keeps LJ in a tabulated CustomNonbondedForce (NBFIX form): same energies."""
    liq, xyz, box = liquid
    charmm = app.ForceField("charmm36.xml").createSystem(liq.topology, nonbondedMethod=app.PME,
                                                         nonbondedCutoff=CUTOFF, switchDistance=SWITCH)
    assert any(isinstance(f, openmm.CustomNonbondedForce) for f in charmm.getForces())
    ours = metrics.molecule_lj_energies(xyz, liq.system, liq.topology, box)
    np.testing.assert_allclose(metrics.molecule_lj_energies(xyz, charmm, liq.topology, box), ours, rtol=1e-8)


def test_molecule_lj_energies_refuse_what_they_cannot_split(liquid):
    liq, xyz, box = liquid
    with pytest.raises(ValueError, match="periodic: pass box_vectors_nm"):
        metrics.molecule_lj_energies(xyz, liq.system, liq.topology)
    custom = copy.deepcopy(liq.system)
    extra = openmm.CustomNonbondedForce("eps*r")
    extra.addGlobalParameter("eps", 1.0)
    for _ in range(custom.getNumParticles()):
        extra.addParticle([])
    custom.addForce(extra)
    with pytest.raises(ValueError, match=r"CustomNonbondedForce, energy 'eps\*r'\) is not supported"):
        metrics.molecule_lj_energies(xyz, custom, liq.topology, box)
    ljpme = copy.deepcopy(liq.system)
    next(f for f in ljpme.getForces() if isinstance(f, openmm.NonbondedForce)).setNonbondedMethod(
        openmm.NonbondedForce.LJPME)
    with pytest.raises(ValueError, match="LJPME"):
        metrics.molecule_lj_energies(xyz, ljpme, liq.topology, box)
    with pytest.raises(ValueError, match="particles"):
        metrics.molecule_lj_energies(xyz[:-12], liq.system, _drop_last(liq), box)


def _drop_last(liq):
    import mdtraj

    top = mdtraj.Topology.from_openmm(liq.topology)
    return top.subset(np.arange(top.n_atoms - 12))


def test_intermolecular_rdf(liquid):
    liq, xyz, box = liquid
    r, g = metrics.intermolecular_rdf(xyz, box, liq.topology, element="C", r_max_nm=0.7, n_bins=70)
    assert r.shape == g.shape == (70,)
    assert np.all(g[r < 0.3] == 0)  # no carbons of different molecules closer than vdW contact
    _, g_all = metrics.radial_distribution(xyz, box, [a.index for a in liq.topology.atoms()
                                                       if a.element.symbol == "C"], r_max_nm=0.7, n_bins=70)
    assert g_all[r < 0.16].sum() > 0  # the bonded ring neighbours, which the intermolecular g(r) leaves out
    with pytest.raises(ValueError, match="element 'N'"):
        metrics.intermolecular_rdf(xyz, box, liq.topology, element="N")


def test_intermolecular_rdf_of_an_ideal_gas_is_one():
    import mdtraj

    top = mdtraj.Topology()
    chain = top.add_chain()
    rng = np.random.default_rng(0)
    n, length = 2000, 4.0
    centres = rng.uniform(0, length, size=(n, 3))
    direction = rng.normal(size=(n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    xyz = np.empty((2 * n, 3))
    for m in range(n):
        res = top.add_residue("C2", chain)
        a = top.add_atom("C1", mdtraj.element.carbon, res)
        b = top.add_atom("C2", mdtraj.element.carbon, res)
        top.add_bond(a, b)
        xyz[2 * m], xyz[2 * m + 1] = centres[m], centres[m] + 0.15 * direction[m]
    r, g = metrics.intermolecular_rdf(xyz, np.eye(3) * length, top, r_max_nm=1.5, n_bins=15)
    assert np.abs(g[r > 0.3] - 1).max() < 0.1
    # and g(r) of the bonded partners is not in it (it would be a spike at 0.15 nm)
    assert g[0] < 1.5


def test_rdf_l1_is_the_integral_of_the_absolute_difference(liquid):
    liq, xyz, box = liquid
    r, g = metrics.intermolecular_rdf(xyz, box, liq.topology, r_max_nm=0.7, n_bins=70)
    shaken = xyz + np.random.default_rng(1).normal(scale=0.02, size=xyz.shape)
    _, g2 = metrics.intermolecular_rdf(shaken, box, liq.topology, r_max_nm=0.7, n_bins=70)
    l1 = metrics.rdf_l1_nm(r, g, g2)
    assert l1 == pytest.approx(np.sum(np.abs(g2 - g)) * 0.01) and l1 > 0
    assert metrics.rdf_l1_nm(r, g, g) == 0.0


def test_intermolecular_clash_score(liquid):
    liq, xyz, box = liquid
    top = _mdtraj(liq.topology)

    def score(x, b=box):
        return metrics.clash_score(x, top, groups="molecule", scope="inter", box_vectors_nm=b)

    assert score(xyz) == 0.0
    mols = _molecules(liq.topology)
    moved = xyz.copy()
    # molecule 3 on top of molecule 11's periodic image: found through the minimum image
    moved[mols[3]] += xyz[mols[11]].mean(axis=0) - xyz[mols[3]].mean(axis=0) + box[0] + 0.05
    assert score(moved) == pytest.approx(2 / 20)
    pairs = metrics.clash_pairs(moved, top, scope="inter", box_vectors_nm=box)[0]
    molecule = np.empty(top.n_atoms, dtype=int)
    for k, mol in enumerate(mols):
        molecule[mol] = k
    assert set(molecule[pairs.ravel()]) == {3, 11}
    assert score(moved, None) == 0.0  # without the box the image is far away
