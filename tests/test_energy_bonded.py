"""Bonded energy terms against OpenMM's Reference platform (energies, forces, PBC, subsets, float32)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_backmap import systems
from openmm_backmap.energy._base import dihedral
from openmm_backmap.energy.bonded import (
    BONDED_TERMS,
    CMAPTorsion,
    HarmonicAngle,
    HarmonicBond,
    PeriodicTorsion,
    RBTorsion,
    cmap_coefficients,
)

ENERGY_RTOL = 1e-6
ENERGY_ATOL = 1e-8
FORCE_ATOL = 1e-4  # kJ/mol/nm
NOISE_NM = 0.02
BATCH = 4
N_BATCHES = 3

# Alanine dipeptide atoms: ACE CH3 0, C 4, O 5; ALA N 6, H 7, CA 8, C 10, CB 12; NME N 16.
PHI = (4, 6, 8, 10)
PSI = (6, 8, 10, 16)
OMEGA = (0, 4, 6, 8)  # CH3-C-N-CA, near +-pi
O_C_N_CA = (5, 4, 6, 8)  # near 0, where OpenMM's CMAP grid wraps
H_N_CA_CB = (7, 6, 8, 12)

#: Forces of the real systems compared with OpenMM, as (system, force class).
SYSTEM_CASES = [
    (name, cls)
    for name in ("adp", "chignolin")
    for cls in (openmm.HarmonicBondForce, openmm.HarmonicAngleForce, openmm.PeriodicTorsionForce)
]
#: Cases on alanine dipeptide, one per force type.
ADP_CASES = [f"{cls.__name__}-adp" for _, cls in SYSTEM_CASES[:3]] + ["RBTorsionForce-adp", "CMAPTorsionForce-adp"]
ALL_CASES = [f"{cls.__name__}-{name}" for name, cls in SYSTEM_CASES] + ADP_CASES[3:]


@dataclass
class Case:
    """One OpenMM force and the reference positions ``(n, 3)`` in nm of the system it belongs to."""

    force: openmm.Force
    positions: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.positions)


def _random_cmap(seed: int = 7) -> openmm.CMAPTorsionForce:
    """Random maps (two of size 24, one of size 10) on ADP torsion pairs that share atoms."""
    rng = np.random.default_rng(seed)
    force = openmm.CMAPTorsionForce()
    for size in (24, 24, 10):
        force.addMap(size, rng.normal(scale=4.0, size=size * size).tolist())
    pairs = [
        (0, PHI, PSI), (1, PSI, PHI), (0, OMEGA, O_C_N_CA), (1, O_C_N_CA, H_N_CA_CB),
        (2, PHI, O_C_N_CA), (2, OMEGA, PSI), (1, PHI, PHI),
    ]
    for map_index, first, second in pairs:
        force.addTorsion(map_index, *first, *second)
    return force


def _random_rb(adp: systems.TestSystem, seed: int = 11) -> openmm.RBTorsionForce:
    """RB torsions with random coefficients on the quadruplets of ADP's periodic torsions."""
    rng = np.random.default_rng(seed)
    torsions = _force_of(adp.system, openmm.PeriodicTorsionForce)
    quadruplets = sorted({tuple(torsions.getTorsionParameters(i)[:4]) for i in range(torsions.getNumTorsions())})
    force = openmm.RBTorsionForce()
    for quadruplet in quadruplets:
        force.addTorsion(*quadruplet, *rng.normal(scale=5.0, size=6).tolist())
    return force


def _force_of(system: openmm.System, cls: type[openmm.Force]) -> openmm.Force:
    (force,) = [copy.deepcopy(f) for f in system.getForces() if isinstance(f, cls)]
    return force


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    built = {
        "adp": systems.alanine_dipeptide("vacuum", constraints=None),
        "chignolin": systems.chignolin(constraints=None),
    }
    result = {
        f"{cls.__name__}-{name}": Case(_force_of(built[name].system, cls), built[name].positions_nm)
        for name, cls in SYSTEM_CASES
    }
    adp = built["adp"]
    result["RBTorsionForce-adp"] = Case(_random_rb(adp), adp.positions_nm)
    result["CMAPTorsionForce-adp"] = Case(_random_cmap(), adp.positions_nm)
    return result


