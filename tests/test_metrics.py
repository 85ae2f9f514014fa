"""Metric definitions against analytic values and mdtraj."""
import mdtraj
import numpy as np
import pytest

from openmm_backmap import metrics


def test_jensen_shannon_analytic_values():
    assert metrics.jensen_shannon([1, 0], [0, 1]) == pytest.approx(np.log(2))  # disjoint: ln 2
    assert metrics.jensen_shannon([3, 1], [6, 2]) == pytest.approx(0.0, abs=1e-15)  # normalisation
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert metrics.jensen_shannon(p, q) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.jensen_shannon([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        metrics.jensen_shannon([0, 0], [1, 2])


def test_histogram_and_fes_jsd_behave():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200_000), rng.normal(size=200_000)
    assert metrics.histogram_jsd(a, b) < 1e-3                      # same distribution
    assert metrics.histogram_jsd(a, b + 5) > 0.6                   # nearly disjoint
    phi, psi = rng.uniform(-np.pi, np.pi, (2, 300_000))
    assert metrics.fes_jsd(phi, psi, phi[::-1], psi[::-1]) < 0.01
    # uniform vs the same mass folded onto half the support: 0.5*(0.5 ln 2/3 + 0.5 ln 2) + 0.5 ln 4/3
    expected = 0.5 * (0.5 * np.log(2 / 3) + 0.5 * np.log(2)) + 0.5 * np.log(4 / 3)
    assert metrics.fes_jsd(phi, psi, np.abs(phi), psi) == pytest.approx(expected, rel=2e-2)
    f, edges = metrics.free_energy_surface(phi, psi)
    assert f.shape == (36, 36) and np.nanmin(f) == 0 and len(edges) == 37


def test_geometry_matches_mdtraj():
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(7, 5, 3)).astype(np.float32)
    top = mdtraj.Topology()
    res = top.add_residue("X", top.add_chain())
    for k in range(5):
        top.add_atom(f"C{k}", mdtraj.element.carbon, res)
    traj = mdtraj.Trajectory(xyz, top)
    pairs, triples, quads = [[0, 1], [2, 4]], [[0, 1, 2], [1, 3, 4]], [[0, 1, 2, 3], [4, 3, 1, 0]]
    np.testing.assert_allclose(metrics.distances(xyz, pairs), mdtraj.compute_distances(traj, pairs), rtol=1e-5)
    np.testing.assert_allclose(metrics.angles(xyz, triples), mdtraj.compute_angles(traj, triples), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics.dihedrals(xyz, quads), mdtraj.compute_dihedrals(traj, quads), rtol=1e-4, atol=1e-5)
