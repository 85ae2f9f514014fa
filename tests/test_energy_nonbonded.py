"""Native NonbondedForce term: Lennard-Jones and Coulomb energies against OpenMM's Reference platform."""
import numpy as np
import openmm
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.energy._base import ONE_4PI_EPS0
from openmm_backmap.energy.nonbonded import Nonbonded

from helpers import openmm_reference

NB = openmm.NonbondedForce


# -- helpers ---------------------------------------------------------------------------------------------
def _nonbonded(system):
    (force,) = [f for f in system.getForces() if isinstance(f, NB)]
    return _copy(force)


def _copy(force):
    return openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(force))


def _reference(force, positions, box=None):
    """Energies (B,) and forces (B, n, 3) of ``force`` alone by OpenMM's Reference platform."""
    n = force.getNumParticles()
    system = openmm.System()
    for _ in range(n):
        system.addParticle(1.0)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box[0])
    system.addForce(_copy(force))
    return openmm_reference(system, positions, box)


def _native(term, positions, box=None, dtype=torch.float64):
    """Energies per category (B,) and forces per category (B, n, 3) of the native term, computed in
    ``dtype`` (the term follows the dtype of the positions)."""
    x = torch.tensor(positions, dtype=dtype, requires_grad=True)
    bx = None if box is None else torch.tensor(box, dtype=dtype)
    out = term(x, bx)
    out["total"] = out["lj"] + out["coulomb"]
    energies, forces = {}, {}
    for name, value in out.items():
        (grad,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
        energies[name] = value.detach().numpy()
        forces[name] = -grad.numpy()
    return energies, forces


def _perturbed(positions, batch=4, sigma=0.015, seed=0):
    rng = np.random.default_rng(seed)
    return positions[None] + rng.normal(scale=sigma, size=(batch,) + positions.shape)


def _boxes(edge, batch, scales=(1.0, 1.02, 0.99, 1.01)):
    """Cubic boxes (B, 3, 3), a slightly different volume per configuration."""
    return np.stack([np.eye(3) * edge * scales[b % len(scales)] for b in range(batch)])


def _only(force, part):
    """Copy of ``force`` with only Lennard-Jones (charges zeroed) or only Coulomb (epsilons zeroed)."""
    force = _copy(force)
    for i in range(force.getNumParticles()):
        q, s, e = force.getParticleParameters(i)
        force.setParticleParameters(i, 0.0 if part == "lj" else q, s, 0.0 if part == "coulomb" else e)
    for k in range(force.getNumExceptions()):
        i, j, qq, s, e = force.getExceptionParameters(k)
        force.setExceptionParameters(k, i, j, 0.0 if part == "lj" else qq, s, 0.0 if part == "coulomb" else e)
    return force


def _with(force, method=None, cutoff=None, switch=None, dispersion=None, periodic_exceptions=None):
    force = _copy(force)
    if method is not None:
        force.setNonbondedMethod(method)
    if cutoff is not None:
        force.setCutoffDistance(cutoff)
    if switch is not None:
        force.setUseSwitchingFunction(switch is not False)
        if switch is not False:
            force.setSwitchingDistance(switch)
    if dispersion is not None:
        force.setUseDispersionCorrection(dispersion)
    if periodic_exceptions is not None:
        force.setExceptionsUsePeriodicBoundaryConditions(periodic_exceptions)
    return force


def _restricted(force, atoms):
    """A NonbondedForce over ``atoms`` only (renumbered in that order), exceptions among them kept."""
    new = NB()
    new.setNonbondedMethod(force.getNonbondedMethod())
    new.setCutoffDistance(force.getCutoffDistance())
    new.setUseSwitchingFunction(force.getUseSwitchingFunction())
    new.setSwitchingDistance(force.getSwitchingDistance())
    new.setReactionFieldDielectric(force.getReactionFieldDielectric())
    new.setUseDispersionCorrection(False)
    new.setExceptionsUsePeriodicBoundaryConditions(force.getExceptionsUsePeriodicBoundaryConditions())
    index = {int(a): k for k, a in enumerate(atoms)}
    for a in atoms:
        new.addParticle(*force.getParticleParameters(int(a)))
    for k in range(force.getNumExceptions()):
        i, j, qq, s, e = force.getExceptionParameters(k)
        if i in index and j in index:
            new.addException(index[i], index[j], qq, s, e)
    return new


def _without(force, atoms):
    """Copy of ``force`` in which ``atoms`` interact with nothing (charges, epsilons and their exceptions
    zeroed), so that its energy is that of the pairs among the other atoms."""
    force = _copy(force)
    atoms = set(int(a) for a in atoms)
    for i in atoms:
        _, s, _ = force.getParticleParameters(i)
        force.setParticleParameters(i, 0.0, s, 0.0)
    for k in range(force.getNumExceptions()):
        i, j, qq, s, e = force.getExceptionParameters(k)
        if i in atoms or j in atoms:
            force.setExceptionParameters(k, i, j, 0.0, s, 0.0)
    return force


def _assert_matches(native_e, native_f, ref_e, ref_f, rtol=1e-6, atol_f=1e-4):
    scale = max(1.0, np.abs(ref_e).max())
    np.testing.assert_allclose(native_e, ref_e, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(native_f, ref_f, rtol=0, atol=atol_f)


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adp():
    ts = systems.alanine_dipeptide("vacuum")
    return _nonbonded(ts.system), ts.positions_nm


@pytest.fixture(scope="module")
def chignolin():
    ts = systems.chignolin("obc2")
    return _nonbonded(ts.system), ts.positions_nm


@pytest.fixture(scope="module")
def benzene():
    """30 CGenFF benzenes (360 atoms) in a 1.65 nm box; the force is PME with a 0.6-0.7 nm LJ switch."""
    ts = systems.liquid("BENZ", n_molecules=30, density_g_cm3=0.87, cutoff_nm=0.7, switch_nm=0.6)
    return _nonbonded(ts.system), ts.positions_nm, ts.metadata["box_nm"][0]


# -- agreement with OpenMM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adp", "chignolin"])
def test_no_cutoff_matches_openmm(name, request):
    force, x0 = request.getfixturevalue(name)
    assert force.getNonbondedMethod() == NB.NoCutoff
    x = _perturbed(x0)
    energies, forces = _native(Nonbonded.from_force(force, force.getNumParticles()), x)
    _assert_matches(energies["total"], forces["total"], *_reference(force, x))
    for part in ("lj", "coulomb"):
        _assert_matches(energies[part], forces[part], *_reference(_only(force, part), x))


@pytest.mark.parametrize("cutoff, switch", [(0.8, False), (0.3, 0.2)])
def test_cutoff_non_periodic_reaction_field_matches_openmm(adp, cutoff, switch):
    # With a 0.3 nm cutoff many 1-4 exceptions lie beyond it: OpenMM still computes them in full.
    force = _with(adp[0], NB.CutoffNonPeriodic, cutoff, switch)
    force.setReactionFieldDielectric(50.0)
    x = _perturbed(adp[1])
    energies, forces = _native(Nonbonded.from_force(force, force.getNumParticles()), x)
    _assert_matches(energies["total"], forces["total"], *_reference(force, x))
    for part in ("lj", "coulomb"):
        _assert_matches(energies[part], forces[part], *_reference(_only(force, part), x))


@pytest.mark.parametrize("switch", [False, 0.6])
@pytest.mark.parametrize("dispersion", [False, True])
def test_cutoff_periodic_matches_openmm(benzene, switch, dispersion):
    force, x0, edge = benzene
    force = _with(force, NB.CutoffPeriodic, switch=switch, dispersion=dispersion)
    x = _perturbed(x0)
    box = _boxes(edge, len(x))
    energies, forces = _native(Nonbonded.from_force(force, force.getNumParticles()), x, box)
    _assert_matches(energies["total"], forces["total"], *_reference(force, x, box))
    _assert_matches(energies["coulomb"], forces["coulomb"], *_reference(_only(force, "coulomb"), x, box))


@pytest.mark.parametrize("periodic_exceptions", [False, True])
def test_triclinic_box_matches_openmm(benzene, periodic_exceptions):
    force, x0, edge = benzene
    force = _with(force, NB.CutoffPeriodic, dispersion=True, periodic_exceptions=periodic_exceptions)
    x = _perturbed(x0, batch=3)
    box = np.array([[1.5, 0.0, 0.0], [0.4, 1.5, 0.0], [-0.3, 0.5, 1.5]]) * edge
    box = np.stack([box * s for s in (1.0, 1.01, 0.99)])
    energies, forces = _native(Nonbonded.from_force(force, force.getNumParticles()), x, box)
    _assert_matches(energies["total"], forces["total"], *_reference(force, x, box))


def test_exceptions_have_no_cutoff_or_reaction_field():
    """OpenMM computes exceptions as plain Coulomb + Lennard-Jones, even beyond the cutoff."""
    force = NB()
    force.setNonbondedMethod(NB.CutoffNonPeriodic)
    force.setCutoffDistance(0.5)
    force.setReactionFieldDielectric(78.3)
    for charge in (0.5, -0.4, 0.3):
        force.addParticle(charge, 0.3, 0.5)
    force.addException(0, 1, 0.1, 0.25, 0.8)
    # Exception (0, 1) at 0.9 nm, beyond the cutoff; pair (0, 2) at 0.45 nm, inside; pair (1, 2) outside.
    x = np.array([[[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.45, 0.0]]])
    energies, _ = _native(Nonbonded.from_force(force, 3), x)
    k_rf = 77.3 / (157.6 * 0.5**3)
    c_rf = 3 * 78.3 / (157.6 * 0.5)
    pair = ONE_4PI_EPS0 * 0.5 * 0.3 * (1 / 0.45 + k_rf * 0.45**2 - c_rf) + 4 * 0.5 * ((0.3 / 0.45) ** 12
                                                                                    - (0.3 / 0.45) ** 6)
    exception = ONE_4PI_EPS0 * 0.1 / 0.9 + 4 * 0.8 * ((0.25 / 0.9) ** 12 - (0.25 / 0.9) ** 6)
    assert energies["total"][0] == pytest.approx(pair + exception, rel=1e-12)
    assert energies["total"][0] == pytest.approx(_reference(force, x)[0][0], rel=1e-6)


def test_nocutoff_override_evaluates_a_pme_force_in_vacuum(benzene):
    force, x0, _ = benzene
    assert force.getNonbondedMethod() == NB.PME
    x = _perturbed(x0, batch=2)
    term = Nonbonded.from_force(force, force.getNumParticles(), method="nocutoff")
    energies, forces = _native(term, x)
    _assert_matches(energies["total"], forces["total"], *_reference(_with(force, NB.NoCutoff), x))
    with pytest.raises(ValueError, match="nocutoff"):
        Nonbonded.from_force(force, force.getNumParticles(), method="pme")


@pytest.mark.parametrize("method", [NB.Ewald, NB.PME, NB.LJPME], ids=["Ewald", "PME", "LJPME"])
def test_reciprocal_space_methods_are_not_native(adp, method):
    force = _with(adp[0], method)
    with pytest.raises(NotImplementedError, match="OpenMM bridge"):
        Nonbonded.from_force(force, force.getNumParticles())


def test_parameter_offsets_are_not_native(adp):
    force = _copy(adp[0])
    force.addGlobalParameter("lambda", 1.0)
    force.addParticleParameterOffset("lambda", 0, 0.1, 0.0, 0.0)
    with pytest.raises(NotImplementedError, match="parameter offsets"):
        Nonbonded.from_force(force, force.getNumParticles())
    with pytest.raises(NotImplementedError, match="parameter offsets"):
        Nonbonded.from_force(force, force.getNumParticles(), method="nocutoff")


def test_input_errors(adp, benzene):
    with pytest.raises(ValueError, match="particles"):
        Nonbonded.from_force(adp[0], 5)
    force, x0, edge = benzene
    term = Nonbonded.from_force(_with(force, NB.CutoffPeriodic), force.getNumParticles())
    x = torch.tensor(x0[None])
    with pytest.raises(ValueError, match="box vectors"):
        term(x)
    with pytest.raises(ValueError, match="twice the nonbonded cutoff"):
        term(x, torch.eye(3, dtype=torch.float64)[None])
    with pytest.raises(ValueError, match="shape"):
        term(x[:, :10])


# -- gradients, precision, blocks --------------------------------------------------------------------------
@pytest.mark.parametrize("method", [NB.NoCutoff, NB.CutoffPeriodic], ids=["NoCutoff", "CutoffPeriodic"])
def test_forces_are_minus_energy_gradient(adp, method):
    """Central finite differences of the float64 energy, including the switching region."""
    force = _with(adp[0], method, cutoff=0.45, switch=0.3, dispersion=True)
    term = Nonbonded.from_force(force, force.getNumParticles())
    x = torch.tensor(_perturbed(adp[1], batch=1, seed=3))
    box = torch.eye(3, dtype=torch.float64)[None] * 1.2
    _, forces = _native(term, x.numpy(), box.numpy())
    h = 1e-6
    numeric = np.zeros_like(forces["total"])
    for a in range(x.shape[1]):
        for k in range(3):
            plus, minus = x.clone(), x.clone()
            plus[0, a, k] += h
            minus[0, a, k] -= h
            e_plus = sum(term(plus, box).values())
            e_minus = sum(term(minus, box).values())
            numeric[0, a, k] = -(e_plus - e_minus).item() / (2 * h)
    np.testing.assert_allclose(forces["total"], numeric, rtol=1e-6, atol=1e-4)


def test_float32_is_close_to_float64(adp, benzene):
    force, x0, edge = benzene
    force = _with(force, NB.CutoffPeriodic, dispersion=True)
    for f, x, box in ((adp[0], _perturbed(adp[1]), None), (force, _perturbed(x0, batch=2), _boxes(edge, 2))):
        term = Nonbonded.from_force(f, f.getNumParticles())
        e64, f64 = _native(term, x, box, torch.float64)
        term.to(torch.float32)
        assert term.charge.dtype == term.exception_params.dtype == torch.float32
        e32, f32 = _native(term, x, box, torch.float32)
        assert e32["total"].dtype == np.float32
        np.testing.assert_allclose(e32["total"], e64["total"], rtol=0, atol=1e-5 * np.abs(e64["total"]).max())
        np.testing.assert_allclose(f32["total"], f64["total"], rtol=0, atol=1e-4 * np.abs(f64["total"]).max())


@pytest.mark.parametrize("method", [NB.NoCutoff, NB.CutoffPeriodic], ids=["NoCutoff", "CutoffPeriodic"])
def test_blocks_and_checkpointing_give_identical_results(benzene, method):
    force, x0, edge = benzene
    force = _with(force, method)
    x = torch.tensor(_perturbed(x0, batch=2))
    box = torch.tensor(_boxes(edge, 2))
    v = torch.randn_like(x)
    results = []
    for kwargs in ({"pair_block_size": 10**9}, {"pair_block_size": 10000, "max_saved_pairs": 1}):
        term = Nonbonded.from_force(force, force.getNumParticles(), **kwargs)
        pos = x.clone().requires_grad_(True)
        energy = sum(term(pos, box).values())
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=True)
        (hessian_v,) = torch.autograd.grad((grad * v).sum(), pos)
        results.append((len(term._row_blocks(2)), energy.detach(), grad.detach(), hessian_v))
    assert results[0][0] == 1 and results[1][0] > 10
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8)


