"""Relaxer: restrained minimisation of backmapped frames with the AA System, checked against OpenMM energies."""
from __future__ import annotations

import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)
import numpy as np
import openmm
import pytest

from openmm_backmap import systems
from openmm_backmap.backmap import Relaxer
from openmm_backmap.backmap.relax import CONSTRAINT_BOND_K, relaxation_system
from openmm_backmap.mapping import CGMapping


@pytest.fixture(scope="module")
def benzene():
    """(TestSystem, 3-bead mapping, positions nm, box nm) of a 20-molecule benzene box with PME and H constraints."""
    liq = systems.liquid("BENZ", n_molecules=20, seed=0, cutoff_nm=0.6, switch_nm=0.5)
    box = np.array([v.value_in_unit(openmm.unit.nanometer) for v in liq.system.getDefaultPeriodicBoxVectors()])
    return liq, CGMapping.from_preset(liq.topology, "benzene-3bead"), liq.positions_nm, box


def _energy(system, xyz, box=None):
    context = openmm.Context(openmm.XmlSerializer.clone(system), openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(xyz)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)


def _min_intermolecular_distance(xyz, box, molecule):
    d = xyz[:, None] - xyz[None]
    d -= np.round(d / np.diag(box)) * np.diag(box)
    r = np.linalg.norm(d, axis=-1)
    r[molecule[:, None] == molecule[None]] = np.inf
    return r.min()


def test_relaxation_system_turns_constraints_into_bonds_and_pme_into_reaction_field(benzene):
    liq = benzene[0]
    original = openmm.XmlSerializer.serialize(liq.system)
    relaxed = relaxation_system(liq.system)
    assert openmm.XmlSerializer.serialize(liq.system) == original  # the user's System is untouched
    assert liq.system.getNumConstraints() == 120 and relaxed.getNumConstraints() == 0
    bonds = [f for f in relaxed.getForces() if f.getName() == "RelaxationConstraintBonds"][0]
    constraints = {tuple(sorted(liq.system.getConstraintParameters(c)[:2])):
                   liq.system.getConstraintParameters(c)[2].value_in_unit(openmm.unit.nanometer)
                   for c in range(liq.system.getNumConstraints())}
    assert bonds.getNumBonds() == len(constraints)
    for b in range(bonds.getNumBonds()):
        i, j, length, k = bonds.getBondParameters(b)
        assert length.value_in_unit(openmm.unit.nanometer) == pytest.approx(constraints[tuple(sorted((i, j)))])
        assert k.value_in_unit(k.unit) == CONSTRAINT_BOND_K
    nb = [f for f in relaxed.getForces() if isinstance(f, openmm.NonbondedForce)][0]
    nb0 = [f for f in liq.system.getForces() if isinstance(f, openmm.NonbondedForce)][0]
    assert nb0.getNonbondedMethod() == openmm.NonbondedForce.PME
    assert nb.getNonbondedMethod() == openmm.NonbondedForce.CutoffPeriodic
    assert nb.getCutoffDistance() == nb0.getCutoffDistance()
    assert not any(isinstance(f, (openmm.CMMotionRemover, openmm.MonteCarloBarostat)) for f in relaxed.getForces())


