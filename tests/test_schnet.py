"""Neighbour pairs (minimum image, cell grid) and the SchNet CG potential: invariances, smoothness at the
cutoff, exact forces, TorchScript, rebuilding from its config, and the TorchForce path in OpenMM."""
import itertools
import json
from typing import Tuple

import numpy as np
import pytest
import torch

from openmm_backmap.potential.neighbors import minimum_image, neighbor_pairs
from openmm_backmap.potential.schnet import SchNet

ORTHO = np.diag([2.4, 2.1, 2.6])
# OpenMM's reduced triclinic form: |b_x| <= a_x / 2, |c_x| <= a_x / 2, |c_y| <= b_y / 2.
TRICLINIC = np.array([[2.4, 0.0, 0.0], [0.9, 2.2, 0.0], [-1.1, 1.0, 2.3]])
TYPES = [0, 1, 2, 1, 0, 3]  # alanine-dipeptide-like: 6 beads, two pairs of identical types
CUTOFF = 0.8


def _in_box(rng, box, n_batch, n_beads):
    """Positions ``(B, n, 3)`` uniform in the box."""
    return rng.random((n_batch, n_beads, 3)) @ box


def _brute_force(positions, cutoff, box=None, exclusions=()):
    """{(b, i, j): r_j - r_i} of the shortest image among 5^3 lattice shifts, for pairs closer than cutoff."""
    excluded = {tuple(sorted(p)) for p in exclusions}
    lattice = (np.array(list(itertools.product(range(-2, 3), repeat=3))) @ box) if box is not None else np.zeros((1, 3))
    pairs = {}
    for b, x in enumerate(positions):
        for i, j in itertools.combinations(range(len(x)), 2):
            images = x[j] - x[i] + lattice
            best = images[np.argmin(np.linalg.norm(images, axis=1))]
            if np.linalg.norm(best) < cutoff and (i, j) not in excluded:
                pairs[(b, i, j)] = best
    return pairs


def _as_dict(result):
    batch, i, j, displacement, distance = (t.detach().numpy() for t in result)
    np.testing.assert_allclose(distance, np.linalg.norm(displacement, axis=1), rtol=1e-12)
    assert (i < j).all()
    keys = list(zip(batch.tolist(), i.tolist(), j.tolist()))
    assert len(set(keys)) == len(keys), "duplicate pairs"
    return dict(zip(keys, displacement))


def _assert_same_pairs(found, expected):
    assert found.keys() == expected.keys()
    for key, d in expected.items():
        np.testing.assert_allclose(found[key], d, atol=1e-10)


# ---------------------------------------------------------------------------------------------- neighbours
@pytest.mark.parametrize("strategy", ["all", "grid"])
@pytest.mark.parametrize("box", [None, ORTHO, TRICLINIC], ids=["none", "orthorhombic", "triclinic"])
def test_neighbor_pairs_match_brute_force_minimum_image(strategy, box):
    rng = np.random.default_rng(1)
    n_batch, n_beads, cutoff = 3, 40, 0.9
    exclusions = [[3, 1], [0, 5], [7, 8], [12, 30]]
    if box is None:
        base = rng.normal(scale=0.8, size=(n_batch, n_beads, 3))
        moved, boxes = base, None
    else:
        base = _in_box(rng, box, n_batch, n_beads)
        # beads scattered several box vectors away: no wrapping is assumed
        moved = base + rng.integers(-6, 7, size=(n_batch, n_beads, 3)) @ box
        boxes = torch.tensor(np.repeat(box[None], n_batch, axis=0))
    expected = _brute_force(base, cutoff, box, exclusions)
    assert len(expected) > 50
    result = neighbor_pairs(torch.tensor(moved), cutoff, boxes, torch.tensor(exclusions), strategy)
    _assert_same_pairs(_as_dict(result), expected)