# -- subsets ---------------------------------------------------------------------------------------------
def test_full_subset_reproduces_the_energy(benzene):
    force, x0, edge = benzene
    force = _with(force, NB.CutoffPeriodic, dispersion=False)
    n = force.getNumParticles()
    term = Nonbonded.from_force(force, n)
    order = np.random.default_rng(1).permutation(n)  # new position k holds atom order[k]
    new_index = np.empty(n, dtype=np.int64)
    new_index[order] = np.arange(n)
    sub = term.subset(new_index, np.ones(n, dtype=bool))
    x = _perturbed(x0, batch=2)
    box = _boxes(edge, 2)
    full, full_f = _native(term, x, box)
    part, part_f = _native(sub, x[:, order], box)
    for name in ("lj", "coulomb"):
        np.testing.assert_allclose(part[name], full[name], rtol=1e-12)
    np.testing.assert_allclose(part_f["total"], full_f["total"][:, order], atol=1e-8)


def test_subset_drops_dispersion_correction(benzene):
    force, x0, edge = benzene
    with_disp = Nonbonded.from_force(_with(force, NB.CutoffPeriodic, dispersion=True), force.getNumParticles())
    without = Nonbonded.from_force(_with(force, NB.CutoffPeriodic, dispersion=False), force.getNumParticles())
    n = force.getNumParticles()
    sub = with_disp.subset(np.arange(n), np.ones(n, dtype=bool))
    x, box = _perturbed(x0, batch=1), _boxes(edge, 1)
    assert _native(sub, x, box)[0]["lj"] == pytest.approx(_native(without, x, box)[0]["lj"], rel=1e-12)
    assert _native(with_disp, x, box)[0]["lj"] != pytest.approx(_native(without, x, box)[0]["lj"], rel=1e-6)


