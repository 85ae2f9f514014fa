"""CG priors: energies by hand, autograd forces, analytic forces (and CGPotential's MD path) against autograd,
float32, TorchScript, config round trips, periodic boxes, Boltzmann-inversion recovery of known parameters,
topology helpers and input checks."""
import io
import json
import math
from typing import Optional

import mdtraj as md
import numpy as np
import pytest
import torch

from openmm_backmap.potential import priors as priors_module
from openmm_backmap.potential.priors import (
    BOLTZMANN_KJ_MOL_K,
    ExcludedVolumePrior,
    FourierDihedralPrior,
    HarmonicAnglePrior,
    CosineAnglePrior,
    HarmonicBondPrior,
    _dihedrals,
    angles_from_bonds,
    dihedrals_from_bonds,
    fit_priors,
    nonbonded_pairs,
    prior_from_dict,
    prior_to_dict,
)

T = 300.0
KT = BOLTZMANN_KJ_MOL_K * T
CHAIN = [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
ORTHORHOMBIC = np.diag([2.1, 2.4, 2.7])
#: Reduced triclinic box (a along x, b in the xy plane, |b_x| <= a_x/2, |c_x| <= a_x/2, |c_y| <= b_y/2).
TRICLINIC = np.array([[2.2, 0.0, 0.0], [0.7, 2.1, 0.0], [-0.9, 0.8, 2.3]])


def _chain_frames(n_frames: int, seed: int = 0, noise: float = 0.03) -> np.ndarray:
    """A zig-zag 6-bead chain (bonds ~0.38 nm, within a 0.9 nm ball) with Gaussian noise, ``(F, 6, 3)`` nm."""
    rng = np.random.default_rng(seed)
    base = np.array([[0.0, 0.0, 0.0], [0.30, 0.22, 0.05], [0.58, 0.0, 0.15],
                     [0.62, 0.30, 0.38], [0.35, 0.42, 0.60], [0.10, 0.25, 0.75]])
    return base + rng.normal(scale=noise, size=(n_frames, 6, 3))


def _priors() -> dict:
    """One prior of each kind on the 6-bead chain, with generic parameters."""
    angles = angles_from_bonds(CHAIN)
    dihedrals = dihedrals_from_bonds(CHAIN)
    return {
        "bond": HarmonicBondPrior(CHAIN, [0.35, 0.38, 0.40, 0.36, 0.39], [3000.0, 2500.0, 1000.0, 4000.0, 500.0]),
        "angle": HarmonicAnglePrior(angles, [1.9, 2.1, 1.7, 2.5], [40.0, 80.0, 20.0, 60.0]),
        "angle_cosine": CosineAnglePrior(angles, [[3.0, -4.0, 2.5, 1.0], [0.5, 6.0, -1.0, 0.3],
                                                 [-2.0, 1.5, 3.5, -2.5], [1.0, -3.0, -2.0, 4.0]]),
        "dihedral": FourierDihedralPrior(dihedrals, [[1.2, -0.5, 0.3], [0.4, 0.9, -0.2], [-1.0, 0.1, 0.6]],
                                         [[0.2, 0.0, -0.7], [-0.3, 0.5, 0.1], [0.8, -0.4, 0.0]]),
        "excluded": ExcludedVolumePrior(n_beads=6, bonds=CHAIN, sigma_nm=[0.30, 0.35, 0.32, 0.28, 0.4, 0.45],
                                        exponent=12, cutoff_nm=0.9),
        "excluded_typed": ExcludedVolumePrior([[0, 3], [0, 5], [1, 4], [2, 5], [1, 5]], exponent=7,
                                              bead_types=["C", "N", "C", "N", "O", "C"],
                                              sigma_nm=[[0.30, 0.28, 0.26], [0.28, 0.32, 0.3], [0.26, 0.3, 0.25]]),
    }


PRIOR_NAMES = ["bond", "angle", "angle_cosine", "dihedral", "excluded", "excluded_typed"]


def _energy(prior, xyz: np.ndarray, box=None, dtype=torch.float64) -> np.ndarray:
    box_t = None if box is None else torch.tensor(np.broadcast_to(box, (len(xyz), 3, 3)), dtype=dtype)
    with torch.no_grad():
        return prior(torch.as_tensor(xyz, dtype=dtype), box_t).numpy()


# ---------------------------------------------------------------------------------------- hand values
def test_bond_energy_by_hand():
    prior = HarmonicBondPrior([[0, 1], [1, 2]], [0.3, 0.4], [100.0, 200.0])
    xyz = np.array([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, 0.3, 0.4]]])
    np.testing.assert_allclose(_energy(prior, xyz), [0.5 * 100 * 0.2**2 + 0.5 * 200 * 0.1**2], rtol=1e-14)