def test_neighbor_pairs_scripted_with_per_configuration_boxes():
    rng = np.random.default_rng(2)
    boxes = np.stack([TRICLINIC, ORTHO, 1.2 * TRICLINIC])
    base = np.concatenate([_in_box(rng, b, 1, 30) for b in boxes])
    moved = base + np.einsum("bnk,bkc->bnc", rng.integers(-4, 5, size=base.shape), boxes)
    expected = _brute_force(base[:1], 1.0, boxes[0])
    for b in (1, 2):
        expected.update({(b, i, j): d for (_, i, j), d in _brute_force(base[b:b + 1], 1.0, boxes[b]).items()})
    scripted = torch.jit.script(neighbor_pairs)
    for strategy in ("all", "grid"):
        result = scripted(torch.tensor(moved), 1.0, torch.tensor(boxes), None, strategy, 800)
        _assert_same_pairs(_as_dict(result), expected)
    # one (3, 3) box shared by the batch
    shared = neighbor_pairs(torch.tensor(base[:2]), 1.0, torch.tensor(TRICLINIC))
    _assert_same_pairs(_as_dict(shared), {k: v for k, v in _brute_force(base[:2], 1.0, TRICLINIC).items()})


def test_neighbor_grid_agrees_with_all_pairs_for_2500_beads():
    rng = np.random.default_rng(3)
    box = np.diag([5.0, 5.2, 4.8])  # ~21 beads/nm^3, about CG benzene (3 beads/molecule)
    x = torch.tensor(_in_box(rng, box, 1, 2500) + 3 * box[0])
    grid = _as_dict(neighbor_pairs(x, CUTOFF, torch.tensor(box[None]), strategy="auto"))
    full = _as_dict(neighbor_pairs(x, CUTOFF, torch.tensor(box[None]), strategy="all"))
    assert len(grid) > 10000
    _assert_same_pairs(grid, full)
    cluster = torch.tensor(rng.normal(scale=2.0, size=(2, 2500, 3)))  # no box: grid over the bounding box
    _assert_same_pairs(_as_dict(neighbor_pairs(cluster, CUTOFF, None, strategy="grid")),
                       _as_dict(neighbor_pairs(cluster, CUTOFF, None, strategy="all")))


def test_neighbor_gradients_exact_and_finite():
    x = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [5.0, 0.0, 0.0]]],
                     dtype=torch.float64, requires_grad=True)
    _, i, j, _, distance = neighbor_pairs(x, 1.0)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    (grad,) = torch.autograd.grad(distance.sum(), x)
    assert torch.isfinite(grad).all()  # coincident beads 0 and 1: zero gradient, not NaN
    np.testing.assert_allclose(grad[0, 2].numpy(), 2 * np.array([0.6, 0.8, 0.0]))
    np.testing.assert_allclose(grad[0, 3].numpy(), 0.0)


def test_minimum_image_and_invalid_box():
    box = torch.tensor(TRICLINIC)
    delta = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    shifted = delta + torch.tensor([3.0, -2.0, 5.0], dtype=torch.float64) @ box
    np.testing.assert_allclose(minimum_image(shifted, box).numpy(), delta.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="half the periodic box"):
        neighbor_pairs(torch.zeros(1, 2, 3, dtype=torch.float64), 1.2, box[None])
    with pytest.raises(ValueError, match="strategy"):
        neighbor_pairs(torch.zeros(1, 2, 3), 0.5, None, None, "cells")


# ------------------------------------------------------------------------------------------------- SchNet
def _model(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    return SchNet(TYPES, **{"hidden": 32, "n_rbf": 16, "cutoff_nm": CUTOFF, **kwargs}).to(dtype)


def _positions(n_batch=4, seed=5, scale=0.3):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(scale=scale, size=(n_batch, len(TYPES), 3)))


def _energy_forces(model, x, box=None):
    x = x.clone().requires_grad_(True)
    energy = model(x, box)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), -grad


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return torch.tensor(q * np.linalg.det(q))