@pytest.mark.parametrize("system", ["adp", "benzene"])
def test_subset_with_environment_matches_openmm(system, adp, benzene):
    """Kept interactions: both atoms in subset ∪ environment, at least one in the subset.  OpenMM:
    E(subset ∪ environment) - E(environment alone)."""
    if system == "adp":
        force, x0 = adp
        box = None
        subset, environment = [4, 5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 11, 12, 13, 14, 15]
    else:
        force, x0, edge = benzene
        force = _with(force, NB.CutoffPeriodic, switch=0.6, dispersion=True)
        box = _boxes(edge, 3)
        rng = np.random.default_rng(2)
        subset = list(range(24, 36))  # the third benzene
        environment = sorted(rng.choice(np.arange(36, force.getNumParticles()), 150, replace=False).tolist())
        environment = list(range(12, 24)) + environment  # a whole molecule and scattered atoms
    n = force.getNumParticles()
    kept = np.array(subset + environment)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[kept] = np.arange(kept.size)
    in_subset = np.zeros(n, dtype=bool)
    in_subset[subset] = True
    term = Nonbonded.from_force(force, n).subset(new_index, in_subset)
    x = _perturbed(x0, batch=3)[:, kept]
    energies, forces = _native(term, x, box)
    restricted = _restricted(force, kept)
    e_all, f_all = _reference(restricted, x, box)
    e_env, f_env = _reference(_without(restricted, range(len(subset))), x, box)
    _assert_matches(energies["total"], forces["total"], e_all - e_env, f_all - f_env)


