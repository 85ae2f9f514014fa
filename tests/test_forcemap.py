"""Statistically optimal force maps (CGMapping.with_optimized_force_map) against analytic mean forces and OpenMM data."""
from __future__ import annotations

import numpy as np
import openmm
import pytest
import yaml
from openmm import app, unit

from openmm_backmap.data import AADataset, CGDataset
from openmm_backmap.mapping import CGMapping, map_dataset


def _well_and_bond_trajectory(n_frames=3000, well=200.0, bond=2.0e5, seed=5, partners=("H",)):
    """Atom 0 in an isotropic harmonic well (kJ/mol/nm²), atom 1 bound to it by a stiff bond; Langevin, 300 K.

    Integrating out atom 1 leaves the PMF of atom 0 equal to the well, so the mean force on a bead at atom 0 is
    exactly ``-well * r0``; the bond force is pure noise around it. ``partners`` gives one such pair per entry (the
    element of atom 1), pairs not interacting with each other: a "liquid" of independent copies.
    """
    system = openmm.System()
    external = openmm.CustomExternalForce("0.5*kw*(x^2+y^2+z^2)")
    external.addGlobalParameter("kw", well)
    bonds = openmm.HarmonicBondForce()
    top = app.Topology()
    chain = top.addChain()
    for k, element in enumerate(partners):
        system.addParticle(12.0)
        system.addParticle(app.Element.getBySymbol(element).mass)
        external.addParticle(2 * k, [])
        bonds.addBond(2 * k, 2 * k + 1, 0.11, bond)
        residue = top.addResidue("C" + element, chain)
        c = top.addAtom("C", app.Element.getBySymbol("C"), residue)
        top.addBond(c, top.addAtom(element, app.Element.getBySymbol(element), residue))
    system.addForce(external)
    system.addForce(bonds)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 20 / unit.picosecond, 0.0005 * unit.picosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(np.tile([[0.0, 0.0, 0.0], [0.11, 0.0, 0.0]], (len(partners), 1)))
    context.setVelocitiesToTemperature(300 * unit.kelvin, seed)
    integrator.step(2000)
    positions, forces = [], []
    for _ in range(n_frames):
        integrator.step(40)
        state = context.getState(getPositions=True, getForces=True)
        positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return top, np.array(positions), np.array(forces), well


def test_optimised_map_cancels_the_bond_noise_and_keeps_the_analytic_mean_force():
    top, xyz, forces, well = _well_and_bond_trajectory()
    mapping = CGMapping(top, [{"name": "C", "atoms": [0]}])
    assert np.allclose(mapping.force_matrix, [[1.0, 0.0]])  # the bead's own atom: bond force included
    optimised = mapping.with_optimized_force_map(forces[:1500])
    assert optimised.has_optimized_force_map and not mapping.has_optimized_force_map
    assert optimised.is_force_map_consistent
    # the net force on the pair: the bond force cancels exactly, only the well's force is left
    assert np.allclose(optimised.force_matrix, [[1.0, 1.0]], atol=0.01)
    mean_force = -well * optimised.map_positions(xyz[1500:])
    noise_plain = mapping.map_forces(forces[1500:]) - mean_force
    noise_optimised = optimised.map_forces(forces[1500:]) - mean_force
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    assert rms(noise_plain) > 300.0  # sqrt(k kT): the stiff bond's force
    assert rms(noise_optimised) < 1e-3 * rms(noise_plain)


def test_copies_of_one_molecule_share_one_map_fitted_to_all_of_them():
    """A 'liquid' of 24 independent C-H pairs and one C-F pair, 4 frames: the 24 C-H copies pool their samples."""
    from openmm_backmap._forcemap import optimal_force_matrix

    top, xyz, forces, well = _well_and_bond_trajectory(n_frames=8, partners=("H",) * 24 + ("F",), seed=11)
    mapping = CGMapping(top, [{"name": "C", "atoms": [2 * k]} for k in range(25)])
    fit, held = forces[:4], forces[4:]
    pooled = mapping.with_optimized_force_map(fit)
    g = pooled.force_matrix
    assert pooled.is_force_map_consistent
    partner = np.array([g[k, 2 * k + 1] for k in range(25)])
    assert np.all(partner[:24] == partner[0])  # one map for the C-H copies ...
    assert partner[24] != partner[0]  # ... and its own for the C-F pair
    # pooling: the partner's weight (exactly 1 in the limit of many samples, see the test above) is estimated
    # from 24 times as many samples as a copy has on its own
    alone = optimal_force_matrix(mapping.position_matrix, [fit], np.repeat(np.arange(25), 2),
                                 np.zeros((0, 2), dtype=int)).toarray()
    error_alone = np.abs([alone[k, 2 * k + 1] - 1.0 for k in range(24)]).mean()
    assert abs(partner[0] - 1.0) < 0.5 * error_alone
    # and it keeps cancelling the bond noise on frames it was not fitted to
    noise = pooled.map_forces(held) + well * pooled.map_positions(xyz[4:])
    assert np.sqrt(np.mean(noise[:, :24] ** 2)) < 0.05 * np.sqrt(np.mean(mapping.map_forces(held)[:, :24] ** 2))