def _perturbed(positions: np.ndarray, seed: int, batch: int = BATCH) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return positions[None] + rng.normal(scale=NOISE_NM, size=(batch, *positions.shape))


def _openmm(
    force: openmm.Force, n_atoms: int, positions: np.ndarray, box: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """OpenMM Reference energies ``(B,)`` and forces ``(B, n, 3)`` of a system holding only ``force``."""
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(1.0)
    force = copy.deepcopy(force)
    force.setForceGroup(0)
    system.addForce(force)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    energies, forces = [], []
    for xyz in positions:
        if box is not None:
            context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
        context.setPositions(xyz)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))
    return np.array(energies), np.array(forces)


def _torch(
    term: torch.nn.Module, positions: np.ndarray, box: np.ndarray | None = None, dtype: torch.dtype = torch.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Energies ``(B,)`` and autograd forces ``(B, n, 3)`` of a term with a single category."""
    x = torch.tensor(positions, dtype=dtype, requires_grad=True)
    box_t = None if box is None else torch.tensor(np.broadcast_to(box, (len(positions), 3, 3)), dtype=dtype)
    (energy,) = term(x, box_t).values()
    assert energy.shape == (len(positions),) and energy.dtype == dtype
    (grad,) = torch.autograd.grad(energy.sum(), x)
    return energy.detach().double().numpy(), -grad.double().numpy()


def _term(force: openmm.Force) -> torch.nn.Module:
    term = BONDED_TERMS[type(force)].from_force(force)
    assert term is not None
    return term


def _assert_matches_openmm(
    term: torch.nn.Module, force: openmm.Force, positions: np.ndarray, box: np.ndarray | None = None
) -> None:
    energy_ref, forces_ref = _openmm(force, positions.shape[1], positions, box)
    energy, forces = _torch(term, positions, box)
    np.testing.assert_allclose(energy, energy_ref, rtol=ENERGY_RTOL, atol=ENERGY_ATOL)
    np.testing.assert_allclose(forces, forces_ref, rtol=0, atol=FORCE_ATOL)


@pytest.mark.parametrize("name", ALL_CASES)
def test_matches_openmm(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    term = _term(case.force)
    assert term.num_interactions > 0
    for seed in range(N_BATCHES):
        _assert_matches_openmm(term, case.force, _perturbed(case.positions, seed))


def test_cmap_samples_both_grid_edges(cases: dict[str, Case]) -> None:
    """The CMAP comparison crosses OpenMM's grid wrap (angle 0) and the angle sign flip at +-pi."""
    positions = np.concatenate([_perturbed(cases["CMAPTorsionForce-adp"].positions, s) for s in range(N_BATCHES)])

    def angles(quadruplet: tuple[int, ...]) -> np.ndarray:
        p = torch.tensor(positions)
        return dihedral(*(p[:, i] for i in quadruplet)).numpy()

    near_zero, near_pi = angles(O_C_N_CA), angles(OMEGA)
    assert (near_zero > 0).any() and (near_zero < 0).any() and np.abs(near_zero).max() < 1.2
    assert (near_pi > 0).any() and (near_pi < 0).any() and np.abs(near_pi).min() > math.pi - 1.2


def test_cmap_coefficients_interpolate_grid() -> None:
    """Patch corners reproduce the grid energies at the right (first, second) angle."""
    size = 6
    energy = np.random.default_rng(0).normal(size=size * size)
    c = cmap_coefficients(size, energy)
    for i, j in [(0, 0), (2, 5), (5, 1)]:
        assert c[size * i + j, 0, 0] == pytest.approx(energy[i + size * j])
        # u = 1 in patch (i, j) is grid point (i + 1, j)
        assert c[size * i + j, :, 0].sum() == pytest.approx(energy[(i + 1) % size + size * j])


def _reduced_triclinic_box() -> np.ndarray:
    return np.array([[2.5, 0.0, 0.0], [0.4, 2.4, 0.0], [-0.5, 0.6, 2.3]])


def _wrap(positions: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Put every atom into the box (fractional coordinates in [0, 1)), splitting molecules."""
    fractional = positions @ np.linalg.inv(box)
    return (fractional - np.floor(fractional)) @ box


def test_periodic_bond_across_boundary() -> None:
    box = np.diag([2.0, 2.0, 2.0])
    force = openmm.HarmonicBondForce()
    force.addBond(0, 1, 0.1, 2.0e5)
    force.addBond(1, 2, 0.12, 1.0e5)
    force.setUsesPeriodicBoundaryConditions(True)
    positions = np.array([[[0.03, 1.97, 1.0], [1.95, 1.98, 1.0], [1.93, 0.06, 1.03]]])
    positions = np.concatenate([positions, _perturbed(positions[0], seed=3)])
    term = _term(force)
    assert term.periodic
    _assert_matches_openmm(term, force, positions, box)
    energy, _ = _torch(term, positions, box)
    assert energy[0] < 100.0  # the image distance, not the 1.9 nm separation inside the box


@pytest.mark.parametrize("name", ADP_CASES)
def test_periodic_molecule_split_by_triclinic_box(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    force = copy.deepcopy(case.force)
    force.setUsesPeriodicBoundaryConditions(True)
    box = _reduced_triclinic_box()
    # Centre the molecule on a box corner so that wrapping scatters it over the box.
    positions = _wrap(_perturbed(case.positions - case.positions.mean(0), seed=5), box)
    _assert_matches_openmm(_term(force), force, positions, box)


@pytest.mark.parametrize("name", ADP_CASES)
def test_periodic_term_without_box_raises(cases: dict[str, Case], name: str) -> None:
    force = copy.deepcopy(cases[name].force)
    force.setUsesPeriodicBoundaryConditions(True)
    with pytest.raises(ValueError, match="periodic boundary conditions"):
        _term(force)(torch.tensor(cases[name].positions[None]))


def test_non_periodic_term_ignores_box(cases: dict[str, Case]) -> None:
    case = cases["HarmonicBondForce-adp"]
    positions = _perturbed(case.positions, seed=0)
    term = _term(case.force)
    np.testing.assert_array_equal(_torch(term, positions, np.eye(3))[0], _torch(term, positions)[0])


@pytest.mark.parametrize("name", ADP_CASES)
def test_float32(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    term = _term(case.force)
    positions = _perturbed(case.positions, seed=1)
    energy64, forces64 = _torch(term, positions)
    energy32, forces32 = _torch(term.to(torch.float32), positions, dtype=torch.float32)
    assert all(b.dtype == torch.float32 for b in term.buffers() if b.is_floating_point())
    np.testing.assert_allclose(energy32, energy64, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(forces32, forces64, rtol=0, atol=1e-4 * np.abs(forces64).max())


@pytest.mark.parametrize("name", ADP_CASES)
def test_forces_are_finite_difference_gradient(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    term = _term(case.force)
    positions = _perturbed(case.positions, seed=2, batch=1)[0]
    _, forces = _torch(term, positions[None])
    step = 1e-5
    displaced = np.repeat(positions[None], 2 * positions.size, axis=0).reshape(2, positions.size, -1)
    displaced[0, np.arange(positions.size), np.arange(positions.size)] += step
    displaced[1, np.arange(positions.size), np.arange(positions.size)] -= step
    energy = _torch(term, displaced.reshape(-1, *positions.shape))[0].reshape(2, -1)
    numerical = -(energy[0] - energy[1]) / (2 * step)
    np.testing.assert_allclose(forces[0].ravel(), numerical, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", ADP_CASES)
def test_subset_identity(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    term = _term(case.force)
    everything = term.subset(np.arange(case.n_atoms), np.ones(case.n_atoms, dtype=bool))
    positions = _perturbed(case.positions, seed=4)
    np.testing.assert_allclose(_torch(everything, positions)[0], _torch(term, positions)[0], rtol=1e-14)
    assert term.subset(np.arange(case.n_atoms), np.zeros(case.n_atoms, dtype=bool)) is None


def _interaction_atoms(force: openmm.Force) -> list[tuple[int, ...]]:
    if isinstance(force, openmm.HarmonicBondForce):
        return [tuple(force.getBondParameters(i)[:2]) for i in range(force.getNumBonds())]
    if isinstance(force, openmm.HarmonicAngleForce):
        return [tuple(force.getAngleParameters(i)[:3]) for i in range(force.getNumAngles())]
    if isinstance(force, openmm.CMAPTorsionForce):
        return [tuple(force.getTorsionParameters(i)[1:9]) for i in range(force.getNumTorsions())]
    return [tuple(force.getTorsionParameters(i)[:4]) for i in range(force.getNumTorsions())]


def _without(force: openmm.Force, drop: list[int]) -> openmm.Force:
    """Copy of ``force`` whose interactions ``drop`` contribute nothing."""
    force = copy.deepcopy(force)
    if isinstance(force, openmm.CMAPTorsionForce):
        size = force.getMapParameters(0)[0]
        zero_map = force.addMap(size, [0.0] * size * size)
    for i in drop:
        if isinstance(force, openmm.HarmonicBondForce):
            force.setBondParameters(i, *force.getBondParameters(i)[:3], 0.0)
        elif isinstance(force, openmm.HarmonicAngleForce):
            force.setAngleParameters(i, *force.getAngleParameters(i)[:4], 0.0)
        elif isinstance(force, openmm.PeriodicTorsionForce):
            force.setTorsionParameters(i, *force.getTorsionParameters(i)[:6], 0.0)
        elif isinstance(force, openmm.RBTorsionForce):
            force.setTorsionParameters(i, *force.getTorsionParameters(i)[:4], *[0.0] * 6)
        else:
            force.setTorsionParameters(i, zero_map, *force.getTorsionParameters(i)[1:9])
    return force


@pytest.mark.parametrize("name", ALL_CASES)
def test_subset_matches_filtered_openmm_force(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    n = case.n_atoms
    rng = np.random.default_rng(6)
    # All atoms but three survive, in shuffled order; a third of them count as the subset.
    kept = np.setdiff1d(np.arange(n), [PSI[-1], n - 2, n - 1])
    new_index = np.full(n, -1)
    new_index[kept] = rng.permutation(len(kept))
    in_subset = np.zeros(n, dtype=bool)
    in_subset[rng.choice(kept, size=n // 3, replace=False)] = True
    drop = [
        i for i, atoms in enumerate(_interaction_atoms(case.force))
        if not (all(new_index[a] >= 0 for a in atoms) and any(in_subset[a] for a in atoms))
    ]
    assert 0 < len(drop) < len(_interaction_atoms(case.force))

    sub = _term(case.force).subset(new_index, in_subset)
    assert sub.num_interactions == len(_interaction_atoms(case.force)) - len(drop)
    positions = _perturbed(case.positions, seed=8)
    sub_positions = np.zeros((len(positions), len(kept), 3))
    sub_positions[:, new_index[kept]] = positions[:, kept]
    energy_ref, forces_ref = _openmm(_without(case.force, drop), n, positions)
    energy, forces = _torch(sub, sub_positions)
    np.testing.assert_allclose(energy, energy_ref, rtol=ENERGY_RTOL, atol=ENERGY_ATOL)
    np.testing.assert_allclose(forces[:, new_index[kept]], forces_ref[:, kept], rtol=0, atol=FORCE_ATOL)


def test_subset_keeps_dtype(cases: dict[str, Case]) -> None:
    case = cases["CMAPTorsionForce-adp"]
    term = _term(case.force).to(torch.float32)
    sub = term.subset(np.arange(case.n_atoms), np.ones(case.n_atoms, dtype=bool))
    assert sub.coefficients.dtype == torch.float32 and sub.atoms.dtype == torch.int64


def test_collinear_angle_has_finite_forces() -> None:
    force = openmm.HarmonicAngleForce()
    force.addAngle(0, 1, 2, 1.9, 400.0)
    term = _term(force)
    for bend in (0.0, 1e-7):
        positions = np.array([[[-0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1, bend, 0.0]]])
        energy, forces = _torch(term, positions)
        theta = math.pi - math.atan2(bend, 0.1)
        assert energy[0] == pytest.approx(0.5 * 400.0 * (theta - 1.9) ** 2, rel=1e-12)
        assert np.isfinite(forces).all()
    energy_ref, _ = _openmm(force, 3, positions)
    np.testing.assert_allclose(energy, energy_ref, rtol=ENERGY_RTOL)


def test_from_force_without_interactions() -> None:
    for force_class, term_class in BONDED_TERMS.items():
        assert term_class.from_force(force_class()) is None
    assert set(BONDED_TERMS.values()) == {HarmonicBond, HarmonicAngle, PeriodicTorsion, RBTorsion, CMAPTorsion}
    assert {cls.categories for cls in BONDED_TERMS.values()} == {("bond",), ("angle",), ("torsion",), ("cmap",)}
