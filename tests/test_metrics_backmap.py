"""Backmapping evaluation metrics against analytic values, brute force and mdtraj."""
import itertools

import mdtraj
import numpy as np
import pytest
from deeptime.markov.msm import MarkovStateModel
from scipy.spatial.transform import Rotation

from openmm_backmap import metrics, systems


@pytest.fixture(scope="module")
def dipeptide():
    """(mdtraj topology, (22, 3) positions in nm) of alanine dipeptide."""
    built = systems.alanine_dipeptide()
    return mdtraj.Topology.from_openmm(built.topology), built.positions_nm


def _two_copies(top, xyz, offset_nm):
    """Two copies of a molecule, the second translated so that its lowest-x heavy atom sits ``offset_nm``
    along +x from the first copy's highest-x heavy atom: the closest heavy-atom pair is ``offset_nm`` apart."""
    heavy = np.array([a.element.symbol != "H" for a in top.atoms])
    shift = xyz[heavy, 0].max() - xyz[heavy, 0].min() + offset_nm
    second = xyz + [shift, 0.0, 0.0]
    i_max, i_min = np.flatnonzero(heavy)[xyz[heavy, 0].argmax()], np.flatnonzero(heavy)[xyz[heavy, 0].argmin()]
    second[:, 1:] += xyz[i_max, 1:] - xyz[i_min, 1:]
    return top.join(top), np.concatenate([xyz, second])


# --- bond and clash scores -------------------------------------------------------------------------


def test_bond_score_counts_stretched_bonds(dipeptide):
    top, xyz = dipeptide
    bonds = metrics.bonded_terms(top)["bonds"]
    ref = metrics.bond_reference_lengths(np.stack([xyz, xyz]), bonds)
    np.testing.assert_allclose(ref, np.linalg.norm(xyz[bonds[:, 0]] - xyz[bonds[:, 1]], axis=1))
    assert metrics.bond_score(xyz, bonds, ref) == 1.0
    # a synthetic 2-atom "molecule": bond lengths 1.00, 1.05, 1.15, 0.85, 0.95 × reference in 5 frames
    factors = np.array([1.0, 1.05, 1.15, 0.85, 0.95])
    pair = np.zeros((5, 2, 3))
    pair[:, 1, 0] = 0.15 * factors
    assert metrics.bond_score(pair, [[0, 1]], [0.15]) == pytest.approx(3 / 5)
    assert metrics.bond_score(pair, [[0, 1]], [0.15], tolerance=0.2) == 1.0
    with pytest.raises(ValueError):
        metrics.bond_score(pair, [[0, 1]], [0.15, 0.2])


def test_clash_score_two_molecules_close_and_apart(dipeptide):
    top, xyz = dipeptide
    assert metrics.clash_score(xyz, top) == 0.0  # a built structure has no clash
    close_top, close = _two_copies(top, xyz, 0.10)
    far_top, far = _two_copies(top, xyz, 0.50)
    pairs = metrics.clash_pairs(close, close_top)[0]
    assert len(pairs) >= 1 and np.all(pairs[:, 0] < 22) and np.all(pairs[:, 1] >= 22)
    d = np.linalg.norm(close[pairs[:, 0]] - close[pairs[:, 1]], axis=1)
    assert d.min() == pytest.approx(0.10, abs=1e-9)
    # both molecules clash; of 6 residues exactly the two holding the contact atoms do
    assert metrics.clash_score(close, close_top, groups="molecule") == 1.0
    res = {close_top.atom(int(k)).residue.index for k in pairs.ravel()}
    assert metrics.clash_score(close, close_top) == pytest.approx(len(res) / 6)
    assert metrics.clash_score(close, close_top, scope="intra") == 0.0
    assert metrics.clash_score(close, close_top, scope="inter", groups="molecule") == 1.0
    assert metrics.clash_score(far, far_top, groups="molecule") == 0.0
    # frames are averaged: one clashing and one clean frame -> 1/2
    assert metrics.clash_score(np.stack([close, far]), close_top, groups="molecule") == pytest.approx(0.5)