def test_relaxation_system_has_the_energy_of_a_system_without_ewald():
    """Implicit solvent (no Ewald) with H constraints: on a frame that satisfies the constraints the relaxation
    System gives OpenMM's energy of the original one (the added bonds are at their rest lengths)."""
    adp = systems.alanine_dipeptide("obc2")
    context = openmm.Context(adp.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(adp.positions)
    context.applyConstraints(1e-12)
    xyz = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
    assert adp.system.getNumConstraints() > 0
    assert _energy(relaxation_system(adp.system), xyz) == pytest.approx(_energy(adp.system, xyz), rel=1e-8, abs=1e-6)


def test_relax_removes_an_intermolecular_overlap_and_keeps_the_beads(benzene):
    liq, mapping, xyz, box = benzene
    molecule = np.array([a.residue.index for a in liq.topology.atoms()])
    hydrogens = np.array([a.element.symbol == "H" for a in liq.topology.atoms()])
    cg = mapping.map_positions(xyz)
    # push the closest pair of hydrogens of different molecules to 0.05 nm apart
    h = np.flatnonzero(hydrogens)
    d = xyz[h][None] - xyz[h][:, None]
    d -= np.round(d / np.diag(box)) * np.diag(box)
    r = np.linalg.norm(d, axis=-1)
    r[molecule[h][:, None] == molecule[h][None]] = np.inf
    i, j = np.unravel_index(np.argmin(r), r.shape)
    bad = xyz.copy()
    bad[h[j]] = xyz[h[j]] - d[i, j] + 0.05 * d[i, j] / r[i, j]
    assert _min_intermolecular_distance(bad, box, molecule) < 0.06
    relaxer = Relaxer(liq.system, mapping)
    out = relaxer.relax(bad, cg, box)
    # OpenMM's energy of the user's System (PME, constraints) falls far below the overlapping frame's, and below
    # the packed input frame's
    assert _energy(liq.system, out, box) < min(_energy(liq.system, xyz, box), _energy(liq.system, bad, box) / 100)
    assert _min_intermolecular_distance(out, box, molecule) > 0.2
    # the constrained C-H bonds are back near their lengths (stiff bonds, not constraints, and 200 iterations: within
    # 5 %, median 0.5 %; the pushed hydrogen's bond was stretched by more than 50 %)
    ratio = []
    for c in range(liq.system.getNumConstraints()):
        i, j, length = liq.system.getConstraintParameters(c)
        ratio.append([np.linalg.norm(x[i] - x[j]) / length.value_in_unit(openmm.unit.nanometer) for x in (out, bad)])
    ratio = np.abs(np.array(ratio) - 1)
    assert ratio[:, 1].max() > 0.5 and ratio[:, 0].max() < 0.05 and np.median(ratio[:, 0]) < 0.005, ratio.max(0)
    # the beads stay at the CG frame, closer with a stiffer restraint
    dev = np.linalg.norm(mapping.map_positions(out) - cg, axis=-1).max()
    stiff = Relaxer(liq.system, mapping, restraint_kj_mol_nm2=1e7).relax(bad, cg, box)
    dev_stiff = np.linalg.norm(mapping.map_positions(stiff) - cg, axis=-1).max()
    assert dev < 0.02 and dev_stiff < dev / 5, (dev, dev_stiff)


def test_relax_batches_and_restrains_to_the_nearest_bead_image(benzene):
    liq, mapping, xyz, box = benzene
    rng = np.random.default_rng(1)
    frames = xyz + rng.normal(scale=0.01, size=(2, *xyz.shape))
    cg = mapping.map_positions(xyz)
    relaxer = Relaxer(liq.system, mapping, max_iterations=50)
    batch = relaxer.relax(frames, cg, box)
    assert batch.shape == frames.shape
    one = relaxer.relax(frames[1], cg, box)
    np.testing.assert_allclose(batch[1], one, atol=1e-6)
    # beads given one box vector away: the same result (each bead is held at its image nearest to its atoms)
    shifted = relaxer.relax(frames[1], cg + box[0], box)
    np.testing.assert_allclose(shifted, one, atol=1e-6)
    assert not np.allclose(one, frames[1], atol=1e-3)  # it did move the atoms


def test_bad_input_is_refused(benzene):
    liq, mapping, xyz, box = benzene
    cg = mapping.map_positions(xyz)
    relaxer = Relaxer(liq.system, mapping)
    with pytest.raises(ValueError, match="particles"):
        relaxer.relax(xyz[:-1], cg, box)
    with pytest.raises(ValueError, match="particles"):
        relaxer.relax(xyz, cg[:-1], box)
    bad = xyz.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        relaxer.relax(bad, cg, box)
    with pytest.raises(ValueError, match="periodic"):
        relaxer.relax(xyz, cg)
    with pytest.raises(ValueError, match="CG frames"):
        relaxer.relax(np.stack([xyz] * 3), np.stack([cg] * 2), box)
    with pytest.raises(ValueError, match="max_iterations"):
        Relaxer(liq.system, mapping, max_iterations=-1)
    with pytest.raises(ValueError, match="restraint"):
        Relaxer(liq.system, mapping, restraint_kj_mol_nm2=0.0)
    with pytest.raises(TypeError, match="openmm.System"):
        Relaxer(liq.topology, mapping)
    # a mapping of another box: the System's particle count does not match
    other = CGMapping.from_preset(systems.liquid("BENZ", n_molecules=4, density_g_cm3=0.5, cutoff_nm=0.45,
                                                 switch_nm=0.4).topology, "benzene-3bead")
    with pytest.raises(ValueError, match="System has 240 particles"):
        Relaxer(liq.system, other)
    # atoms that leave out atoms a bead uses
    with pytest.raises(ValueError, match="outside the frame's atoms"):
        Relaxer(liq.system, mapping, atoms=np.arange(200))


def test_thermalization_restores_the_thermal_energy_that_minimisation_removes(adp_aa_data, adp_mapping):
    """Minimised frames sit ~(n_dof/2) kT below the ensemble's mean energy (equipartition); the short restrained
    Langevin run of ``md_steps`` brings them back to it, with the System's constraints satisfied and the beads kept."""
    from openmm_backmap.data import AADataset

    adp, path = adp_aa_data
    with AADataset(path) as ds:
        ref = ds.positions[::60].astype(np.float64)  # 20 frames, 6 ps apart
    cg = adp_mapping.map_positions(ref)
    noisy = ref + np.random.default_rng(0).normal(scale=0.01, size=ref.shape)
    minimised = Relaxer(adp.system, adp_mapping, platform="Reference").relax(noisy, cg)
    relaxer = Relaxer(adp.system, adp_mapping, md_steps=100, temperature_K=300.0, platform="Reference")
    thermal = relaxer.relax(noisy, cg)
    e_ref, e_min, e_th = (np.mean([_energy(adp.system, x) for x in xyz]) for xyz in (ref, minimised, thermal))
    # 54 degrees of freedom: (54/2) kT = 67 kJ/mol at 300 K; measured: reference -81, minimised -139, thermal -89
    assert e_min < e_ref - 30, (e_min, e_ref)
    assert abs(e_th - e_ref) < 15 and e_th > e_min + 30, (e_th, e_ref, e_min)
    # the run keeps the constraints (minimisation only approximates them with stiff bonds)
    for c in range(adp.system.getNumConstraints()):
        i, j, length = adp.system.getConstraintParameters(c)
        length = length.value_in_unit(openmm.unit.nanometer)
        assert np.abs(np.linalg.norm(thermal[:, i] - thermal[:, j], axis=-1) / length - 1).max() < 1e-4
    # the beads stay within thermal fluctuation of the CG frame (sqrt(kT/k) = 0.005 nm per coordinate)
    assert np.abs(adp_mapping.map_positions(thermal) - cg).max() < 0.03
    # seeded: the same frames with the same seed give the same result, another seed another one
    again = Relaxer(adp.system, adp_mapping, md_steps=100, temperature_K=300.0, platform="Reference")
    np.testing.assert_array_equal(again.relax(noisy[:3], cg[:3]), thermal[:3])
    other = Relaxer(adp.system, adp_mapping, md_steps=100, temperature_K=300.0, seed=1, platform="Reference")
    assert not np.allclose(other.relax(noisy[:3], cg[:3]), thermal[:3], atol=1e-3)
    assert "md_steps=100, temperature_K=300" in repr(relaxer)
    assert relaxer.md_rejected == 0
    # a run that blows up (a 20 fs time step) is rejected frame by frame: the minimised frame is kept and counted
    blown = Relaxer(adp.system, adp_mapping, md_steps=100, temperature_K=300.0, timestep_ps=0.02, platform="Reference")
    np.testing.assert_allclose(blown.relax(noisy[:3], cg[:3]), minimised[:3], atol=1e-6)
    assert blown.md_rejected == 3
    with pytest.raises(ValueError, match="needs temperature_K"):
        Relaxer(adp.system, adp_mapping, md_steps=10)
    with pytest.raises(ValueError, match="md_steps"):
        Relaxer(adp.system, adp_mapping, md_steps=-1, temperature_K=300.0)
    with pytest.raises(ValueError, match="friction_per_ps"):
        Relaxer(adp.system, adp_mapping, md_steps=10, temperature_K=300.0, friction_per_ps=0.0)


# -- inside the temporal chain -----------------------------------------------------------------------------------
def test_chain_outputs_relaxed_frames_and_conditions_on_them(adp_aa_data, tiny_backmapper):
    from openmm_backmap.data import AADataset

    adp = adp_aa_data[0]
    with AADataset(adp_aa_data[1]) as ds:
        aa = ds.positions[200:203].astype(np.float64)
    cg = tiny_backmapper.mapping.map_positions(aa)
    relaxer = Relaxer(adp.system, tiny_backmapper.mapping, atoms=tiny_backmapper.atom_indices)
    relaxed_chain = tiny_backmapper.chain(seed=0, relax=relaxer)
    plain = tiny_backmapper.chain(seed=0)
    relaxed_chain.previous = plain.previous = aa[0]
    for t in (1, 2):
        relaxed_chain.reseed(t)
        plain.reseed(t)
        out = relaxed_chain.step(cg[t])
        raw = plain.step(cg[t])
        # the output is the relaxed decode of the same condition ...
        np.testing.assert_allclose(out, relaxer.relax(raw, cg[t]), atol=1e-6)
        assert _energy(adp.system, out) < _energy(adp.system, raw)
        # ... and it is what the next step is conditioned on
        np.testing.assert_allclose(relaxed_chain.previous[0], out)
        plain.previous = out
    # a System works as well as a Relaxer; a Relaxer for other atoms is refused
    np.testing.assert_allclose(tiny_backmapper.backmap_trajectory(cg, seed=0, first_frame_nm=aa[0],
                                                                  relax=adp.system)[0], aa[0])
    with pytest.raises(TypeError, match="relax must be"):
        tiny_backmapper.chain(relax="yes")
    liq = systems.liquid("BENZ", n_molecules=4, density_g_cm3=0.5, cutoff_nm=0.45, switch_nm=0.4)
    with pytest.raises(ValueError, match="the Relaxer is for 48 atoms"):
        tiny_backmapper.chain(relax=Relaxer(liq.system, CGMapping.from_preset(liq.topology, "benzene-3bead")))