def test_angle_energy_by_hand_and_finite_force_when_linear():
    prior = HarmonicAnglePrior([[0, 1, 2]], [1.9], [30.0])
    thetas = np.array([0.3, 1.9, 2.6, math.pi])
    xyz = np.zeros((len(thetas), 3, 3))
    xyz[:, 0] = [0.4, 0.0, 0.0]
    xyz[:, 2] = 0.35 * np.stack([np.cos(thetas), np.sin(thetas), np.zeros_like(thetas)], axis=1)
    xyz += [1.0, -2.0, 0.5]
    np.testing.assert_allclose(_energy(prior, xyz), 15.0 * (thetas - 1.9) ** 2, rtol=1e-12, atol=1e-12)
    x = torch.tensor(xyz, requires_grad=True)
    prior(x, None).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dihedral_energy_by_hand_and_iupac_sign():
    phis = np.array([-2.5, -1.0, 0.0, 0.7, 2.0, 3.1])
    xyz = np.zeros((len(phis), 4, 3))
    xyz[:, 0] = [0.4, 0.0, 0.0]
    xyz[:, 2] = [0.0, 0.0, 0.4]
    xyz[:, 3] = np.stack([0.3 * np.cos(phis), 0.3 * np.sin(phis), np.full_like(phis, 0.4)], axis=1)
    a, b = [1.2, -0.5], [0.3, 0.8]
    prior = FourierDihedralPrior([[0, 1, 2, 3]], [a], [b])
    expected = sum(a[n] * np.cos((n + 1) * phis) + b[n] * np.sin((n + 1) * phis) for n in range(2))
    np.testing.assert_allclose(_energy(prior, xyz), expected, rtol=1e-12, atol=1e-12)
    # Same sign convention as mdtraj (and OpenMM) on random configurations.
    random = _chain_frames(20, seed=3, noise=0.15)
    quads = dihedrals_from_bonds(CHAIN)
    ours = _dihedrals(torch.tensor(random), torch.tensor(quads), None).numpy()
    top = md.Topology()
    residue = top.add_residue("CG", top.add_chain())
    for i in range(6):
        top.add_atom(f"B{i}", md.element.carbon, residue)
    theirs = md.compute_dihedrals(md.Trajectory(random, top), quads)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_excluded_volume_energy_by_hand():
    xyz = np.array([[[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.0, 0.9, 0.0]]])
    r = {(0, 1): 0.4, (0, 2): 0.9, (1, 2): math.hypot(0.4, 0.9)}
    sigma = {(0, 1): 0.3, (0, 2): 0.35, (1, 2): 0.25}
    pairs = [list(p) for p in r]
    plain = ExcludedVolumePrior(pairs, sigma_nm=list(sigma.values()), exponent=6)
    expected = sum((sigma[p] / r[p]) ** 6 for p in r)
    np.testing.assert_allclose(_energy(plain, xyz), [expected], rtol=1e-13)
    # Shifted cutoff at 0.95 nm: pair (1, 2) (0.985 nm) drops out, the others are shifted.
    cut = ExcludedVolumePrior(pairs, sigma_nm=list(sigma.values()), exponent=6, cutoff_nm=0.95)
    expected = sum((sigma[p] / r[p]) ** 6 - (sigma[p] / 0.95) ** 6 for p in [(0, 1), (0, 2)])
    np.testing.assert_allclose(_energy(cut, xyz), [expected], rtol=1e-13)
    # Per bead-type pair: types A, B, A -> (0,1) AB, (0,2) AA, (1,2) BA.
    typed = ExcludedVolumePrior(pairs, sigma_nm=[[0.35, 0.3], [0.3, 0.2]], bead_types=["A", "B", "A"], exponent=6)
    expected = (0.3 / r[0, 1]) ** 6 + (0.35 / r[0, 2]) ** 6 + (0.3 / r[1, 2]) ** 6
    np.testing.assert_allclose(_energy(typed, xyz), [expected], rtol=1e-13)