def test_clash_ignores_bonded_13_and_hydrogen_pairs():
    top = mdtraj.Topology()
    res = top.add_residue("X", top.add_chain())
    c = [top.add_atom(f"C{k}", mdtraj.element.carbon, res) for k in range(4)]
    h = [top.add_atom(f"H{k}", mdtraj.element.hydrogen, res) for k in range(2)]
    for a, b in [(c[0], c[1]), (c[1], c[2]), (c[2], c[3]), (c[0], h[0]), (c[3], h[1])]:
        top.add_bond(a, b)
    xyz = np.array([
        [0.00, 0.00, 0.0],  # C0
        [0.10, 0.00, 0.0],  # C1: 1-2 to C0 at 0.10 nm (excluded)
        [0.05, 0.00, 0.0],  # C2: 1-3 to C0 at 0.05 nm (excluded), 1-2 to C1
        [0.30, 0.00, 0.0],  # C3: far from all but C2
        [0.00, 0.05, 0.0],  # H0: 0.11 nm from C1, but hydrogens never clash
        [0.05, 0.00, 0.0],  # H1: on top of C2, ignored likewise
    ])
    assert metrics.clash_score(xyz, top) == 0.0
    xyz[3] = [0.0, 0.0, 0.08]  # C3 now 0.08 nm from C0 (1-4: a clash), 0.128 nm from C1, bonded to C2
    assert [tuple(p) for p in metrics.clash_pairs(xyz, top)[0]] == [(0, 3)]


def test_clash_pairs_use_minimum_image_in_orthorhombic_and_triclinic_boxes():
    top = mdtraj.Topology()
    chain = top.add_chain()
    for k in range(2):
        top.add_atom("O", mdtraj.element.oxygen, top.add_residue("HOH", chain))
    xyz = np.array([[0.05, 1.0, 1.0], [2.95, 1.0, 1.0]])  # 0.1 nm apart through the x face
    box = np.diag([3.0, 3.0, 3.0])
    assert metrics.clash_score(xyz, top) == 0.0
    assert metrics.clash_score(xyz, top, box_vectors_nm=box) == 1.0
    tric = np.array([[3.0, 0.0, 0.0], [1.0, 3.0, 0.0], [-1.5, 1.0, 3.0]])
    xyz_t = np.array([[0.2, 0.3, 0.4], [0.2, 0.3, 0.4]]) + [[0, 0, 0], list(tric[2] + tric[1] - [0.0, 0.0, 0.09])]
    assert metrics.clash_pairs(xyz_t, top, box_vectors_nm=tric)[0].tolist() == [[0, 1]]
    assert metrics.clash_pairs(xyz_t, top)[0].shape == (0, 2)


# --- energies --------------------------------------------------------------------------------------


def test_energy_distribution_detects_shift():
    rng = np.random.default_rng(2)
    ref = rng.normal(-300.0, 10.0, 100_000)
    same = metrics.energy_distribution(ref, rng.normal(-300.0, 10.0, 100_000))
    assert same["jsd"] < 2e-3 and abs(same["mean_shift_kj_mol"]) < 0.3
    shifted = metrics.energy_distribution(ref, ref + 25.0)
    assert shifted["mean_shift_kj_mol"] == pytest.approx(25.0)
    assert shifted["predicted_mean_kj_mol"] - shifted["reference_mean_kj_mol"] == pytest.approx(25.0)
    assert shifted["reference_std_kj_mol"] == pytest.approx(10.0, rel=0.02)
    assert shifted["predicted_std_kj_mol"] == pytest.approx(shifted["reference_std_kj_mol"])
    # two unit-variance Gaussians 2.5 sigma apart: JSD well between 0 and ln 2
    assert 0.3 < shifted["jsd"] < np.log(2)


