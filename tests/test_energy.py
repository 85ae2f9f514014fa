"""AAEnergy against OpenMM's Reference platform on whole test systems."""
import numpy as np
import openmm.unit as u
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.energy import AAEnergy

from helpers import openmm_reference



def _configs(ts, batch=3, sigma=0.01, seed=1):
    x = ts.minimized(max_iterations=200).positions_nm
    rng = np.random.default_rng(seed)
    return x[None] + rng.normal(scale=sigma, size=(batch,) + x.shape)


def _box(ts, batch):
    vectors = ts.topology.getPeriodicBoxVectors()
    if vectors is None:
        return None
    return np.repeat(np.asarray(vectors.value_in_unit(u.nanometer))[None], batch, axis=0)


CASES = {
    "ala2-vacuum": lambda: systems.alanine_dipeptide("vacuum"),
    "ala2-obc2": lambda: systems.alanine_dipeptide("obc2"),
    "ala2-gbn2": lambda: systems.alanine_dipeptide("gbn2"),
    "ala2-tip3p": lambda: systems.alanine_dipeptide("tip3p"),
    "chignolin-obc2": lambda: systems.chignolin("obc2"),
    "benzene-box": lambda: systems.liquid("BENZ", n_molecules=40, cutoff_nm=0.7, switch_nm=0.6),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    ts = CASES[request.param]()
    x = _configs(ts, batch=2 if ts.topology.getPeriodicBoxVectors() is not None else 3)
    return request.param, ts, x, _box(ts, len(x))


def test_energy_and_forces_match_openmmopenmm_reference(case):
    name, ts, x, box = case
    energy = AAEnergy(ts.system)
    ref_e, ref_f = openmm_reference(ts.system, x, box)
    tbox = None if box is None else torch.tensor(box)
    e, f = energy.energy_and_forces(torch.tensor(x), tbox)
    pme = box is not None
    np.testing.assert_allclose(e.numpy(), ref_e, rtol=1e-6 if not pme else 1e-5)
    np.testing.assert_allclose(f.numpy(), ref_f, atol=1e-4 if not pme else 1e-3, rtol=1e-6)
    terms = energy.terms(torch.tensor(x), tbox)
    np.testing.assert_allclose(sum(terms.values()).numpy(), e.numpy(), rtol=1e-12)
    assert {"bond", "angle", "torsion", "lj", "coulomb"} <= set(terms), name
    if "obc2" in name or "gbn2" in name:
        assert "gb" in terms


def test_native_vacuum_needs_no_bridge_and_matches_finite_differences():
    ts = systems.alanine_dipeptide("vacuum")
    energy = AAEnergy(ts.system, bridge=False)
    assert energy.bridge is None
    x = torch.tensor(_configs(ts, batch=1))
    f = energy.forces(x)
    h = 1e-6
    for atom, dim in [(0, 0), (7, 1), (14, 2), (21, 0)]:
        xp, xm = x.clone(), x.clone()
        xp[0, atom, dim] += h
        xm[0, atom, dim] -= h
        fd = -(energy(xp) - energy(xm)) / (2 * h)
        assert float(f[0, atom, dim]) == pytest.approx(float(fd), rel=1e-5, abs=1e-4)


def test_float32_close_to_float64():
    ts = systems.chignolin("obc2")
    x = _configs(ts, batch=2)
    e64 = AAEnergy(ts.system)(torch.tensor(x))
    energy32 = AAEnergy(ts.system).to(torch.float32)
    e32 = energy32(torch.tensor(x, dtype=torch.float32))
    assert e32.dtype == torch.float32
    np.testing.assert_allclose(e32.numpy(), e64.numpy(), rtol=1e-4, atol=0.05)


def test_subset_and_complement_add_up_to_openmm_total():
    ts = systems.chignolin("vacuum")
    energy = AAEnergy(ts.system, bridge=False)
    x = _configs(ts, batch=2)
    ref_e, _ = openmm_reference(ts.system, x)
    n = ts.system.getNumParticles()
    rng = np.random.default_rng(3)
    sub = np.sort(rng.choice(n, size=40, replace=False))
    rest = np.setdiff1d(np.arange(n), sub)
    with_env = energy.subset(sub, environment=rest)     # everything touching the subset
    inside_rest = energy.subset(rest)                    # everything inside the complement
    xs = torch.tensor(x)
    total = with_env(xs[:, np.concatenate([sub, rest])]) + inside_rest(xs[:, rest])
    np.testing.assert_allclose(total.numpy(), ref_e, rtol=1e-9)
    # the whole system as a subset is the whole energy
    np.testing.assert_allclose(energy.subset(np.arange(n))(xs).numpy(), ref_e, rtol=1e-9)
    # subset + environment order is honoured: subset atoms first
    perm = rng.permutation(n)
    np.testing.assert_allclose(energy.subset(perm)(xs[:, perm]).numpy(), ref_e, rtol=1e-9)


def test_solute_of_explicit_water_system_is_the_vacuum_energy():
    wet = systems.alanine_dipeptide("tip3p")
    dry = systems.alanine_dipeptide("vacuum")
    energy = AAEnergy(wet.system)
    solute_energy, solute = energy.solute(wet.topology)
    assert len(solute) == 22 and not solute_energy.periodic
    x = _configs(wet, batch=2)[:, solute]
    ref_e, ref_f = openmm_reference(dry.system, x)
    e, f = solute_energy.energy_and_forces(torch.tensor(x))
    np.testing.assert_allclose(e.numpy(), ref_e, rtol=1e-9)
    np.testing.assert_allclose(f.numpy(), ref_f, atol=1e-6)


def test_routing_and_refusals():
    obc = systems.alanine_dipeptide("obc2")
    energy = AAEnergy(obc.system)
    text = energy.describe()
    assert "NonbondedForce: native" in text and "OpenMM bridge" in text and "CMMotionRemover: skipped" in text
    gb_name = energy.bridge.force_names[0]
    with pytest.raises(ValueError, match=gb_name):
        AAEnergy(obc.system, bridge=False)
    no_gb = AAEnergy(obc.system, bridge=False, exclude={gb_name})
    assert "gb" not in no_gb.categories
    with pytest.raises(ValueError, match="exclude names forces"):
        AAEnergy(obc.system, exclude={"NoSuchForce"})
    with pytest.raises(ValueError, match="bridge"):
        energy.subset([0, 1, 2])
    with pytest.raises(TypeError):
        AAEnergy("not a system")


def test_bad_input_errors():
    ts = systems.alanine_dipeptide("vacuum")
    energy = AAEnergy(ts.system)
    good = torch.tensor(ts.positions_nm)[None]
    with pytest.raises(ValueError, match=r"\(B, 22, 3\)"):
        energy(good[:, :20])
    with pytest.raises(ValueError, match=r"\(B, 22, 3\)"):
        energy(good[0])
    bad = good.clone()
    bad[0, 5, 1] = float("nan")
    with pytest.raises(ValueError, match="atom 5"):
        energy(bad)
    with pytest.raises(TypeError, match="float32"):
        energy(good.float())
    with pytest.raises(ValueError, match="meta"):
        energy(torch.empty(1, 22, 3, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        energy(ts.positions_nm[None])
    wet = systems.liquid("BENZ", n_molecules=30, cutoff_nm=0.6, switch_nm=0.5)
    periodic = AAEnergy(wet.system)
    with pytest.raises(ValueError, match="box"):
        periodic(torch.tensor(wet.positions_nm)[None])
    with pytest.raises(ValueError, match="indices"):
        energy.subset([0, 99])
    with pytest.raises(ValueError, match="overlap"):
        energy.subset([0, 1], environment=[1, 2])
