"""kNN regression backmapping baseline (seed 000) on a tiny benzene liquid: recall, generalisation, rigid-motion
equivariance, periodic images, files and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)

from openmm_backmap.backmap import KNNBackmapperModel, KNNRegressionBaseline
from openmm_backmap._units import UnitLayout
from openmm_backmap.data import AADataset
from openmm_backmap.mapping import CGMapping

TRAIN, TEST = np.arange(40), np.arange(45, 60)


@pytest.fixture(scope="module")
def benzene(tmp_path_factory):
    """(mapping, dataset path) of 60 frames (every 40 fs) of 20 benzene molecules, 3 beads each."""
    from openmm_backmap import systems
    from openmm_backmap.data import simulate_reference

    liq = systems.liquid("BENZ", 20, cutoff_nm=0.6, switch_nm=0.5)
    path = tmp_path_factory.mktemp("benzene") / "aa.h5"
    simulate_reference(path, liq.topology, liq.system, liq.positions, n_steps=1200, report_interval=20,
                       platform="CPU", progress=False, seed=1)
    return CGMapping.from_preset(liq.topology, "benzene-3bead"), path


@pytest.fixture(scope="module")
def frames(benzene):
    """Whole-molecule AA positions, beads and boxes of all frames (nm)."""
    mapping, path = benzene
    with AADataset(path) as ds:
        box = ds.box_vectors[:].astype(np.float64)
        aa = mapping.make_molecules_whole(ds.positions[:].astype(np.float64), box)
    return aa, mapping.map_positions(aa), box


@pytest.fixture(scope="module")
def model(benzene):
    return KNNRegressionBaseline(benzene[0]).fit(benzene[1], frames=TRAIN)


def _rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_training_frames_are_recalled_exactly(benzene, frames):
    mapping, path = benzene
    aa, cg, box = frames
    model = KNNRegressionBaseline(mapping, n_neighbors=1).fit(path, frames=TRAIN)
    score = model.score(path, frames=TRAIN)
    assert score["r2"] == pytest.approx(1.0, abs=1e-9)
    assert score["rmse_nm"] < 1e-9
    assert (score["n_frames"], score["n_units"]) == (40, 20)
    # The output is the mapping's whole-molecule AA frame in UnitLayout order (all 240 atoms here).
    out = model.backmap(cg[:5], box[:5])
    assert np.array_equal(model.atom_indices, UnitLayout(mapping).atoms)
    np.testing.assert_allclose(out, aa[:5, model.atom_indices], atol=1e-9)


def test_held_out_frames_beat_the_mean_structure(benzene, frames, model):
    mapping, path = benzene
    aa, cg, _ = frames
    kind = UnitLayout(mapping).kinds[0]

    def centred(idx):
        ub = cg[idx][:, kind.bead_index]
        return (aa[idx][:, kind.atom_index] - ub.mean(axis=-2, keepdims=True)).reshape(-1, kind.n_atoms, 3)

    mean_structure = centred(TRAIN).mean(axis=0)
    mean_rmse = np.sqrt(np.mean(np.sum((centred(TEST) - mean_structure) ** 2, axis=-1)))
    score = model.score(path, frames=TEST)
    assert score["r2"] > 0.99
    assert score["rmse_nm"] < 0.1 * mean_rmse
    # Rotating into the bead frame (align=True) beats seed 000's lab-frame regression on the same data.
    lab = KNNRegressionBaseline(mapping, align=False).fit(path, frames=TRAIN).score(path, frames=TEST)
    assert score["rmse_nm"] < 0.5 * lab["rmse_nm"] < 0.5 * mean_rmse


def test_cross_validation_over_time_blocks(benzene):
    cv = KNNRegressionBaseline(benzene[0]).cross_validate(benzene[1], n_splits=5, seed=0)
    assert cv["n_splits"] == 5 and cv["n_frames"] == 60 and len(cv["folds"]) == 5
    tested = sorted(f["test_frames"] for f in cv["folds"])
    assert tested == [(0, 11), (12, 23), (24, 35), (36, 47), (48, 59)]  # contiguous blocks covering everything
    r2 = [f["r2"] for f in cv["folds"]]
    assert cv["r2_mean"] == pytest.approx(np.mean(r2)) and cv["r2_std"] == pytest.approx(np.std(r2))
    assert cv["r2_mean"] > 0.99 and 0 < cv["rmse_nm_mean"] < 0.02
    # the seed only reorders the folds
    other = KNNRegressionBaseline(benzene[0]).cross_validate(benzene[1], n_splits=5, seed=3)
    assert other["r2_mean"] == pytest.approx(cv["r2_mean"])


def test_rigid_motions_of_the_input_move_the_output(frames, model):
    _, cg, _ = frames
    rot, shift = _rotation(7), np.array([1.5, -2.0, 0.7])
    out = model.backmap(cg[TEST[:3]])
    moved = model.backmap(cg[TEST[:3]] @ rot.T + shift)
    np.testing.assert_allclose(moved, out @ rot.T + shift, atol=1e-9)


def test_periodic_images_give_the_same_molecules(benzene, frames, model):
    mapping, _ = benzene
    _, cg, box = frames
    kind = UnitLayout(mapping).kinds[0]
    cg0, box0 = cg[50], box[50]
    out = model.backmap(cg0, box0)
    # one bead of unit 5 moved by a lattice vector: nothing changes
    broken = cg0.copy()
    broken[kind.bead_index[5, 1]] += box0[1] - box0[2]
    np.testing.assert_allclose(model.backmap(broken, box0), out, atol=1e-9)
    # all beads wrapped into the box: every molecule comes out whole, shifted by the image shift of its first bead
    frac = cg0 @ np.linalg.inv(box0)
    wrapped = cg0 - np.floor(frac) @ box0
    assert not np.allclose(wrapped, cg0)
    wrapped_out = model.backmap(wrapped, box0)
    layout = UnitLayout(mapping)
    for u in range(kind.n_units):
        atoms = layout.output_index[kind.atom_index[u]]
        first = kind.bead_index[u, 0]
        np.testing.assert_allclose(wrapped_out[atoms], out[atoms] + (wrapped[first] - cg0[first]), atol=1e-9)
    # without the box the broken molecule is not made whole: the output differs
    assert not np.allclose(model.backmap(broken), out, atol=1e-3)


def test_one_bead_units_get_the_mean_structure(benzene, frames):
    """Seed 000's degenerate case: one bead per molecule carries no shape or orientation."""
    mapping3, path = benzene
    aa, _, _ = frames
    mapping = CGMapping.from_preset(mapping3.aa_topology, "molecule")
    model = KNNRegressionBaseline(mapping).fit(path, frames=TRAIN)
    cg = mapping.map_positions(aa[TEST[:2]])
    out = model.backmap(cg)
    kind = model.layout.kinds[0]
    local = out[:, model.layout.output_index[kind.atom_index]] - cg[:, kind.bead_index]  # (F, U, 12, 3)
    np.testing.assert_allclose(local, np.broadcast_to(local[0, 0], local.shape), atol=1e-12)
    # it is the training mean of the bead-centred atoms
    ref = (aa[TRAIN][:, kind.atom_index] - mapping.map_positions(aa[TRAIN])[:, kind.bead_index]).reshape(-1, 12, 3)
    np.testing.assert_allclose(local[0, 0], ref.mean(axis=0), atol=1e-9)
    assert abs(model.score(path, frames=TEST)["r2"]) < 0.1