def test_energy_distribution_counts_far_outliers_against_the_match():
    """Half the predicted frames with overlapping atoms (energies spread over many orders of magnitude): half the
    predicted mass lies where the reference has none, so the JSD is that of [1, 0] vs [0.5, 0.5] (0.216 nats),
    however far the outliers go.  (Bins on a range taken from both samples gave 0.025 here.)"""
    rng = np.random.default_rng(5)
    ref = rng.normal(-300.0, 10.0, 20_000)
    outliers = 10.0 ** rng.uniform(2, 16, 10_000)
    pred = np.concatenate([rng.normal(-300.0, 10.0, 10_000), outliers])
    p, q = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    m = 0.5 * (p + q)
    two_bin = 0.5 * np.sum(p[p > 0] * np.log(p[p > 0] / m[p > 0])) + 0.5 * np.sum(q * np.log(q / m))
    jsd = metrics.energy_distribution(ref, pred)["jsd"]
    assert jsd == pytest.approx(two_bin, abs=0.02)
    assert metrics.energy_distribution(ref, np.concatenate([pred[:10_000], -outliers]))["jsd"] == pytest.approx(
        two_bin, abs=0.02)  # below the reference too


# --- internal coordinates --------------------------------------------------------------------------


def test_bonded_terms_of_alanine_dipeptide(dipeptide):
    top, _ = dipeptide
    terms = metrics.bonded_terms(top)
    assert terms["bonds"].shape == (21, 2)  # 22 atoms, acyclic, one molecule
    # angles: Σ_j C(deg_j, 2); dihedrals: Σ_bonds (deg_j − 1)(deg_k − 1) in an acyclic graph
    deg = np.bincount(terms["bonds"].ravel(), minlength=22)
    assert len(terms["angles"]) == np.sum(deg * (deg - 1) // 2)
    b = terms["bonds"]
    assert len(terms["dihedrals"]) == np.sum((deg[b[:, 0]] - 1) * (deg[b[:, 1]] - 1))
    bonded = {tuple(sorted(p)) for p in b.tolist()}
    for i, j, k, l in terms["dihedrals"]:
        assert {tuple(sorted(p)) for p in [(i, j), (j, k), (k, l)]} <= bonded
    heavy = metrics.bonded_terms(top, heavy_only=True)
    assert heavy["bonds"].shape == (9, 2)  # 10 heavy atoms in a tree
    symbols = np.array([a.element.symbol for a in top.atoms])
    assert all((symbols[heavy[k]] != "H").all() for k in heavy)
    # the backbone φ (C-N-CA-C) is among the proper dihedrals
    phi = mdtraj.compute_phi(mdtraj.Trajectory(np.zeros((1, 22, 3)), top))[0][0]
    listed = {tuple(d) for d in terms["dihedrals"].tolist()}
    assert tuple(phi.tolist()) in listed or tuple(phi.tolist()[::-1]) in listed


def _noisy_frames(xyz, n_frames, sigma, seed):
    rng = np.random.default_rng(seed)
    return xyz + rng.normal(scale=sigma, size=(n_frames,) + xyz.shape)


def test_internal_coordinate_jsd_and_psi(dipeptide):
    top, xyz = dipeptide
    ref = _noisy_frames(xyz, 400, 0.005, 3)
    zero = metrics.psi_score(ref, ref, top)
    assert zero == {"bonds": 0.0, "angles": 0.0, "dihedrals": 0.0, "total": 0.0}
    jsd0 = metrics.internal_coordinate_jsd(ref, ref, top)
    assert jsd0["bonds_max"] == 0.0 and jsd0["dihedrals_max"] == 0.0
    n = {k: len(v) for k, v in metrics.bonded_terms(top).items()}
    assert (jsd0["n_bonds"], jsd0["n_angles"], jsd0["n_dihedrals"]) == (n["bonds"], n["angles"], n["dihedrals"])
    # disjoint bond distributions: all bonds 1.5x longer -> Ψ = 2 per bond term, JSD = ln 2
    com = xyz.mean(axis=0)
    stretched = _noisy_frames(com + 1.5 * (xyz - com), 400, 0.001, 4)
    narrow = _noisy_frames(xyz, 400, 0.001, 5)
    psi = metrics.psi_score(narrow, stretched, top)
    assert psi["bonds"] == pytest.approx(2.0 * n["bonds"])
    assert psi["angles"] < 0.8 * 2 * n["angles"]  # uniform scaling keeps angles: far from disjoint
    assert psi["total"] == pytest.approx(psi["bonds"] + psi["angles"] + psi["dihedrals"])
    jsd = metrics.internal_coordinate_jsd(narrow, stretched, top)
    assert jsd["bonds_mean"] == pytest.approx(np.log(2))
    # a mirror image keeps every bond and angle and flips the sign of every dihedral
    mirrored = narrow * [1.0, 1.0, -1.0]
    psi_mirror = metrics.psi_score(narrow, mirrored, top)
    assert psi_mirror["bonds"] < 1e-2 and psi_mirror["angles"] < 1e-2
    assert metrics.internal_coordinate_jsd(narrow, mirrored, top)["dihedrals_max"] > 0.5
    # per-distribution Ψ equals the L1 distance of the normalised 5°-bin histograms over [-π, π)
    dih = metrics.bonded_terms(top)["dihedrals"]
    edges = np.linspace(-np.pi, np.pi, 73)
    expected = 0.0
    for term in dih:
        a = np.histogram(metrics.dihedrals(narrow, term[None]), edges)[0]
        b = np.histogram(metrics.dihedrals(mirrored, term[None]), edges)[0]
        expected += np.abs(a / a.sum() - b / b.sum()).sum()
    assert psi_mirror["dihedrals"] == pytest.approx(expected, rel=1e-2)


def _chain_topology(n_atoms, ring=False):
    top = mdtraj.Topology()
    res = top.add_residue("X", top.add_chain())
    atoms = [top.add_atom(f"C{k}", mdtraj.element.carbon, res) for k in range(n_atoms)]
    for a, b in zip(atoms, atoms[1:] + atoms[:1] if ring else atoms[1:]):
        top.add_bond(a, b)
    return top


def test_bonded_terms_of_rings():
    three = metrics.bonded_terms(_chain_topology(3, ring=True))
    assert (len(three["bonds"]), len(three["angles"]), len(three["dihedrals"])) == (3, 3, 0)  # no i-j-k-i
    four = metrics.bonded_terms(_chain_topology(4, ring=True))
    assert (len(four["bonds"]), len(four["angles"]), len(four["dihedrals"])) == (4, 4, 4)


def _bent_triatomic(rng, n, r1, r2, theta, sigma):
    """Frames of a 3-atom chain with bond lengths r1, r2 (nm) and angle theta (rad), with Gaussian noise."""
    l1, l2 = rng.normal(r1, sigma, n), rng.normal(r2, sigma, n)
    t = rng.normal(theta, 10 * sigma, n)
    xyz = np.zeros((n, 3, 3))
    xyz[:, 0, 0] = l1
    xyz[:, 2, 0], xyz[:, 2, 1] = l2 * np.cos(t), l2 * np.sin(t)
    return xyz


def test_psi_and_jsd_match_hand_made_histograms():
    top = _chain_topology(3)
    rng = np.random.default_rng(19)
    ref = _bent_triatomic(rng, 500, 0.150, 0.140, 1.9, 0.004)
    pred = _bent_triatomic(rng, 300, 0.153, 0.140, 2.0, 0.005)
    # reference values, from mdtraj in float32 like the metric
    t_ref, t_pred = mdtraj.Trajectory(ref, top), mdtraj.Trajectory(pred, top)
    expected_psi, expected_jsd = {}, {}
    for kind, terms, compute in [("bonds", [[0, 1], [1, 2]], mdtraj.compute_distances),
                                 ("angles", [[0, 1, 2]], mdtraj.compute_angles)]:
        psi, jsd = 0.0, []
        for term in terms:
            a = compute(t_ref, [term]).astype(float).ravel()
            b = compute(t_pred, [term]).astype(float).ravel()
            if kind == "bonds":
                both = np.concatenate([a, b])
                lo, hi, n = np.percentile(both, 0.1), np.percentile(both, 99.9), 100
            else:
                lo, hi, n = 0.0, np.pi, 180
            ha = np.histogram(np.clip(a, lo, hi), n, (lo, hi))[0]
            hb = np.histogram(np.clip(b, lo, hi), n, (lo, hi))[0]
            psi += np.abs(ha / ha.sum() - hb / hb.sum()).sum()
            jsd.append(metrics.jensen_shannon(ha, hb))
        expected_psi[kind], expected_jsd[kind] = psi, jsd
    got = metrics.psi_score(ref, pred, top)
    assert got["bonds"] == pytest.approx(expected_psi["bonds"], abs=1e-9)
    assert got["angles"] == pytest.approx(expected_psi["angles"], abs=1e-9)
    assert got["dihedrals"] == 0.0 and got["total"] == pytest.approx(got["bonds"] + got["angles"])
    jsd = metrics.internal_coordinate_jsd(ref, pred, top)
    assert jsd["bonds_mean"] == pytest.approx(np.mean(expected_jsd["bonds"]), abs=1e-12)
    assert jsd["bonds_max"] == pytest.approx(np.max(expected_jsd["bonds"]), abs=1e-12)
    assert jsd["angles_mean"] == pytest.approx(expected_jsd["angles"][0], abs=1e-12)
    assert jsd["n_dihedrals"] == 0 and np.isnan(jsd["dihedrals_mean"])
    # a bin count given per kind is used for that kind only
    coarse = metrics.psi_score(ref, pred, top, bins={"angles": 18})
    assert coarse["bonds"] == got["bonds"] and coarse["angles"] != got["angles"]


def test_pooling_merges_equivalent_terms_of_identical_molecules(dipeptide):
    top, xyz = dipeptide
    both_top, both = _two_copies(top, xyz, 0.5)
    frames = _noisy_frames(both, 50, 0.003, 6)
    pooled = metrics.internal_coordinate_jsd(frames, frames, both_top)
    separate = metrics.internal_coordinate_jsd(frames, frames, both_top, pool_equivalent=False)
    assert separate["n_bonds"] == 2 * pooled["n_bonds"] == 2 * 21


# --- dynamics --------------------------------------------------------------------------------------


def test_intra_frame_velocities_of_uniform_motion():
    rng = np.random.default_rng(7)
    start = rng.uniform(0, 2, size=(10, 3))
    velocity = rng.normal(size=(10, 3))  # nm/ps
    lag = 0.5
    xyz = start + lag * np.arange(6)[:, None, None] * velocity
    speeds = metrics.intra_frame_velocities(xyz, lag)
    assert speeds.shape == (5, 10)
    np.testing.assert_allclose(speeds, np.broadcast_to(np.linalg.norm(velocity, axis=1), (5, 10)))
    np.testing.assert_allclose(metrics.intra_frame_velocities(xyz, lag, atom_indices=[3])[:, 0],
                               np.linalg.norm(velocity[3]))
    assert metrics.velocity_jsd(xyz, xyz, lag) == 0.0
    assert metrics.velocity_jsd(xyz, 3 * xyz, lag) > 0.5  # all speeds tripled
    with pytest.raises(ValueError):
        metrics.intra_frame_velocities(xyz[:1], lag)


def test_velocity_jsd_by_element(dipeptide):
    top, xyz = dipeptide
    a, b = _noisy_frames(xyz, 50, 0.01, 8), _noisy_frames(xyz, 50, 0.01, 9)
    per = metrics.velocity_jsd_by_element(a, b, 0.1, top)
    assert set(per) == {"C", "H", "N", "O"} and all(0 <= v < 0.3 for v in per.values())


def _two_state_chain(transition, n_frames, seed):
    """A trajectory of the Markov chain with the given transition matrix, starting in state 0."""
    return MarkovStateModel(transition).simulate(n_frames, start=0, seed=seed)


def test_implied_timescale_of_two_state_markov_chain():
    transition = np.array([[0.98, 0.02], [0.03, 0.97]])
    expected = -1.0 / np.log(1 - 0.02 - 0.03)  # λ2 = 0.95 -> 19.50 frames, independent of the lag
    chains = [_two_state_chain(transition, 10_000, seed) for seed in (10, 11)]
    rng = np.random.default_rng(12)
    features = [np.where(c == 0, -1.0, 1.0)[:, None] + rng.normal(scale=0.1, size=(len(c), 1)) for c in chains]
    out = metrics.implied_timescales(features, 5, n_clusters=2, dt_ps=2.0, n_timescales=1, n_samples=200)
    assert out["lag_ps"] == 10.0
    assert out["lower_ps"][0] < 2.0 * expected < out["upper_ps"][0]
    assert out["lower_ps"][0] < out["timescales_ps"][0] < out["upper_ps"][0]
    assert out["ml_timescales_ps"][0] == pytest.approx(2 * expected, rel=0.15)
    assert out["cluster_centers"].shape == (2, 1)
    np.testing.assert_allclose(np.sort(out["cluster_centers"].ravel()), [-1, 1], atol=0.01)
    # same seed -> same result; given centres reproduce the discretisation
    again = metrics.implied_timescales(features, 5, cluster_centers=out["cluster_centers"], dt_ps=2.0,
                                       n_timescales=1, n_samples=200)
    np.testing.assert_allclose(again["upper_ps"], out["upper_ps"])
    # several lags at once, and a timescale beyond the 2-state model is NaN
    multi = metrics.implied_timescales_discrete(chains, [1, 10], n_timescales=2, n_samples=20)
    assert multi["timescales_ps"].shape == (2, 2) and np.isnan(multi["timescales_ps"][:, 1]).all()
    np.testing.assert_allclose(multi["ml_timescales_ps"][:, 0], expected, rtol=0.15)


def test_implied_timescale_intervals_are_calibrated():
    """95% intervals from independent 2-state chains hold the true timescale about 95% of the time."""
    transition = np.array([[0.98, 0.02], [0.03, 0.97]])
    expected = -1.0 / np.log(0.95)
    hits = []
    for seed in range(80):
        out = metrics.implied_timescales_discrete(_two_state_chain(transition, 2000, 100 + seed), 5,
                                                  n_timescales=1, n_samples=100, seed=seed)
        hits.append(out["lower_ps"][0] < expected < out["upper_ps"][0])
    assert 0.85 <= np.mean(hits) <= 1.0  # measured 0.95; "effective" counts 0.64, "sliding" 0.58


def test_implied_timescales_angles_and_errors():
    rng = np.random.default_rng(13)
    chain = _two_state_chain(np.array([[0.9, 0.1], [0.1, 0.9]]), 3000, 14)
    # angles straddling ±π in state 1: the (cos, sin) map keeps them together
    phi = np.where(chain == 0, 0.0, np.pi) + rng.normal(scale=0.2, size=len(chain))
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    out = metrics.implied_timescales(phi, 2, n_clusters=2, angles=True, n_timescales=1, n_samples=20)
    assert out["cluster_centers"].shape == (2, 2)
    assert out["ml_timescales_ps"][0] == pytest.approx(-1 / np.log(0.8), rel=0.25)
    with pytest.raises(ValueError, match="too few frames"):
        metrics.implied_timescales(np.zeros((5, 1)), 2, n_clusters=10)
    with pytest.raises(ValueError, match="too few frames"):
        metrics.implied_timescales_discrete([np.array([0, 1, 0])], 5)
    with pytest.raises(ValueError, match="connected set"):
        metrics.implied_timescales_discrete([np.zeros(100, dtype=int)], 1, n_states=3)


# --- structure -------------------------------------------------------------------------------------


def test_rmsd_of_rigid_copy_and_known_perturbation():
    rng = np.random.default_rng(15)
    xyz = rng.normal(size=(4, 30, 3))
    rot = Rotation.random(4, random_state=16).as_matrix()
    moved = np.einsum("fij,fnj->fni", rot, xyz) + rng.normal(size=(4, 1, 3))
    np.testing.assert_allclose(metrics.rmsd_nm(xyz, moved), 0.0, atol=1e-7)
    assert np.all(metrics.rmsd_nm(xyz, moved, align=False) > 0.1)
    # scaling the octahedron ±e_k by (1 + ε) cannot be rotated away: RMSD = ε
    octahedron = np.concatenate([np.eye(3), -np.eye(3)])
    assert metrics.rmsd_nm(octahedron, 1.03 * octahedron)[0] == pytest.approx(0.03)
    # random perturbations agree with mdtraj's (QCP) superposed RMSD
    pert = xyz + rng.normal(scale=0.05, size=xyz.shape)
    top = mdtraj.Topology()
    res = top.add_residue("X", top.add_chain())
    for _ in range(30):
        top.add_atom("C", mdtraj.element.carbon, res)
    for f in range(4):
        expected = mdtraj.rmsd(mdtraj.Trajectory(pert[f:f + 1], top), mdtraj.Trajectory(xyz[f:f + 1], top))[0]
        assert metrics.rmsd_nm(xyz[f], pert[f])[0] == pytest.approx(expected, abs=1e-5)
    # no alignment: uniform displacement d of every atom -> RMSD = d; with alignment -> 0
    shifted = xyz + np.array([0.3, 0.4, 0.0])
    np.testing.assert_allclose(metrics.rmsd_nm(xyz, shifted, align=False), 0.5)
    np.testing.assert_allclose(metrics.rmsd_nm(xyz, shifted), 0.0, atol=1e-7)
    # a mirror image is not a rotation: RMSD > 0
    assert np.all(metrics.rmsd_nm(xyz, xyz * [1, 1, -1]) > 0.1)
    assert metrics.rmsd_nm(xyz[0], moved, atom_indices=[0, 1, 2]).shape == (4,)


def test_rdf_of_uniform_points_is_one_and_l1_distance():
    rng = np.random.default_rng(17)
    box = np.diag([3.0, 3.0, 3.0])
    xyz = rng.uniform(0, 3.0, size=(5, 800, 3))
    r, g = metrics.radial_distribution(xyz, box, np.arange(800), r_max_nm=1.2, n_bins=60)
    assert r.shape == g.shape == (60,) and r[0] == pytest.approx(0.01)
    assert np.mean(g[15:]) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(g[15:] - 1) < 0.08)
    assert metrics.rdf_l1_nm(r, g, g) == 0.0
    assert metrics.rdf_l1_nm(r, np.ones_like(r), np.ones_like(r) + 0.5) == pytest.approx(0.5 * 1.2)
    # with intramolecular exclusion (10 "molecules" of 80 uncorrelated points: 10% of the pairs excluded),
    # the normalisation counts only the included pairs, so g stays ~1
    mol = np.arange(800) // 80
    _, g2 = metrics.radial_distribution(xyz, box, np.arange(0, 800, 2), np.arange(800), r_max_nm=1.2,
                                        n_bins=60, exclude_same_molecule=mol)
    assert np.mean(g2[15:]) == pytest.approx(1.0, abs=0.01)
    _, g3 = metrics.radial_distribution(xyz, box, np.arange(800), r_max_nm=1.2, n_bins=60,
                                        exclude_same_molecule=mol)
    assert np.mean(g3[15:]) == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError):
        metrics.radial_distribution(xyz, box, np.arange(800), r_max_nm=1.6)