def test_alanine_dipeptide_optimised_map_is_consistent_and_less_noisy(adp_aa_data, tmp_path):
    adp, path = adp_aa_data
    mapping = CGMapping.from_preset(adp.topology, "backbone-cb")
    with AADataset(path) as aa:
        forces = aa.forces[:].astype(np.float64)
        optimised = mapping.with_optimized_force_map(aa, max_frames=600)
    # the dataset's HBonds constraints were taken up first, and the hydrogens share their heavy atoms' weights
    assert len(optimised.constraints) == adp.system.getNumConstraints()
    assert optimised.is_force_map_consistent
    g = optimised.force_matrix
    assert np.allclose(g @ optimised.position_matrix.T, np.eye(6), atol=1e-8)
    for i, j in optimised.constraints:
        assert np.array_equal(g[:, i], g[:, j])
    # atoms outside every bead now take part (the map is not the beads' own net forces any more)
    assert (np.abs(g).sum(axis=0) > 1e-6).sum() > (np.abs(mapping.with_constraints(adp.system).force_matrix)
                                                    .sum(axis=0) > 0).sum()
    # less mean-square mapped force on frames it was not fitted to (the first 600 strided frames of 1200 are
    # every other frame; fit on the first half, judge on the second)
    fitted = mapping.with_optimized_force_map(forces[:600])
    plain = mapping.with_constraints(adp.system)
    ms = lambda m: float(np.mean(m.map_forces(forces[600:]) ** 2))  # noqa: E731
    assert ms(fitted) < 0.85 * ms(plain)

    # persisted: YAML round trip, and the CG dataset's forces are G f with the map stored beside them
    again = CGMapping.from_yaml(optimised.to_yaml(), adp.topology)
    assert again.has_optimized_force_map
    assert np.allclose(again.force_matrix, g, rtol=0, atol=1e-12)
    out = map_dataset(path, optimised, tmp_path / "cg.h5", progress=False)
    with CGDataset(out) as cg:
        assert cg.settings["optimized_force_map"] is True
        assert np.allclose(cg.forces[:5], np.einsum("Ii,fix->fIx", g, forces[:5]), atol=1e-3)
        stored = CGMapping.from_yaml(cg.text("mapping"), adp.topology)
    assert np.allclose(stored.force_matrix, g, atol=1e-12)


def test_optimised_map_refusals(adp_aa_data, tmp_path):
    adp, path = adp_aa_data
    mapping = CGMapping.from_preset(adp.topology, "backbone-cb")
    with AADataset(path) as aa:
        forces = aa.forces[:50].astype(np.float64)
    with pytest.raises(ValueError, match="shape"):
        mapping.with_optimized_force_map(forces[:, :-1])
    bad = forces.copy()
    bad[7, 3, 0] = np.nan
    with pytest.raises(ValueError, match="frame 7"):
        mapping.with_optimized_force_map(bad)
    with pytest.raises(ValueError, match="two frames"):
        mapping.with_optimized_force_map(forces[:1])
    # optimised without constraints, then asked to map data made with constraints: refused, nothing written
    loose = mapping.with_optimized_force_map(forces)
    with pytest.raises(ValueError, match="without constraints"):
        map_dataset(path, loose, tmp_path / "cg.h5", progress=False)
    assert not (tmp_path / "cg.h5").exists()
    with pytest.raises(ValueError, match="optimise"):
        loose.with_constraints(adp.system)
    # a saved map whose force matrix breaks G P^T = I is refused on load, as are indices out of range
    doc = yaml.safe_load(loose.to_yaml())
    own_atom = int(np.flatnonzero(loose.position_matrix[0])[0])
    entry = next(e for e in doc["force_map"] if e[0] == 0 and e[1] == own_atom)
    entry[2] += 0.5
    with pytest.raises(ValueError, match="not consistent"):
        CGMapping.from_yaml(yaml.safe_dump(doc), adp.topology)
    entry[2] -= 0.5
    entry[1] = adp.topology.getNumAtoms()
    with pytest.raises(ValueError, match="out of range"):
        CGMapping.from_yaml(yaml.safe_dump(doc), adp.topology)
