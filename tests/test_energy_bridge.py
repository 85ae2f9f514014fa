"""The OpenMM bridge: exact energies and forces of any force through a Context, as a torch op."""
import pickle

import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.energy.bridge import OpenMMBridge

KJ = u.kilojoule_per_mole
KJ_NM = KJ / u.nanometer


def _reference(system, positions, box=None, force_indices=None):
    """Energy and forces of selected forces by OpenMM's Reference platform."""
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    for i, f in enumerate(system.getForces()):
        f.setForceGroup(0 if force_indices is None or i in force_indices else 1)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    out_e, out_f = [], []
    for b in range(len(positions)):
        if box is not None:
            ctx.setPeriodicBoxVectors(*box[b])
        ctx.setPositions(positions[b])
        s = ctx.getState(getEnergy=True, getForces=True, groups={0})
        out_e.append(s.getPotentialEnergy().value_in_unit(KJ))
        out_f.append(s.getForces(asNumpy=True).value_in_unit(KJ_NM))
    return np.array(out_e), np.array(out_f)


def _perturbed(test_system, batch=3, sigma=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = test_system.minimized(max_iterations=200).positions_nm
    return x[None] + rng.normal(scale=sigma, size=(batch,) + x.shape)


def _index_of(system, cls):
    return [i for i, f in enumerate(system.getForces()) if isinstance(f, cls)]


@pytest.mark.parametrize("solvent", ["obc2", "gbn2"])
def test_bridge_matches_openmm_for_implicit_solvent(solvent):
    ts = systems.alanine_dipeptide(solvent)
    gb = [i for i, f in enumerate(ts.system.getForces()) if "GB" in type(f).__name__]
    assert gb, "the implicit-solvent system must have a GB force"
    x = _perturbed(ts)
    bridge = OpenMMBridge(ts.system, gb, platform="Reference")
    pos = torch.tensor(x, requires_grad=True)
    energies = bridge(pos)
    assert set(energies) == {"gb"}
    ref_e, ref_f = _reference(ts.system, x, force_indices=gb)
    np.testing.assert_allclose(energies["gb"].detach().numpy(), ref_e, rtol=1e-10)
    (grad,) = torch.autograd.grad(energies["gb"].sum(), pos)
    np.testing.assert_allclose(-grad.numpy(), ref_f, rtol=1e-10, atol=1e-10)


def test_bridge_splits_pme_nonbonded_into_lj_and_coulomb():
    ts = systems.alanine_dipeptide("tip3p")
    nb = _index_of(ts.system, openmm.NonbondedForce)
    x = _perturbed(ts, batch=2, sigma=0.005)
    box = np.array([np.asarray(ts.topology.getPeriodicBoxVectors().value_in_unit(u.nanometer))] * 2)
    bridge = OpenMMBridge(ts.system, nb, platform="Reference")
    assert bridge.periodic
    pos = torch.tensor(x, requires_grad=True)
    e = bridge(pos, torch.tensor(box))
    assert set(e) == {"lj", "coulomb"}
    ref_e, ref_f = _reference(ts.system, x, box, force_indices=nb)
    total = e["lj"] + e["coulomb"]
    np.testing.assert_allclose(total.detach().numpy(), ref_e, rtol=1e-8)
    (grad,) = torch.autograd.grad(total.sum(), pos)
    np.testing.assert_allclose(-grad.numpy(), ref_f, rtol=1e-6, atol=1e-6)
    # the LJ part is the energy with charges switched off
    no_charge = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(ts.system))
    f = no_charge.getForce(nb[0])
    for i in range(f.getNumParticles()):
        q, s, eps = f.getParticleParameters(i)
        f.setParticleParameters(i, 0, s, eps)
    for k in range(f.getNumExceptions()):
        i, j, qq, s, eps = f.getExceptionParameters(k)
        f.setExceptionParameters(k, i, j, 0, s, eps)
    lj_e, _ = _reference(no_charge, x, box, force_indices=nb)
    np.testing.assert_allclose(e["lj"].detach().numpy(), lj_e, rtol=1e-8)
    with pytest.raises(ValueError, match="periodic"):
        bridge(pos)


def test_bridge_gradient_weights_and_context_reuse():
    ts = systems.alanine_dipeptide("obc2")
    gb = [i for i, f in enumerate(ts.system.getForces()) if "GB" in type(f).__name__]
    bridge = OpenMMBridge(ts.system, gb)
    x = torch.tensor(_perturbed(ts, batch=2), requires_grad=True)
    e = bridge(x)["gb"]
    w = torch.tensor([2.0, -0.5], dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * e).sum(), x)
    _, ref_f = _reference(ts.system, x.detach().numpy(), force_indices=gb)
    np.testing.assert_allclose(grad.numpy(), -w.numpy()[:, None, None] * ref_f, rtol=1e-10, atol=1e-10)
    context = bridge.context
    bridge(x)
    assert bridge.context is context  # one Context per process, reused
    clone = pickle.loads(pickle.dumps(bridge))  # DataLoader workers: picklable, Context rebuilt lazily
    np.testing.assert_allclose(clone(x)["gb"].detach().numpy(), e.detach().numpy())
    # float32 in, float32 out
    e32 = bridge(x.detach().float())["gb"]
    assert e32.dtype == torch.float32
    np.testing.assert_allclose(e32.numpy(), e.detach().numpy(), rtol=1e-5)


def test_bridge_refuses_empty_force_list():
    ts = systems.alanine_dipeptide("vacuum")
    with pytest.raises(ValueError):
        OpenMMBridge(ts.system, [])