def test_rdf_excludes_intramolecular_pairs():
    """Randomly placed rigid dimers (bond 0.15 nm): the bond shows as a peak unless excluded."""
    rng = np.random.default_rng(20)
    box = np.diag([3.0, 3.2, 3.4])
    first = rng.uniform(0, [3.0, 3.2, 3.4], size=(4, 500, 3))
    direction = rng.normal(size=(4, 500, 3))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    xyz = np.stack([first, first + 0.15 * direction], axis=2).reshape(4, 1000, 3)
    molecule = np.repeat(np.arange(500), 2)
    r, g_all = metrics.radial_distribution(xyz, box, np.arange(1000), r_max_nm=1.0, n_bins=50)
    _, g_inter = metrics.radial_distribution(xyz, box, np.arange(1000), r_max_nm=1.0, n_bins=50,
                                             exclude_same_molecule=molecule)
    peak = np.searchsorted(r + 0.01, 0.15)  # the bin [0.14, 0.16)
    assert r[peak] == pytest.approx(0.15)
    # expected peak without exclusion: 500 bonded pairs per frame on top of the ideal-gas count
    volume = np.linalg.det(box)
    shell = 4 / 3 * np.pi * (0.16 ** 3 - 0.14 ** 3)
    assert g_all[peak] == pytest.approx(1 + 500 / (1000 * 999 / 2 / volume * shell), rel=0.1)
    assert g_inter[peak] == pytest.approx(1.0, abs=0.2)
    assert np.mean(g_inter[10:]) == pytest.approx(1.0, abs=0.02)