# --------------------------------------------------------------------- forces, dtypes, TorchScript, config
@pytest.mark.parametrize("name", PRIOR_NAMES)
@pytest.mark.parametrize("periodic", [False, True])
def test_forces_match_finite_differences(name, periodic):
    prior = _priors()[name]
    xyz = _chain_frames(2, seed=5, noise=0.05)
    box = torch.tensor(np.broadcast_to(TRICLINIC, (2, 3, 3)).copy()) if periodic else None
    x = torch.tensor(xyz, requires_grad=True)
    (grad,) = torch.autograd.grad(prior(x, box).sum(), x)
    h = 1e-6
    numeric = np.zeros_like(xyz)
    for idx in np.ndindex(xyz.shape[1:]):
        plus, minus = xyz.copy(), xyz.copy()
        plus[(slice(None),) + idx] += h
        minus[(slice(None),) + idx] -= h
        with torch.no_grad():
            diff = prior(torch.tensor(plus), box) - prior(torch.tensor(minus), box)
        numeric[(slice(None),) + idx] = diff.numpy() / (2 * h)
    scale = max(1.0, np.abs(numeric).max())
    np.testing.assert_allclose(grad.numpy(), numeric, atol=1e-6 * scale)
    assert np.abs(numeric).max() > 1e-3  # the configuration exercises the term


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_float32_follows_positions(name):
    prior = _priors()[name]
    xyz = _chain_frames(3, seed=1)
    e64 = _energy(prior, xyz)
    e32 = _energy(prior, xyz, dtype=torch.float32)
    assert e32.dtype == np.float32
    np.testing.assert_allclose(e32, e64, rtol=1e-4, atol=1e-5)
    converted = prior.to(torch.float32)
    assert all(b.dtype in (torch.float32, torch.int64) for b in converted.buffers())
    np.testing.assert_allclose(_energy(converted, xyz, dtype=torch.float32), e32, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_torchscript_identical(name):
    prior = _priors()[name]
    scripted = torch.jit.script(prior)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    xyz = torch.tensor(_chain_frames(4, seed=2))
    box = torch.tensor(np.broadcast_to(TRICLINIC, (4, 3, 3)).copy())
    with torch.no_grad():
        for args in [(xyz, None), (xyz, box), (xyz.float(), box.float())]:
            assert torch.equal(prior(*args), scripted(*args))
            assert torch.equal(prior(*args), loaded(*args))


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_config_rebuilds_identical_prior(name):
    prior = _priors()[name]
    config = json.loads(json.dumps(prior.config()))
    rebuilt = type(prior)(**config)
    from_dict = prior_from_dict(json.loads(json.dumps(prior_to_dict(prior))))
    xyz = torch.tensor(_chain_frames(4, seed=4))
    with torch.no_grad():
        assert torch.equal(prior(xyz, None), rebuilt(xyz, None))
        assert torch.equal(prior(xyz, None), from_dict(xyz, None))
    assert rebuilt.config() == prior.config()


def test_typed_excluded_volume_config_round_trip():
    prior = ExcludedVolumePrior(n_beads=6, bonds=CHAIN, exclusion_bonds=1, bead_types=[0, 1, 1, 0, 2, 1],
                                sigma_nm=[[0.3, 0.2, 0.1], [0.2, 0.25, 0.0], [0.1, 0.0, 0.4]], exponent=9)
    assert prior.num_interactions == 10 - 2  # 1-2 pairs excluded, type pair (1, 2) has sigma 0
    rebuilt = ExcludedVolumePrior(**json.loads(json.dumps(prior.config())))
    xyz = torch.tensor(_chain_frames(3))
    with torch.no_grad():
        assert torch.equal(prior(xyz, None), rebuilt(xyz, None))


# ------------------------------------------------------------------------------------------- periodic box
@pytest.mark.parametrize("box", [ORTHORHOMBIC, TRICLINIC], ids=["orthorhombic", "triclinic"])
@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_periodic_equals_unwrapped_and_is_invariant_to_box_shifts(name, box):
    prior = _priors()[name]
    xyz = _chain_frames(3, seed=6)  # every pair within 1.0 nm < half of every box width
    reference = _energy(prior, xyz)
    np.testing.assert_allclose(_energy(prior, xyz, box), reference, rtol=1e-12)
    rng = np.random.default_rng(7)
    shifts = rng.integers(-2, 3, size=(3, 6, 3))  # integer box-vector combinations per frame and bead
    moved = xyz + shifts @ box
    np.testing.assert_allclose(_energy(prior, moved, box), reference, rtol=1e-10)
    # a single (3, 3) box is accepted too
    with torch.no_grad():
        single = prior(torch.tensor(moved), torch.tensor(box)).numpy()
    np.testing.assert_allclose(single, reference, rtol=1e-10)


# ------------------------------------------------------------------------------------------ analytic forces
def _rotated(direction: np.ndarray, towards: np.ndarray, angle: float) -> np.ndarray:
    """Unit vector at ``angle`` from ``direction``, rotated towards ``towards``."""
    e = direction / np.linalg.norm(direction)
    p = towards - (towards @ e) * e
    p /= np.linalg.norm(p)
    return math.cos(angle) * e + math.sin(angle) * p


def _planar_frames() -> np.ndarray:
    """Chains with dihedrals at and near 0 and 180 degrees: a planar hexagon (all cis), a planar zig-zag (all
    trans), each also 1e-9 nm out of plane (the dihedral on either side of 0 / 180 degrees); moved and
    rotated so no coordinate is special."""
    hexagon = 0.38 * np.stack([np.cos(np.arange(6) * np.pi / 3), np.sin(np.arange(6) * np.pi / 3),
                               np.zeros(6)], axis=1)
    zigzag = np.stack([0.3 * np.arange(6), 0.22 * (np.arange(6) % 2), np.zeros(6)], axis=1)
    rng = np.random.default_rng(11)
    frames = []
    for planar in (hexagon, zigzag):
        frames.append(planar)
        for _ in range(2):
            frames.append(planar + [0.0, 0.0, 1e-9] * rng.choice([-1.0, 1.0], size=(6, 1)))
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    return np.array(frames) @ rotation.T + [0.3, -0.2, 0.5]


def _linear_angle_frames() -> np.ndarray:
    """Chains whose angles (0, 1, 2) are pi - 1e-7 and (2, 3, 4) 1e-6 rad (and the reverse), from generic ones."""
    frames = _chain_frames(4, seed=12, noise=0.05)
    for f, (obtuse, acute) in enumerate([(1e-7, 1e-6), (1e-6, 1e-7), (1e-7, 1e-7), (1e-6, 1e-6)]):
        x = frames[f]
        x[2] = x[1] + 0.38 * _rotated(x[1] - x[0], x[3] - x[1], obtuse)  # angle at 1: pi - obtuse
        x[4] = x[3] + 0.33 * _rotated(x[2] - x[3], x[5] - x[3], acute)  # angle at 3: acute
    return frames


def _analytic_frames(name: str) -> np.ndarray:
    frames = [_chain_frames(6, seed=5, noise=0.06), _planar_frames()]
    if name not in ("dihedral",):  # dihedrals are undefined at linear angles
        frames.append(_linear_angle_frames())
    return np.concatenate(frames)


def _autograd_forces(module, xyz: np.ndarray, box=None) -> tuple:
    x = torch.tensor(xyz, requires_grad=True)
    energy = module(x, box)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach(), -grad


@pytest.mark.parametrize("name", PRIOR_NAMES)
@pytest.mark.parametrize("box", [None, TRICLINIC], ids=["open", "triclinic"])
def test_analytic_forces_equal_autograd(name, box):
    prior = _priors()[name]
    xyz = _analytic_frames(name)
    box_t = None
    if box is not None:
        shifts = np.random.default_rng(13).integers(-2, 3, size=xyz.shape)  # beads in other images
        xyz = xyz + shifts @ box
        box_t = torch.tensor(np.broadcast_to(box, (len(xyz), 3, 3)).copy())
    energy, forces = prior.energy_and_forces(torch.tensor(xyz), box_t)
    reference_energy, reference_forces = _autograd_forces(prior, xyz, box_t)
    torch.testing.assert_close(energy, reference_energy, rtol=1e-12, atol=1e-12)
    scale = float(reference_forces.abs().max())
    assert scale > 1.0  # the configurations exercise the term
    torch.testing.assert_close(forces, reference_forces, rtol=1e-8, atol=1e-8 * scale)
    assert not energy.requires_grad and not forces.requires_grad
    if name == "angle":  # exactly linear angles: finite forces
        linear = _chain_frames(1, noise=0.0)
        linear[0, 2] = 2 * linear[0, 1] - linear[0, 0]
        assert torch.isfinite(prior.energy_and_forces(torch.tensor(linear))[1]).all()


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_analytic_forces_torchscript_float32_single_box_and_index_scatter(name, monkeypatch):
    prior = _priors()[name]
    xyz = torch.tensor(_chain_frames(3, seed=14))
    box = torch.tensor(TRICLINIC)
    energy, forces = prior.energy_and_forces(xyz, box)
    scripted = torch.jit.script(prior)
    for got, want in zip(scripted.energy_and_forces(xyz, box), (energy, forces)):
        assert torch.equal(got, want)
    # float32 positions: float32 results close to float64
    e32, f32 = prior.energy_and_forces(xyz.float(), box.float())
    assert e32.dtype == f32.dtype == torch.float32
    torch.testing.assert_close(e32.double(), energy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f32.double(), forces, rtol=1e-3, atol=1e-3 * float(forces.abs().max()))
    # more beads than the prior knows: index_add_ scatter, zero force on the extra beads
    extra = torch.cat([xyz, torch.randn(3, 2, 3, dtype=torch.float64)], 1)
    e_extra, f_extra = prior.energy_and_forces(extra, box)
    torch.testing.assert_close(e_extra, energy, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(f_extra[:, :6], forces, rtol=1e-12, atol=1e-12)
    assert torch.equal(f_extra[:, 6:], torch.zeros(3, 2, 3, dtype=torch.float64))
    # the same with no dense scatter matrix at all (large systems)
    monkeypatch.setattr(priors_module, "DENSE_SCATTER_MAX", 0)
    sparse = type(prior)(**prior.config())
    assert sparse.scatter_matrix is None
    e_sparse, f_sparse = torch.jit.script(sparse).energy_and_forces(xyz, box)
    torch.testing.assert_close(e_sparse, energy, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(f_sparse, forces, rtol=1e-12, atol=1e-12)


def test_dihedral_coefficients_follow_a_loaded_state_dict():
    prior = _priors()["dihedral"]
    other = FourierDihedralPrior(dihedrals_from_bonds(CHAIN), -2.0 * prior.cos_coeffs.numpy(),
                                 0.5 * prior.sin_coeffs.numpy() + 0.3)
    prior.load_state_dict(other.state_dict())
    xyz = _chain_frames(4, seed=15, noise=0.1)
    energy, forces = prior.energy_and_forces(torch.tensor(xyz))
    reference_energy, reference_forces = _autograd_forces(other, xyz)
    torch.testing.assert_close(energy, reference_energy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forces, reference_forces, rtol=1e-10, atol=1e-10)
    # converted to float32 and back, the derived coefficients stay exact copies of the coefficients
    prior.float().double()
    assert torch.equal(prior.energy_coeffs, torch.cat([prior.cos_coeffs, prior.sin_coeffs], 1))


class _Harmonic(torch.nn.Module):
    """A prior without analytic forces: md_energy_and_forces differentiates it by autograd."""

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        return 3.0 * (positions * positions).sum((1, 2))

    def config(self) -> dict:
        return {}


@pytest.mark.parametrize("box", [None, TRICLINIC], ids=["open", "triclinic"])
@pytest.mark.parametrize("variant", ["dense", "index_add", "generic_prior", "priors_only"])
def test_md_energy_and_forces_equals_autograd_of_the_model(box, variant, monkeypatch):
    from openmm_backmap.potential import CGPotential
    from openmm_backmap.potential.schnet import SchNet

    if variant == "index_add":
        monkeypatch.setattr(priors_module, "DENSE_SCATTER_MAX", 0)
    terms = [_priors()[n] for n in ["bond", "angle", "angle_cosine", "dihedral", "excluded", "excluded_typed"]]
    if variant == "generic_prior":
        terms.insert(2, _Harmonic())
    n_priors = len(terms)
    if variant != "priors_only":
        torch.manual_seed(0)
        terms.append(SchNet([0, 1, 0, 1, 2, 0], hidden=8, n_rbf=6, cutoff_nm=0.9, n_interactions=2).double())
    potential = CGPotential(terms, n_priors=n_priors, bead_names=[f"B{i}" for i in range(6)], bead_types=["A"] * 6,
                            mapping_fingerprint="test", periodic=box is not None, energy_offset=1.5).double()
    # the analytic priors are fused even next to a prior without analytic forces (which autograd handles)
    assert potential._prior_head is not None
    assert (potential._prior_matrix is None) == (variant == "index_add")
    xyz = np.concatenate([_chain_frames(3, seed=16, noise=0.05), _planar_frames()[:2]])
    box_t = None
    if box is not None:
        xyz = xyz + np.random.default_rng(17).integers(-1, 2, size=xyz.shape) @ box
        box_t = torch.tensor(np.broadcast_to(box, (len(xyz), 3, 3)).copy())
    reference_energy, reference_forces = _autograd_forces(potential, xyz, box_t)
    scale = float(reference_forces.abs().max())
    for module in (potential, torch.jit.script(potential)):
        energy, forces = module.md_energy_and_forces(torch.tensor(xyz), box_t)
        torch.testing.assert_close(energy, reference_energy, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(forces, reference_forces, rtol=1e-10, atol=1e-10 * scale)
        assert not energy.requires_grad and not forces.requires_grad


def test_potential_refuses_a_prior_beyond_its_beads():
    from openmm_backmap.potential import CGPotential

    with pytest.raises(ValueError, match="refers to bead 5"):
        CGPotential([_priors()["bond"]], n_priors=1, bead_names=["A"] * 4, bead_types=["A"] * 4,
                    mapping_fingerprint="test")


# --------------------------------------------------------------------------------- Boltzmann inversion
def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_bond_fit_recovers_harmonic_parameters_with_r2_jacobian():
    r0, k = 0.38, 500.0
    rng = np.random.default_rng(11)
    width = math.sqrt(KT / k)
    r_max = r0 + 6 * width
    # p(r) ~ r^2 exp(-k (r - r0)^2 / 2kT): Gaussian proposals accepted with probability (r / r_max)^2.
    r = rng.normal(r0, width, size=800_000)
    r = r[(r > 0) & (r < r_max)]
    r = r[rng.random(len(r)) < (r / r_max) ** 2]
    assert r.mean() > r0 * 1.05  # the Jacobian shifts the mean length: ignoring it would fail below
    xyz = np.zeros((len(r), 2, 3))
    xyz[:, 0] = rng.normal(size=(len(r), 3))
    xyz[:, 1] = xyz[:, 0] + r[:, None] * _unit_vectors(rng, len(r))
    (prior,) = fit_priors(xyz, [[0, 1]], T)
    config = prior.config()
    assert isinstance(prior, HarmonicBondPrior)
    assert config["r0_nm"][0] == pytest.approx(r0, rel=0.005)
    assert config["k_kj_mol_nm2"][0] == pytest.approx(k, rel=0.03)


def test_angle_fit_recovers_harmonic_parameters_with_sine_jacobian():
    theta0, k = 1.9, 30.0
    rng = np.random.default_rng(12)
    theta = rng.normal(theta0, math.sqrt(KT / k), size=500_000)
    theta = theta[(theta > 0) & (theta < math.pi)]
    theta = theta[rng.random(len(theta)) < np.sin(theta)]
    xyz = np.zeros((len(theta), 3, 3))
    xyz[:, 0] = [0.4, 0.0, 0.0]
    xyz[:, 2] = 0.35 * np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=1)
    (prior,) = fit_priors(xyz, [[0, 1], [1, 2]], T, terms=["angles"])
    config = prior.config()
    assert config["theta0_rad"][0] == pytest.approx(theta0, rel=0.005)
    assert config["k_kj_mol_rad2"][0] == pytest.approx(k, rel=0.03)


def test_angle_fit_keeps_theta0_at_pi_for_linear_angles():
    rng = np.random.default_rng(16)
    theta = math.pi - np.abs(rng.normal(0.0, math.sqrt(KT / 20.0), size=300_000))
    theta = theta[rng.random(len(theta)) < np.sin(theta)]
    xyz = np.zeros((len(theta), 3, 3))
    xyz[:, 0] = [0.4, 0.0, 0.0]
    xyz[:, 2] = 0.35 * np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=1)
    (prior,) = fit_priors(xyz, [[0, 1], [1, 2]], T, terms=["angles"])
    assert math.pi - 0.01 <= prior.config()["theta0_rad"][0] <= math.pi
    assert prior.config()["k_kj_mol_rad2"][0] == pytest.approx(20.0, rel=0.05)


def test_angles_closing_a_three_bead_ring_get_no_prior():
    """A CG triangle (benzene's 3-bead map) is fixed by its bonds: angle priors there would double-count."""
    rng = np.random.default_rng(21)
    n = 4000
    triangle = np.array([[0.0, 0.0, 0.0], [0.22, 0.0, 0.0], [0.11, 0.19, 0.0], [0.11, 0.45, 0.0]])
    xyz = triangle[None] + rng.normal(0.0, 0.005, size=(n, 4, 3))
    bonds = [[0, 1], [1, 2], [2, 0], [2, 3]]  # a ring with a tail
    priors = fit_priors(xyz, bonds, T, terms=["bonds", "angles"])
    assert isinstance(priors[0], HarmonicBondPrior) and priors[0].config()["bonds"] == [[0, 1], [1, 2], [2, 0], [2, 3]]
    angle = priors[1]
    assert sorted(map(tuple, angle.config()["angles"])) == [(0, 2, 3), (1, 2, 3)]
    with pytest.raises(ValueError, match="no interactions for terms"):
        fit_priors(xyz[:, :3], bonds[:3], T, terms=["angles"])


def test_bimodal_bond_falls_back_to_moments_with_warning():
    rng = np.random.default_rng(17)
    r = np.concatenate([rng.normal(0.3, 0.02, 5000), rng.normal(0.5, 0.02, 5000)])
    xyz = np.zeros((len(r), 2, 3))
    xyz[:, 1, 0] = r
    with pytest.warns(RuntimeWarning, match="not harmonic"):
        (prior,) = fit_priors(xyz, [[0, 1]], T)
    weights = 1.0 / r**2  # the Jacobian-corrected distribution
    mean = np.average(r, weights=weights)
    variance = np.average((r - mean) ** 2, weights=weights)
    assert prior.config()["r0_nm"][0] == pytest.approx(mean, rel=0.01)
    assert prior.config()["k_kj_mol_nm2"][0] == pytest.approx(KT / variance, rel=0.05)


def test_cosine_angle_prior_energy_is_its_series_and_its_forces_stay_finite_at_straight_angles():
    c = np.array([1.5, -2.0, 0.7, 0.4])
    prior = CosineAnglePrior([[0, 1, 2]], [c])
    theta = np.array([0.4, 1.3, 2.2, 3.0])
    xyz = np.zeros((len(theta), 3, 3))
    xyz[:, 0] = [0.3, 0.0, 0.0]
    xyz[:, 2] = 0.25 * np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=1)
    expected = np.cos(np.outer(theta, np.arange(4))) @ c
    np.testing.assert_allclose(_energy(prior, xyz), expected, rtol=1e-12)
    straight = np.array([[[0.3, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.25, 0.0, 0.0]]])
    energy, forces = prior.energy_and_forces(torch.tensor(straight))
    assert float(energy) == pytest.approx(c @ np.cos(np.arange(4) * math.pi))
    assert torch.isfinite(forces).all() and float(forces.abs().max()) < 1e-6  # dE/dtheta = 0 at pi


def test_multimodal_angle_gets_a_cosine_series_that_reproduces_its_distribution():
    """An angle with two peaks (a harmonic prior cannot hold both) is fitted by a cosine series whose Boltzmann
    distribution, sin(theta) exp(-E/kT), matches the samples."""
    rng = np.random.default_rng(3)
    theta = np.concatenate([rng.normal(1.9, 0.12, 30_000), rng.normal(2.7, 0.15, 50_000)])
    theta = theta[(theta > 0) & (theta < math.pi)]
    xyz = np.zeros((len(theta), 3, 3))
    xyz[:, 0] = [0.35, 0.0, 0.0]
    xyz[:, 2] = 0.35 * np.stack([np.cos(theta), np.sin(theta), np.zeros_like(theta)], axis=1)
    priors = fit_priors(xyz, [[0, 1], [1, 2]], T, terms=["angles"])
    assert [type(p) for p in priors] == [CosineAnglePrior]
    grid = np.linspace(1e-4, math.pi - 1e-4, 5000)
    pts = np.zeros((len(grid), 3, 3))
    pts[:, 0] = [0.35, 0.0, 0.0]
    pts[:, 2] = 0.35 * np.stack([np.cos(grid), np.sin(grid), np.zeros_like(grid)], axis=1)
    energy = _energy(priors[0], pts)
    logp = np.log(np.sin(grid)) - energy / KT
    p = np.exp(logp - logp.max())
    p /= p.sum()
    # both peaks in the right places and proportions (a harmonic fallback would put one peak in between)
    assert p[(grid > 1.5) & (grid < 2.3)].sum() == pytest.approx(30_000 / 80_000, abs=0.03)
    assert abs(grid[np.argmax(np.where(grid < 2.3, p, 0))] - 1.9) < 0.05
    assert abs(grid[np.argmax(np.where(grid > 2.3, p, 0))] - 2.7) < 0.05
    # never-seen angles sit on a wall at least 10 kT above the minimum that keeps rising away from the data
    # (a flat wall exerts no force: a molecule that crossed it would stay)
    assert energy[grid < 1.0].min() - energy.min() > 8 * KT
    below = (grid > 0.3) & (grid < 1.2)
    slope = np.polyfit(grid[below], energy[below], 1)[0]
    assert slope < -10 * KT
    # and the fit survives save/load and transfer like the other bonded priors
    rebuilt = prior_from_dict(prior_to_dict(priors[0]))
    np.testing.assert_allclose(_energy(rebuilt, pts), energy)


def test_dihedral_fit_recovers_fourier_coefficients():
    a, b = np.array([1.5, -0.8, 0.6]), np.array([0.4, 0.0, -0.5])
    rng = np.random.default_rng(13)
    phi = rng.uniform(-math.pi, math.pi, size=400_000)
    n_phi = np.outer(phi, np.arange(1, 4))
    u = (a * np.cos(n_phi) + b * np.sin(n_phi)).sum(axis=1)
    phi = phi[rng.random(len(phi)) < np.exp(-(u - u.min()) / KT)]
    xyz = np.zeros((len(phi), 4, 3))
    xyz[:, 0] = [0.4, 0.0, 0.0]
    xyz[:, 2] = [0.0, 0.0, 0.4]
    xyz[:, 3] = np.stack([0.4 * np.cos(phi), 0.4 * np.sin(phi), np.full_like(phi, 0.4)], axis=1)
    (prior,) = fit_priors(xyz, [[0, 1], [1, 2], [2, 3]], T, terms=["dihedrals"], n_fourier=3)
    config = prior.config()
    np.testing.assert_allclose(config["cos_coeffs"][0], a, atol=0.05)
    np.testing.assert_allclose(config["sin_coeffs"][0], b, atol=0.05)


def _pair_frames(rng: np.random.Generator, n_frames: int, n_beads: int) -> np.ndarray:
    """Beads at independent random offsets from bead 0 with lengths uniform in [0.3, 0.6] nm."""
    xyz = np.zeros((n_frames, n_beads, 3))
    for i in range(1, n_beads):
        xyz[:, i] = rng.uniform(0.3, 0.6, size=(n_frames, 1)) * _unit_vectors(rng, n_frames)
    return xyz


def test_excluded_volume_sigma_rule():
    rng = np.random.default_rng(14)
    xyz = _pair_frames(rng, 10_000, 2)
    d = np.linalg.norm(xyz[:, 1] - xyz[:, 0], axis=1)
    d_q = np.sort(d)[9]  # ceil(1e-3 * 10000) = 10th smallest
    (plain,) = fit_priors(xyz, [], T, sigma_quantile=1e-3, exponent=12)
    assert plain.config()["sigma_nm"] == pytest.approx([d_q * KT ** (1 / 12)], rel=1e-12)
    probe = np.array([[[0.0, 0.0, 0.0], [d_q, 0.0, 0.0]]])
    np.testing.assert_allclose(_energy(plain, probe), [KT], rtol=1e-12)
    (shifted,) = fit_priors(xyz, [], T, cutoff_nm=0.45, exponent=8, sigma_energy_kT=2.0)
    np.testing.assert_allclose(_energy(shifted, probe), [2.0 * KT], rtol=1e-12)
    with pytest.raises(ValueError, match="cutoff_nm"):
        fit_priors(xyz, [], T, cutoff_nm=0.25)


def test_excluded_volume_pools_bead_type_pairs():
    rng = np.random.default_rng(15)
    xyz = _pair_frames(rng, 2_000, 4)
    types = ["A", "B", "A", "B"]
    (prior,) = fit_priors(xyz, [], T, bead_types=types)
    d = np.linalg.norm(xyz[:, :, None] - xyz[:, None], axis=-1)
    groups = {"AA": [(0, 2)], "BB": [(1, 3)], "AB": [(0, 1), (0, 3), (1, 2), (2, 3)]}
    d_q = {key: np.sort(np.concatenate([d[:, i, j] for i, j in pairs]))[math.ceil(1e-3 * 2_000 * len(pairs)) - 1]
           for key, pairs in groups.items()}
    sigma = np.array(prior.config()["sigma_nm"]) / KT ** (1 / 12)
    np.testing.assert_allclose(sigma, [[d_q["AA"], d_q["AB"]], [d_q["AB"], d_q["BB"]]], rtol=1e-12)
    assert prior.config()["bead_types"] == types


def test_fit_priors_on_a_chain_gives_a_usable_model():
    xyz = _chain_frames(2000, seed=21)
    priors = fit_priors(xyz, CHAIN, T)
    assert [type(p) for p in priors] == [HarmonicBondPrior, HarmonicAnglePrior, FourierDihedralPrior,
                                         ExcludedVolumePrior]
    assert [p.num_interactions for p in priors] == [5, 4, 3, 6]
    # A whole molecule in a large periodic box gives the same fit.
    periodic = fit_priors(xyz + 3.0, CHAIN, T, box=np.diag([5.0, 5.0, 5.0]))
    for p, q in zip(priors, periodic):
        for key, value in p.config().items():
            if value is None:
                assert q.config()[key] is None
            else:
                np.testing.assert_allclose(q.config()[key], value, rtol=1e-9, atol=1e-12)
    # Beads with isotropic Gaussian noise (s^2 = 2 noise^2 per component of a bond vector of length d) have
    # p(r) / r^2 ~ exp(-(r - d)^2 / 2 s^2) / r: the PMF minimum is r0 ~ d - s^2 / d, below the mean length
    # d + s^2 / d.
    bonds = np.array(CHAIN)
    base = _chain_frames(1, noise=0.0)[0]
    d = np.linalg.norm(base[bonds[:, 1]] - base[bonds[:, 0]], axis=-1)
    np.testing.assert_allclose(priors[0].config()["r0_nm"], d - 2 * 0.03**2 / d, rtol=0.01)
    # The model is finite, with finite forces, and scripts.
    x = torch.tensor(xyz[:8], requires_grad=True)
    energy = sum(torch.jit.script(p)(x, None) for p in priors)
    energy.sum().backward()
    assert torch.isfinite(energy).all() and torch.isfinite(x.grad).all()


def test_fit_priors_with_torchforce_in_openmm():
    from openmm_backmap._openmmtorch import import_openmmtorch

    openmmtorch = import_openmmtorch()
    import openmm
    from openmm import unit

    class Wrapper(torch.nn.Module):
        def __init__(self, priors):
            super().__init__()
            self.priors = torch.nn.ModuleList(priors)

        def forward(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
            x = positions.unsqueeze(0)
            cell = box.unsqueeze(0)
            energy = torch.zeros(1, dtype=positions.dtype)
            for prior in self.priors:
                energy = energy + prior(x, cell)
            return energy[0]

    xyz = _chain_frames(300, seed=22)
    box = np.diag([3.0, 3.0, 3.0])
    priors = fit_priors(xyz, CHAIN, T, box=box, cutoff_nm=1.2)
    force = openmmtorch.TorchForce(torch.jit.script(Wrapper(priors)))
    force.setUsesPeriodicBoundaryConditions(True)
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    for _ in range(6):
        system.addParticle(50.0)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(xyz[0] + 2.0)  # partly outside the box
    state = context.getState(getEnergy=True, getForces=True)
    x = torch.tensor(xyz[:1], requires_grad=True)
    energy = sum(p(x, torch.tensor(box[None])) for p in priors)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    energy = energy.detach()
    assert state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) == pytest.approx(energy.item(), rel=1e-9)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    np.testing.assert_allclose(forces, -grad[0].numpy(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------- topology helpers
def test_angles_and_dihedrals_of_chain_triangle_and_branch():
    chain = [[0, 1], [2, 1], [2, 3]]
    assert angles_from_bonds(chain).tolist() == [[0, 1, 2], [1, 2, 3]]
    assert dihedrals_from_bonds(chain).tolist() == [[0, 1, 2, 3]]
    triangle = [[0, 1], [1, 2], [2, 0]]
    assert sorted(map(tuple, angles_from_bonds(triangle))) == [(0, 1, 2), (0, 2, 1), (1, 0, 2)]
    assert dihedrals_from_bonds(triangle).shape == (0, 4)  # no path of 4 distinct beads
    branch = [[0, 1], [1, 2], [1, 3], [3, 4]]
    assert sorted(map(tuple, angles_from_bonds(branch))) == [(0, 1, 2), (0, 1, 3), (1, 3, 4), (2, 1, 3)]
    assert sorted(map(tuple, dihedrals_from_bonds(branch))) == [(0, 1, 3, 4), (2, 1, 3, 4)]
    assert angles_from_bonds([]).shape == (0, 3)


def test_nonbonded_pairs_exclusions():
    chain = [[0, 1], [1, 2], [2, 3], [3, 4]]
    all_pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    for n_bonds in range(5):
        expected = [(i, j) for i, j in all_pairs if j - i > n_bonds]
        assert list(map(tuple, nonbonded_pairs(5, chain, n_bonds))) == expected
    # Two molecules: beads of different molecules are never excluded.
    two = nonbonded_pairs(6, [[0, 1], [1, 2], [3, 4], [4, 5]], exclusion_bonds=2)
    assert list(map(tuple, two)) == [(i, j) for i in range(3) for j in range(3, 6)]
    # A ring: 1-3 neighbours across both directions are excluded.
    ring = nonbonded_pairs(5, [[0, 1], [1, 2], [2, 3], [3, 4], [4, 0]], exclusion_bonds=2)
    assert ring.shape == (0, 2)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build, match", [
    (lambda: HarmonicBondPrior([], [], []), "bonds is empty"),
    (lambda: HarmonicBondPrior([[0, 1]], [0.3, 0.4], [100.0]), "r0_nm must have shape"),
    (lambda: HarmonicBondPrior([[0, 1]], [0.3], [-1.0]), "k_kj_mol_nm2 must be >= 0"),
    (lambda: HarmonicBondPrior([[0, 0]], [0.3], [1.0]), "more than once"),
    (lambda: HarmonicBondPrior([[0, 1], [1, 0]], [0.3, 0.3], [1.0, 1.0]), "more than once"),
    (lambda: HarmonicBondPrior([[0, 1, 2]], [0.3], [1.0]), "bonds must be"),
    (lambda: HarmonicBondPrior([[0.5, 1]], [0.3], [1.0]), "bonds must be"),
    (lambda: HarmonicAnglePrior([[0, 1, 2]], [4.0], [1.0]), r"\[0, pi\]"),
    (lambda: HarmonicAnglePrior([[0, 1, 2], [2, 1, 0]], [1.0, 1.0], [1.0, 1.0]), "more than once"),
    (lambda: CosineAnglePrior([[0, 1, 2]], [1.0, 2.0]), r"must have shape \(1, K \+ 1\)"),
    (lambda: CosineAnglePrior([[0, 1, 2], [1, 2, 3]], [[1.0, 2.0]]), r"must have shape \(2, K \+ 1\)"),
    (lambda: CosineAnglePrior([[0, 1, 2]], [[1.0, np.inf]]), "must be finite"),
    (lambda: CosineAnglePrior([[0, 1]], [[1.0]]), "angles must be"),
    (lambda: FourierDihedralPrior([[0, 1, 2, 3]], [[1.0, 2.0]], [[1.0]]), "sin_coeffs must have shape"),
    (lambda: FourierDihedralPrior([[0, 1, 2, 3]], [[np.nan]]), "NaN"),
    (lambda: ExcludedVolumePrior([[0, 1]], sigma_nm=0.3, n_beads=2), "either pairs"),
    (lambda: ExcludedVolumePrior([[0, 1]], sigma_nm=[0.3, 0.2]), "sigma_nm"),
    (lambda: ExcludedVolumePrior([[0, 1]], sigma_nm=0.3, exponent=0), "exponent"),
    (lambda: ExcludedVolumePrior([[0, 1]], sigma_nm=0.3, cutoff_nm=-1.0), "cutoff_nm"),
    (lambda: ExcludedVolumePrior([[0, 1]], sigma_nm=[[0.3, 0.1], [0.2, 0.3]], bead_types=["A", "B"]), "symmetric"),
    (lambda: ExcludedVolumePrior(n_beads=3, bonds=[[0, 1], [1, 2]], sigma_nm=0.3), "no bead pair"),
    (lambda: nonbonded_pairs(3, [[0, 3]]), "only 3 beads"),
])
def test_bad_prior_input(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_fit_input():
    xyz = _chain_frames(50)
    with pytest.raises(ValueError, match="NaN"):
        bad = xyz.copy()
        bad[3, 2, 1] = np.nan
        fit_priors(bad, CHAIN, T)
    with pytest.raises(ValueError, match="positions must have shape"):
        fit_priors(xyz[:, :, :2], CHAIN, T)
    with pytest.raises(ValueError, match="n_frames >= 2"):
        fit_priors(xyz[0], CHAIN, T)
    with pytest.raises(ValueError, match="no interactions for terms"):
        fit_priors(xyz, [], T, terms=["bonds"])
    with pytest.raises(ValueError, match="unknown terms"):
        fit_priors(xyz, CHAIN, T, terms=["torsions"])
    with pytest.raises(ValueError, match="bead_types has 5 entries"):
        fit_priors(xyz, CHAIN, T, bead_types=["A"] * 5)
    with pytest.raises(ValueError, match="only 6 beads"):
        fit_priors(xyz, [[0, 6]], T)
    with pytest.raises(ValueError, match="box has 2 frames"):
        fit_priors(xyz, CHAIN, T, box=np.broadcast_to(np.eye(3) * 4, (2, 3, 3)))
    with pytest.raises(ValueError, match="temperature_K"):
        fit_priors(xyz, CHAIN, -5.0)
    with pytest.raises(ValueError, match="do not vary"):
        fit_priors(np.broadcast_to(xyz[0], (50, 6, 3)), CHAIN, T, terms=["bonds"])


def test_a_fitted_excluded_volume_of_a_large_box_is_neighbour_searched_with_the_same_energy():
    """Over NEIGHBOR_SEARCH_MIN_PAIRS pairs (a liquid box) fit_priors returns the neighbour-searched prior; it gives
    the energy and forces of the fixed-list prior with the same sigma."""
    from openmm_backmap.potential.priors import ExcludedVolumePrior, NEIGHBOR_SEARCH_MIN_PAIRS, \
        NeighborExcludedVolumePrior

    rng = np.random.default_rng(3)
    n, edge = 220, 3.0
    assert n * (n - 1) // 2 > NEIGHBOR_SEARCH_MIN_PAIRS
    xyz = rng.uniform(0, edge, size=(6, n, 3))
    box = np.broadcast_to(np.eye(3) * edge, (6, 3, 3)).copy()
    types = ["A"] * (n // 2) + ["B"] * (n - n // 2)
    (prior,) = fit_priors(xyz, np.zeros((0, 2), dtype=int), 300.0, box=box, bead_types=types, cutoff_nm=1.0,
                          terms=["excluded_volume"])
    assert isinstance(prior, NeighborExcludedVolumePrior)
    cfg = prior.config()
    fixed = ExcludedVolumePrior(n_beads=n, sigma_nm=np.array(cfg["sigma_nm"]), bead_types=types, bonds=None,
                                exclusion_bonds=2, exponent=12, cutoff_nm=1.0).double()
    x, b = torch.tensor(xyz[:2] + 0.01), torch.tensor(box[:2])
    e_n, f_n = prior.double().energy_and_forces(x, b)
    e_f, f_f = fixed.energy_and_forces(x, b)
    torch.testing.assert_close(e_n, e_f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f_n, f_f, rtol=1e-9, atol=1e-7)
    # a small system keeps the fused fixed-list prior
    (small,) = fit_priors(xyz[:, :20], np.zeros((0, 2), dtype=int), 300.0, box=box, bead_types=types[:20],
                          cutoff_nm=1.0, terms=["excluded_volume"])
    assert isinstance(small, ExcludedVolumePrior)