def test_save_and_load_round_trip(tmp_path, benzene, frames, model):
    _, cg, box = frames
    path = tmp_path / "knn.npz"
    model.save(path)
    loaded = KNNBackmapperModel.load(path, mapping=benzene[0])
    assert (loaded.n_neighbors, loaded.weights, loaded.align) == (5, "distance", True)
    np.testing.assert_array_equal(loaded.backmap(cg[TEST], box[TEST]), model.backmap(cg[TEST], box[TEST]))
    with np.load(path, allow_pickle=False) as blob:  # plain arrays only
        assert "header" in blob.files
    other = CGMapping.from_preset(benzene[0].aa_topology, "molecule")
    with pytest.raises(ValueError, match="another mapping"):
        KNNBackmapperModel.load(path, mapping=other)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable"):
        KNNBackmapperModel.load(tmp_path / "junk.npz")
    with pytest.raises(FileNotFoundError):
        KNNBackmapperModel.load(tmp_path / "missing.npz")


def test_bad_input_is_refused(benzene, frames, model):
    from openmm_backmap import systems

    mapping, path = benzene
    _, cg, box = frames
    with pytest.raises(ValueError, match="60 beads"):
        model.backmap(cg[:2, :-1])
    nan = cg[:2].copy()
    nan[1, 4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.backmap(nan)
    with pytest.raises(ValueError, match="box_vectors_nm"):
        model.backmap(cg[:2], box[:3])
    small = systems.liquid("BENZ", 6, cutoff_nm=0.4, switch_nm=0.3)
    with pytest.raises(ValueError, match="does not hold the AA system"):
        KNNRegressionBaseline(CGMapping.from_preset(small.topology, "benzene-3bead")).fit(path)
    with pytest.raises(ValueError, match="n_neighbors=25 exceeds the 20 training units"):
        KNNRegressionBaseline(mapping, n_neighbors=25).fit(path, frames=[0])
    with pytest.raises(ValueError, match="n_neighbors"):
        KNNRegressionBaseline(mapping, n_neighbors=0)
    with pytest.raises(ValueError, match="weights"):
        KNNRegressionBaseline(mapping, weights="gaussian")
    with pytest.raises(ValueError, match="n_splits"):
        KNNRegressionBaseline(mapping).cross_validate(path, n_splits=1)