def _brute_force_min_image(xyz, box):
    """Minimum-image distances of all pairs i < j (in ``itertools.combinations`` order): the shortest of
    the 27 images around the fractional-rounded displacement."""
    i, j = np.array(list(itertools.combinations(range(len(xyz)), 2))).T
    frac = (xyz[j] - xyz[i]) @ np.linalg.inv(box)
    frac -= np.round(frac)
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=3)))
    return np.linalg.norm((frac[:, None, :] + shifts[None]) @ box, axis=-1).min(axis=1)


def test_rdf_in_triclinic_box_matches_brute_force_minimum_image():
    rng = np.random.default_rng(18)
    box = np.array([[2.5, 0.0, 0.0], [0.8, 2.4, 0.0], [-1.1, 0.9, 2.2]])  # OpenMM reduced form
    frac = rng.uniform(-0.5, 1.5, size=(120, 3))  # some points outside the cell
    xyz = frac @ box
    r_max = 0.9
    r, g = metrics.radial_distribution(xyz, box, np.arange(120), r_max_nm=r_max, n_bins=30)
    d_all = _brute_force_min_image(xyz, box)
    d = d_all[d_all < r_max]
    edges = np.linspace(0, r_max, 31)
    shell = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    expected = np.histogram(d, edges)[0] / (120 * 119 / 2 / np.linalg.det(box) * shell)
    np.testing.assert_allclose(g, expected, rtol=1e-12)
    # overlapping groups A = 0..79, B = 40..119: ordered pairs (a, b) with a != b, 80 * 80 - 40 of them
    cross = {tuple(sorted(p)) for p in itertools.product(range(80), range(40, 120)) if p[0] != p[1]}
    mult = {p: (1 + (p[0] >= 40 and p[1] < 80)) for p in cross}  # pairs inside A ∩ B are counted twice
    d_pair = dict(zip(itertools.combinations(range(120), 2), d_all))
    d_cross = np.concatenate([[d_pair[p]] * mult[p] for p in cross])
    _, g_ab = metrics.radial_distribution(xyz, box, np.arange(80), np.arange(40, 120), r_max_nm=r_max, n_bins=30)
    expected_ab = np.histogram(d_cross, edges)[0] / ((80 * 80 - 40) / np.linalg.det(box) * shell)
    np.testing.assert_allclose(g_ab, expected_ab, rtol=1e-12)