def test_energy_invariant_to_rotation_translation_and_images():
    model = _model()
    x = _positions()
    energy = model(x)
    assert energy.shape == (4,) and energy.dtype == torch.float64 and energy.std() > 1e-3
    rng = np.random.default_rng(6)
    moved = x @ _rotation(rng).T + torch.tensor(rng.normal(size=(4, 1, 3)))
    torch.testing.assert_close(model(moved), energy, rtol=1e-10, atol=1e-10)
    box = torch.tensor(np.repeat(TRICLINIC[None], 4, axis=0))
    periodic = model(x, box)
    torch.testing.assert_close(periodic, energy)  # compact beads: no pair crosses the boundary
    shifts = torch.tensor(rng.integers(-3, 4, size=(4, 6, 3)), dtype=torch.float64) @ box
    torch.testing.assert_close(model(x + shifts, box), energy, rtol=1e-10, atol=1e-10)
    # a configuration that straddles the boundary sees the images, and any bead shift by a box vector
    straddling = x + torch.tensor(TRICLINIC[0] * 0.5 + TRICLINIC[1] * 0.5)
    wrapped = straddling - torch.floor(straddling @ torch.linalg.inv(box)) @ box
    torch.testing.assert_close(model(wrapped, box), energy, rtol=1e-10, atol=1e-10)


def test_energy_invariant_to_permuting_beads_of_a_type():
    model = _model(exclusions=[[0, 1], [1, 2]])
    x = _positions()
    swap = [4, 3, 2, 1, 0, 5]  # types (0, 1, 2, 1, 0, 3): beads 0<->4 and 1<->3 are alike
    permuted = model.config()
    permuted["exclusions"] = [[4, 3], [3, 2]]
    twin = SchNet(**permuted).double()
    twin.load_state_dict(model.state_dict())
    torch.testing.assert_close(twin(x[:, swap]), model(x), rtol=1e-10, atol=1e-10)
    # an arbitrary permutation with the types permuted alike
    order = [5, 2, 0, 3, 1, 4]
    config = model.config()
    config["bead_types"] = [TYPES[k] for k in order]
    config["exclusions"] = [[order.index(0), order.index(1)], [order.index(1), order.index(2)]]
    shuffled = SchNet(**config).double()
    shuffled.load_state_dict(model.state_dict())  # weights only: types and exclusions come from the config
    torch.testing.assert_close(shuffled(x[:, order]), model(x), rtol=1e-10, atol=1e-10)


def test_energy_and_forces_vanish_smoothly_at_the_cutoff():
    torch.manual_seed(0)
    model = SchNet([0, 1], hidden=32, n_rbf=16, cutoff_nm=CUTOFF).double()

    def pair(r):
        return torch.tensor([[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]], dtype=torch.float64)

    isolated, forces = _energy_forces(model, pair(5.0))
    assert forces.abs().max() == 0
    scale = max(abs(float(_energy_forces(model, pair(r))[0] - isolated)) for r in (0.3, 0.4, 0.5))
    force_scale = max(float(_energy_forces(model, pair(r))[1].abs().max()) for r in (0.3, 0.4, 0.5))
    assert scale > 1e-3 and force_scale > 1e-3
    for eps in (1e-3, 1e-4):
        energy, forces = _energy_forces(model, pair(CUTOFF - eps))
        assert abs(float(energy - isolated)) < 10 * scale * eps ** 2  # envelope ~ (pi eps / 2 r_c)^2
        assert float(forces.abs().max()) < 10 * force_scale * eps
    energy, forces = _energy_forces(model, pair(CUTOFF + 1e-9))
    assert float(energy - isolated) == 0 and forces.abs().max() == 0


@pytest.mark.parametrize("activation,rbf_min", [("ssp", 0.0), ("silu", 0.0), ("tanh", 0.0), ("ssp", 0.45)])
def test_forces_match_finite_differences_and_analytic_path(activation, rbf_min):
    model = _model(activation=activation, exclusions=[[0, 1]], rbf_min_nm=rbf_min)
    if rbf_min:  # some pairs inside the inner switch, some below it
        r = model._graph(_positions(n_batch=2) + torch.tensor(TRICLINIC[0] * 0.5), None)[3]
        assert bool(((r > model.inner_start) & (r < rbf_min)).any()) and bool((r < model.inner_start).any())
    box = torch.tensor(TRICLINIC)
    x = _positions(n_batch=2) + torch.tensor(TRICLINIC[0] * 0.5)  # some pairs across the boundary
    for cell in (None, box):
        energy, forces = _energy_forces(model, x, cell)
        h = 1e-5
        numeric = torch.zeros_like(x)
        for b, i, k in itertools.product(range(2), range(6), range(3)):
            step = torch.zeros_like(x)
            step[b, i, k] = h
            numeric[b, i, k] = -(model(x + step, cell)[b] - model(x - step, cell)[b]) / (2 * h)
        torch.testing.assert_close(forces, numeric, rtol=1e-6, atol=1e-8)
        analytic_energy, analytic_forces = model.energy_and_forces(x, cell)
        torch.testing.assert_close(analytic_energy, energy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(analytic_forces, forces, rtol=1e-10, atol=1e-12)


def test_scripted_matches_eager_and_config_rebuilds():
    model = _model(exclusions=[[2, 3]], activation="silu", n_interactions=2, rbf_min_nm=0.2)
    x, box = _positions(), torch.tensor(TRICLINIC)
    scripted = torch.jit.script(model)
    for cell in (None, box):
        energy, forces = _energy_forces(model, x, cell)
        scripted_energy, scripted_forces = _energy_forces(scripted, x, cell)
        torch.testing.assert_close(scripted_energy, energy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scripted_forces, forces, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scripted.energy_and_forces(x, cell)[1], forces, rtol=1e-10, atol=1e-12)
    config = json.loads(json.dumps(model.config()))
    rebuilt = SchNet(**config).double()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x, box), model(x, box), rtol=0, atol=0)
    assert rebuilt.config() == model.config()