def test_nested_subsets_match_inclusion_exclusion(adp):
    """Subset of a subset keeps pairs meeting both rules: E = E - E(no S1) - E(no S2) + E(no S1 ∪ S2)."""
    force, x0 = adp
    n = force.getNumParticles()
    kept = np.arange(2, n)
    new_index = np.full(n, -1, dtype=np.int64)
    new_index[kept] = np.arange(kept.size)
    first = np.zeros(n, dtype=bool)
    first[[2, 3, 4, 5, 6, 7, 8]] = True
    term = Nonbonded.from_force(force, n).subset(new_index, first)
    second = np.zeros(kept.size, dtype=bool)
    second[[4, 5, 6, 12, 13, 14]] = True  # new numbering: atoms 6, 7, 8 (also in S1) and 14, 15, 16
    term = term.subset(np.arange(kept.size), second)
    assert term.active.shape[0] == 2
    x = _perturbed(x0, batch=3)[:, kept]
    energies, forces = _native(term, x)
    restricted = _restricted(force, kept)
    s1, s2 = np.flatnonzero(first[kept]), np.flatnonzero(second)
    expected = [_reference(f, x) for f in (restricted, _without(restricted, s1), _without(restricted, s2),
                                           _without(restricted, np.union1d(s1, s2)))]
    e = expected[0][0] - expected[1][0] - expected[2][0] + expected[3][0]
    f = expected[0][1] - expected[1][1] - expected[2][1] + expected[3][1]
    _assert_matches(energies["total"], forces["total"], e, f)


def test_subset_without_pairs_is_none(adp):
    force = adp[0]
    n = force.getNumParticles()
    term = Nonbonded.from_force(force, n)
    single = np.full(n, -1, dtype=np.int64)
    single[5] = 0
    assert term.subset(single, np.ones(n, dtype=bool)) is None
    two = np.full(n, -1, dtype=np.int64)
    two[[5, 18]] = [0, 1]
    assert term.subset(two, np.zeros(n, dtype=bool)) is None
    assert term.subset(two, np.arange(n) == 5) is not None