def test_dtypes_and_no_pairs():
    model = _model(dtype=torch.float32)
    x = _positions()
    energy64 = model(x)  # float32 network, float64 positions: energies in float64
    assert energy64.dtype == torch.float64
    energy32 = model(x.float())
    assert energy32.dtype == torch.float32
    torch.testing.assert_close(energy32.double(), energy64, rtol=1e-6, atol=1e-6)
    apart = torch.arange(18, dtype=torch.float64).view(1, 6, 3) * 10.0  # no pair within the cutoff
    model = _model()
    energy, forces = model.energy_and_forces(apart)
    assert forces.abs().max() == 0 and torch.isfinite(energy).all()
    torch.testing.assert_close(_energy_forces(model, apart)[0], energy)
    with pytest.raises(ValueError, match="n_beads"):
        model(torch.zeros(1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation"):
        SchNet(TYPES, activation="relu")


# -------------------------------------------------------------------------------------------- TorchForce
class _Energy(torch.nn.Module):
    def __init__(self, model: SchNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.model(positions[None], None)[0]


class _PeriodicEnergy(_Energy):
    def forward(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return self.model(positions[None], box[None])[0]


class _EnergyForces(_Energy):
    def forward(self, positions: torch.Tensor, box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        energy, forces = self.model.energy_and_forces(positions[None], box[None])
        return energy[0], forces[0]


@pytest.mark.parametrize("wrapper", [_Energy, _PeriodicEnergy, _EnergyForces])
def test_torchforce_matches_eager_model(wrapper):
    from openmm_backmap._openmmtorch import import_openmmtorch

    openmmtorch = import_openmmtorch()
    import openmm
    from openmm import unit

    model = _model(hidden=64, n_rbf=32)
    periodic = wrapper is not _Energy
    x = _positions(n_batch=1)[0] + torch.tensor(TRICLINIC[0] * 0.5 + TRICLINIC[2] * 0.45)
    if periodic:
        x = x + torch.tensor(np.array([[2, -1, 0], [0, 3, 1], [-4, 0, 2], [1, 1, 1], [0, 0, -2], [5, -3, 0]])
                             @ TRICLINIC)
    force = openmmtorch.TorchForce(torch.jit.script(wrapper(model)))
    force.setUsesPeriodicBoundaryConditions(periodic)
    force.setOutputsForces(wrapper is _EnergyForces)
    system = openmm.System()
    for _ in TYPES:
        system.addParticle(12.0)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in TRICLINIC])
    system.addForce(force)
    box = torch.tensor(TRICLINIC)[None] if periodic else None
    energy, forces = _energy_forces(model, x[None], box)
    for platform in ("Reference", "CPU"):
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
        context.setPositions(x.numpy())
        state = context.getState(getEnergy=True, getForces=True)
        omm_energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        omm_forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        assert omm_energy == pytest.approx(float(energy[0]), rel=1e-5)
        np.testing.assert_allclose(omm_forces, forces[0].numpy(), rtol=1e-5, atol=1e-5 * float(forces.abs().max()))
