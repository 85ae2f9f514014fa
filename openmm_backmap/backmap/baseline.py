"""Regression backmapping baseline: k-nearest-neighbour regression from bead to atom coordinates (seed 000).

Seed 000 (An & Deshmukh) backmaps a CG liquid molecule by molecule: for every molecule the bead coordinates
(centred on the molecule's centre of mass) are the features and the atom coordinates (centred the same way) the
targets of a multi-output regressor (kNN, ANN, GPR, RF, ...), judged by R² and RMSE with 5-fold cross
validation. This module builds the kNN variant in the estimator/model style of deeptime::

    baseline = KNNRegressionBaseline(mapping, n_neighbors=5)
    model = baseline.fit("aa.h5")                    # -> KNNBackmapperModel
    aa_nm = model.backmap(cg_nm, box_vectors_nm)     # (n_frames, n_out_atoms, 3)
    baseline.cross_validate("aa.h5", n_splits=5)     # R² and RMSE, mean ± std over folds

Work is done per *unit* (a molecule that holds beads, see :class:`~openmm_backmap._units.UnitLayout`)
and per unit *kind*: all units of one kind share one regressor, so a model trained on a box of 20 benzene
molecules backmaps a box of any number of them.

Differences to seed 000, all documented where they act:

* the centre is the unit's bead centroid (known at inference time; seed 000 centres on the molecule's COM);
* ``align=True`` (default, our improvement): units with at least three beads are rotated into a canonical frame
  (Kabsch fit of a bead template onto the unit's beads) before the regression, and the prediction is rotated
  back. The regressor then only has to learn internal shape, not orientation, and the result is exactly
  equivariant to rotations and translations of the CG input. Seed 000 regresses lab-frame coordinates;
  ``align=False`` reproduces that;
* folds of the cross validation are contiguous blocks of time (frames of one trajectory are correlated;
  seed 000 splits at random).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .._validation import as_box_vectors, as_coordinates
from .._units import UnitKind, UnitLayout, kabsch, whole

__all__ = ["KNNBackmapperModel", "KNNRegressionBaseline"]

FORMAT = "openmm-backmap/knn-baseline"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------- unit geometry
def _unit_beads(beads: np.ndarray, kind: UnitKind, box: Optional[np.ndarray]) -> np.ndarray:
    """Beads ``(F, n_beads, 3)`` → ``(F, U, nb, 3)`` of one kind, each unit made whole (minimum image to its first
    bead) when ``box`` ``(F, 3, 3)`` is given."""
    ub = beads[:, kind.bead_index]
    if box is None or kind.n_beads == 1:
        return ub
    return whole(torch.from_numpy(ub), torch.from_numpy(box)[:, None]).numpy()


def _local_frames(ub: np.ndarray,
                  template: Optional[np.ndarray]) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Centres ``(F, U, 1, 3)``, rotations ``Q`` ``(F, U, 3, 3)`` (or ``None``) and features ``(F*U, nb*3)``.

    With a template, ``beads - centre ≈ template @ Q.T``; the canonical coordinates of any point ``x`` of the unit
    are ``(x - centre) @ Q``.
    """
    centre = ub.mean(axis=-2, keepdims=True)
    local = ub - centre
    rot = None
    if template is not None:
        src = torch.from_numpy(np.broadcast_to(template, local.shape).copy())
        rot = kabsch(src, torch.from_numpy(local)).numpy()
        local = local @ rot
    return centre, rot, local.reshape(-1, local.shape[-2] * 3)


def _bead_template(local: np.ndarray, n_iter: int = 3, max_units: int = 20_000) -> np.ndarray:
    """Mean bead shape ``(nb, 3)`` of centred units ``(N, nb, 3)`` by generalised Procrustes analysis (a few
    rounds of aligning every unit onto the current mean), deterministic."""
    if len(local) > max_units:
        local = local[np.linspace(0, len(local) - 1, max_units).astype(np.int64)]
    mean = local[0]
    loc = torch.from_numpy(local)
    for _ in range(n_iter):
        src = torch.from_numpy(np.broadcast_to(mean, local.shape).copy())
        rot = kabsch(src, loc).numpy()
        mean = (local @ rot).mean(axis=0)
    # principal axes of the template along x, y, z: a tidy canonical frame (any fixed frame would do)
    _, _, vt = np.linalg.svd(mean - mean.mean(axis=0))
    if np.linalg.det(vt) < 0:
        vt[2] *= -1
    return (mean - mean.mean(axis=0)) @ vt.T


def _r2_rmse(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """R² (sklearn's uniform average over output columns) and RMSE per atom (nm) of ``(N, n_atoms, 3)`` arrays."""
    from sklearn.metrics import r2_score

    flat_t, flat_p = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
    r2 = float(r2_score(flat_t, flat_p, multioutput="uniform_average")) if len(y_true) > 1 else float("nan")
    rmse = float(np.sqrt(np.mean(np.sum((y_true - y_pred) ** 2, axis=-1))))
    return r2, rmse


# ----------------------------------------------------------------------------------------------- data
def _load_aa(mapping, data: Any, frames: Optional[Sequence[int]], box_vectors_nm: Any) -> tuple[np.ndarray, np.ndarray]:
    """AA positions ``(F, n_atoms, 3)`` (molecules whole) and bead positions ``(F, n_beads, 3)``, nm."""
    from ..data import TrajectoryDataset

    if isinstance(data, (str, os.PathLike, TrajectoryDataset)):
        own = not isinstance(data, TrajectoryDataset)
        ds = TrajectoryDataset(data) if own else data
        try:
            if ds.topology_fingerprint != mapping.topology_fingerprint or ds.n_atoms != mapping.n_atoms:
                raise ValueError(f"{ds.path} does not hold the AA system of this mapping ({ds.n_atoms} atoms, "
                                 f"fingerprint {ds.topology_fingerprint}; the mapping has {mapping.n_atoms} atoms, "
                                 f"{mapping.topology_fingerprint})")
            idx = np.arange(ds.n_frames) if frames is None else np.asarray(frames, dtype=np.int64).ravel()
            if len(idx) == 0:
                raise ValueError("no frames selected")
            try:
                positions = ds.positions[idx]
                box = ds.box_vectors[idx] if ds.periodic else None
            except IndexError as exc:
                raise ValueError(f"{ds.path}: {exc}") from exc
            positions = as_coordinates(positions, mapping.n_atoms, name=f"{ds.path}:positions")
        finally:
            if own:
                ds.close()
    else:
        positions = as_coordinates(data, mapping.n_atoms, name="aa_positions_nm")
        if positions.ndim == 2:
            positions = positions[None]
        box = None
        if box_vectors_nm is not None:
            box = as_box_vectors(box_vectors_nm, name="box_vectors_nm")
            if box.ndim == 2:
                box = np.broadcast_to(box, (len(positions), 3, 3))
        if box is not None and box.shape != (len(positions), 3, 3):
            raise ValueError(f"box_vectors_nm has shape {box.shape}; expected (3, 3) or ({len(positions)}, 3, 3)")
        if frames is not None:
            sel = np.asarray(frames, dtype=np.int64).ravel()
            if len(sel) == 0:
                raise ValueError("no frames selected")
            if sel.min() < -len(positions) or sel.max() >= len(positions):
                raise ValueError(f"frame indices out of range for {len(positions)} frames")
            positions = positions[sel]
            box = None if box is None else box[sel]
    if box is not None:
        box = np.asarray(box, dtype=np.float64)
        if box.shape != (len(positions), 3, 3):
            raise ValueError(f"box_vectors_nm has shape {box.shape}; expected (3, 3) or ({len(positions)}, 3, 3)")
        positions = mapping.make_molecules_whole(positions, box)
    return positions, mapping.map_positions(positions)


# ------------------------------------------------------------------------------------------------ model
@dataclass
class _KindModel:
    """What the model keeps for one unit kind."""

    template: Optional[np.ndarray]  # (nb, 3) canonical bead template, or None (no rotation)
    features: np.ndarray  # (N, nb*3) training features
    targets: np.ndarray  # (N, na*3) training targets (canonical, or lab frame centred on the bead centroid)
    regressor: Any = None  # fitted KNeighborsRegressor; None for one-bead kinds (mean prediction)


class KNNBackmapperModel:
    """A fitted kNN backmapping baseline (made by :meth:`KNNRegressionBaseline.fit`).

    Attributes
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` it was trained for.
    layout
        Its :class:`~openmm_backmap._units.UnitLayout`.
    """

    def __init__(self, mapping, kinds: Sequence[_KindModel], *, n_neighbors: int, weights: str, align: bool,
                 algorithm: str = "auto", metadata: Optional[dict] = None) -> None:
        self.mapping = mapping
        self.layout = UnitLayout(mapping)
        if len(kinds) != len(self.layout.kinds):
            raise ValueError(f"{len(kinds)} kind models for {len(self.layout.kinds)} unit kinds")
        self.kinds = list(kinds)
        self.n_neighbors, self.weights, self.align, self.algorithm = int(n_neighbors), weights, bool(align), algorithm
        self.metadata = dict(metadata or {})
        for kind, km in zip(self.layout.kinds, self.kinds):
            if km.features.shape[1] != kind.n_beads * 3 or km.targets.shape[1] != kind.n_atoms * 3:
                raise ValueError(f"training arrays of kind {kind.name} do not fit its {kind.n_beads} beads and "
                                 f"{kind.n_atoms} atoms")
            if km.regressor is None and kind.n_beads > 1:
                km.regressor = _make_regressor(self.n_neighbors, self.weights, self.algorithm, len(km.features),
                                               kind.name).fit(km.features, km.targets)
        self._out_index = [self.layout.output_index[kind.atom_index] for kind in self.layout.kinds]

    # -- description -----------------------------------------------------------------------------------
    @property
    def n_beads(self) -> int:
        return int(self.mapping.n_beads)

    @property
    def atom_indices(self) -> np.ndarray:
        """Indices into the mapping's AA topology of the output atoms (sorted)."""
        return self.layout.atoms

    @property
    def n_out_atoms(self) -> int:
        return int(len(self.layout.atoms))

    def __repr__(self) -> str:
        return (f"KNNBackmapperModel(n_neighbors={self.n_neighbors}, weights={self.weights!r}, align={self.align}; "
                f"{self.layout.describe()}; {sum(len(k.features) for k in self.kinds)} training units)")

    # -- inference -------------------------------------------------------------------------------------
    def _predict_kind(self, k: int, ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted atoms ``(F, U, na, 3)`` (lab frame, nm) and the unit centres ``(F, U, 1, 3)``."""
        kind, km = self.layout.kinds[k], self.kinds[k]
        centre, rot, feats = _local_frames(ub, km.template)
        n_frames, n_units = ub.shape[:2]
        if km.regressor is None:  # one bead: nothing to regress on, the data's mean structure
            pred = np.broadcast_to(km.targets.mean(axis=0), (len(feats), kind.n_atoms * 3))
        else:
            pred = km.regressor.predict(feats)
        pred = pred.reshape(n_frames, n_units, kind.n_atoms, 3)
        if rot is not None:
            pred = pred @ np.swapaxes(rot, -1, -2)
        return pred + centre, centre

    def backmap(self, cg_positions_nm: Any, box_vectors_nm: Any = None) -> np.ndarray:
        """Backmap CG frames to the output atoms.

        Parameters
        ----------
        cg_positions_nm
            Bead positions in nm, ``(n_frames, n_beads, 3)`` or ``(n_beads, 3)`` (array or OpenMM Quantity).
        box_vectors_nm
            Optional periodic box (rows a, b, c in nm, OpenMM's reduced form), ``(3, 3)`` or ``(n_frames, 3, 3)``.
            Each unit's beads are then taken at their minimum image relative to the unit's first bead, so a
            molecule split across the boundary is backmapped whole, next to its first bead.

        Returns
        -------
        numpy.ndarray
            ``(n_frames, n_out_atoms, 3)`` (or ``(n_out_atoms, 3)`` for one frame) in nm, atoms ordered like
            :attr:`atom_indices`.

        Raises
        ------
        ValueError
            Wrong number of beads, NaN/inf coordinates, or a box of the wrong shape.
        """
        cg = np.asarray(as_coordinates(cg_positions_nm, name="cg_positions_nm"), dtype=np.float64)
        single = cg.ndim == 2
        if single:
            cg = cg[None]
        if cg.shape[1] != self.n_beads:
            raise ValueError(f"cg_positions_nm has {cg.shape[1]} beads but this model was trained for "
                             f"{self.n_beads} beads ({self.layout.describe()})")
        box = None
        if box_vectors_nm is not None:
            box = as_box_vectors(box_vectors_nm, name="box_vectors_nm")
            box = np.broadcast_to(box, (len(cg), 3, 3)).copy() if box.ndim == 2 else np.asarray(box, np.float64)
            if box.shape != (len(cg), 3, 3):
                raise ValueError(f"box_vectors_nm has {len(box)} frames but cg_positions_nm has {len(cg)}")
        out = np.empty((len(cg), self.n_out_atoms, 3))
        for k, kind in enumerate(self.layout.kinds):
            pred, _ = self._predict_kind(k, _unit_beads(cg, kind, box))
            out[:, self._out_index[k]] = pred
        return out[0] if single else out

    def score(self, data: Any, frames: Optional[Sequence[int]] = None, box_vectors_nm: Any = None) -> dict:
        """R² and RMSE of the backmapped reference frames (regression accuracy, seed 000).

        The reference AA frames are mapped to beads, backmapped, and compared unit by unit in the frame seed 000
        scores in: atom coordinates relative to the unit's bead centroid (lab orientation, so the numbers do not
        depend on ``align``). R² is sklearn's ``r2_score`` averaged uniformly over the ``3 × n_atoms`` output
        columns of a kind (samples are units × frames); with several kinds the kinds are weighted by their
        number of atoms in the box.

        Parameters
        ----------
        data
            An :class:`~openmm_backmap.data.AADataset`, the path of one, or AA positions in nm
            ``(n_frames, n_atoms, 3)`` of the mapping's full AA system.
        frames
            Optional frame indices to use.
        box_vectors_nm
            Box of array input (datasets carry their own).

        Returns
        -------
        dict
            ``r2``, ``rmse_nm`` (root mean square atom displacement, nm, no superposition), ``n_frames``,
            ``n_units`` and ``by_kind`` (the same per kind name).
        """
        positions, beads = _load_aa(self.mapping, data, frames, box_vectors_nm)
        return self._score_arrays(positions, beads)

    def _score_arrays(self, positions: np.ndarray, beads: np.ndarray) -> dict:
        by_kind, total, r2_sum, mse_sum = {}, 0, 0.0, 0.0
        for k, kind in enumerate(self.layout.kinds):
            pred, centre = self._predict_kind(k, _unit_beads(beads, kind, None))
            ref = positions[:, kind.atom_index] - centre
            r2, rmse = _r2_rmse(ref.reshape(-1, kind.n_atoms, 3), (pred - centre).reshape(-1, kind.n_atoms, 3))
            weight = kind.n_units * kind.n_atoms
            by_kind[kind.name] = {"r2": r2, "rmse_nm": rmse}
            total, r2_sum, mse_sum = total + weight, r2_sum + weight * r2, mse_sum + weight * rmse ** 2
        return {"r2": r2_sum / total, "rmse_nm": float(np.sqrt(mse_sum / total)), "n_frames": int(len(positions)),
                "n_units": int(self.layout.n_units), "by_kind": by_kind}

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the training arrays, templates, settings, mapping (YAML) and AA topology (JSON) to one ``.npz``.

        No pickle: :meth:`load` reads it with ``allow_pickle=False`` and refits the regressors (fast for kNN).
        """
        from .._topology import topology_to_json

        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_neighbors": self.n_neighbors,
                  "weights": self.weights, "align": self.align, "algorithm": self.algorithm,
                  "metadata": self.metadata, "mapping_yaml": self.mapping.to_yaml(),
                  "aa_topology": topology_to_json(self.mapping.aa_topology.to_openmm())}
        arrays = {"header": np.array(json.dumps(header))}
        for k, km in enumerate(self.kinds):
            arrays[f"kind{k}_features"] = km.features
            arrays[f"kind{k}_targets"] = km.targets
            arrays[f"kind{k}_template"] = np.zeros((0, 3)) if km.template is None else km.template
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, mapping: Any = None) -> "KNNBackmapperModel":
        """Read a model written by :meth:`save`; with ``mapping``, check that it is the one it was trained for.

        Raises
        ------
        FileNotFoundError, ValueError
            Missing file; not such a model, corrupt, a newer format version, or another mapping.
        """
        from .._topology import topology_from_json
        from ..mapping import CGMapping

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no such kNN backmapper file: {path}")
        try:
            with np.load(path, allow_pickle=False) as blob:
                header = json.loads(str(blob["header"]))
                arrays = {name: blob[name] for name in blob.files if name != "header"}
        except Exception as exc:  # not an npz, truncated, object arrays refused
            raise ValueError(f"{path} is not a readable kNN backmapper ({type(exc).__name__}: {exc})") from exc
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kNN backmapper (format={header.get('format')!r})")
        if int(header.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {header['format_version']}, newer than this openmm-backmap "
                             f"supports ({FORMAT_VERSION}); upgrade openmm-backmap")
        try:
            stored = CGMapping.from_yaml(header["mapping_yaml"], topology_from_json(header["aa_topology"]),
                                         source=str(path))
            n_kinds = len([n for n in arrays if n.endswith("_features")])
            kinds = []
            for k in range(n_kinds):
                template = arrays[f"kind{k}_template"]
                kinds.append(_KindModel(template=template if len(template) else None,
                                        features=arrays[f"kind{k}_features"], targets=arrays[f"kind{k}_targets"]))
            model = cls(stored, kinds, n_neighbors=header["n_neighbors"], weights=header["weights"],
                        align=header["align"], algorithm=header.get("algorithm", "auto"),
                        metadata=header.get("metadata"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: corrupt or incompatible kNN backmapper ({type(exc).__name__}: {exc})") from exc
        if mapping is not None and (mapping.topology_fingerprint != stored.topology_fingerprint
                                    or mapping.to_yaml() != stored.to_yaml()):
            raise ValueError(f"{path} was trained for another mapping (different AA topology or beads)")
        return model


def _make_regressor(n_neighbors: int, weights: str, algorithm: str, n_samples: int, kind_name: str):
    from sklearn.neighbors import KNeighborsRegressor

    if n_neighbors > n_samples:
        raise ValueError(f"n_neighbors={n_neighbors} exceeds the {n_samples} training units of kind {kind_name}; "
                         "use more frames or fewer neighbours")
    return KNeighborsRegressor(n_neighbors=n_neighbors, weights=weights, algorithm=algorithm)


# -------------------------------------------------------------------------------------------- estimator
class KNNRegressionBaseline:
    """Estimator of the kNN regression backmapping baseline of seed 000 (per molecule, bead → atom coordinates).

    For every unit (molecule holding beads) of every frame, the features are the unit's bead coordinates and
    the targets its atom coordinates, both relative to the unit's bead centroid (seed 000 centres on the COM);
    one ``sklearn.neighbors.KNeighborsRegressor`` per unit kind maps features to targets.

    ``align=True`` (default; our improvement over seed 000): units with three or more beads are first rotated
    into a canonical frame, the optimal rotation (Kabsch) of the kind's bead template (the Procrustes mean of the
    training units) onto the unit's centred beads; the regressor sees canonical beads and predicts canonical
    atoms, which are rotated back. The model is then exactly equivariant to rigid motions of the CG input and
    the neighbour search compares shapes rather than orientations. Three or more nearly collinear beads (an
    extended 3-bead hexane, say) fix the rotation about their axis only weakly, so those canonical frames are
    noisy.

    Units with one or two beads cannot be oriented by their beads (one bead has no orientation, two leave the
    rotation about their axis free), so they are never rotated: features and targets are lab-frame coordinates
    centred on the bead centroid, as in seed 000. With **one bead** seed 000's regression is degenerate: every
    feature vector is zero, so the prediction is one fixed structure in one fixed orientation, the mean of the
    training targets (here returned directly, without a regressor); expect R² ≈ 0 for such units. With two beads
    the kNN regressor sees the direction of the bead pair.

    Parameters
    ----------
    mapping
        :class:`~openmm_backmap.mapping.CGMapping` of the AA system.
    n_neighbors
        ``k`` of the kNN regression (seed 000 uses 5).
    weights
        ``"distance"`` (inverse-distance weighted mean of the neighbours; an exact match returns its target) or
        ``"uniform"``.
    align
        Rotate units with >= 3 beads into a canonical frame (see above).
    algorithm
        Neighbour search of ``KNeighborsRegressor`` (``"auto"``, ``"kd_tree"``, ``"ball_tree"``, ``"brute"``).
    """

    def __init__(self, mapping, n_neighbors: int = 5, weights: str = "distance", align: bool = True,
                 algorithm: str = "auto") -> None:
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be an integer >= 1; got {n_neighbors!r}")
        if weights not in ("distance", "uniform"):
            raise ValueError(f"weights must be 'distance' or 'uniform'; got {weights!r}")
        if algorithm not in ("auto", "kd_tree", "ball_tree", "brute"):
            raise ValueError(f"algorithm must be 'auto', 'kd_tree', 'ball_tree' or 'brute'; got {algorithm!r}")
        self.mapping = mapping
        self.layout = UnitLayout(mapping)
        self.n_neighbors, self.weights, self.align, self.algorithm = int(n_neighbors), weights, bool(align), algorithm

    def fit(self, data: Any, frames: Optional[Sequence[int]] = None,
            box_vectors_nm: Any = None) -> KNNBackmapperModel:
        """Fit one kNN regressor per unit kind on reference AA frames.

        Parameters
        ----------
        data
            An :class:`~openmm_backmap.data.AADataset`, the path of one, or AA positions in nm
            ``(n_frames, n_atoms, 3)`` of the mapping's full AA system. Molecules are made whole across
            periodic boundaries before mapping.
        frames
            Optional frame indices (default: all frames).
        box_vectors_nm
            Box of array input, ``(3, 3)`` or ``(n_frames, 3, 3)`` nm (datasets carry their own).

        Returns
        -------
        KNNBackmapperModel

        Raises
        ------
        ValueError
            Dataset of another AA system (topology fingerprint or atom count differ from the mapping's), NaN/inf
            positions, or fewer training units than ``n_neighbors``.
        """
        positions, beads = _load_aa(self.mapping, data, frames, box_vectors_nm)
        source = str(data.path) if hasattr(data, "path") else str(data) if isinstance(data, (str, os.PathLike)) \
            else "array"
        return self._fit_arrays(positions, beads, source=source)

    def _fit_arrays(self, positions: np.ndarray, beads: np.ndarray, source: str = "array") -> KNNBackmapperModel:
        kinds = []
        for kind in self.layout.kinds:
            ub = _unit_beads(beads, kind, None)
            template = None
            if self.align and kind.n_beads >= 3:
                local = (ub - ub.mean(axis=-2, keepdims=True)).reshape(-1, kind.n_beads, 3)
                template = _bead_template(local)
            centre, rot, feats = _local_frames(ub, template)
            targets = positions[:, kind.atom_index] - centre
            if rot is not None:
                targets = targets @ rot
            kinds.append(_KindModel(template=template, features=np.ascontiguousarray(feats),
                                    targets=np.ascontiguousarray(targets.reshape(len(feats), -1))))
        metadata = {"source": source, "n_frames": int(len(positions))}
        return KNNBackmapperModel(self.mapping, kinds, n_neighbors=self.n_neighbors, weights=self.weights,
                                  align=self.align, algorithm=self.algorithm, metadata=metadata)

    def cross_validate(self, data: Any, n_splits: int = 5, seed: int = 0, frames: Optional[Sequence[int]] = None,
                       box_vectors_nm: Any = None) -> dict:
        """k-fold cross validation over contiguous time blocks (seed 000 uses 5 folds).

        The frames are cut into ``n_splits`` contiguous blocks; each block in turn is the test set of a model
        fitted on the others, scored by :meth:`KNNBackmapperModel.score`. Contiguous blocks keep correlated
        neighbouring frames out of each other's test set (seed 000 splits at random, which flatters a kNN).

        Parameters
        ----------
        data, frames, box_vectors_nm
            As in :meth:`fit`.
        n_splits
            Number of folds (>= 2).
        seed
            Order in which the folds are visited (and listed in ``folds``); kNN fitting is deterministic, so the
            summary statistics do not depend on it.

        Returns
        -------
        dict
            ``r2_mean``, ``r2_std``, ``rmse_nm_mean``, ``rmse_nm_std`` (population std over folds),
            ``n_splits``, ``n_frames`` and ``folds``: one dict per fold with ``block``, ``test_frames``
            (first, last index into the selected frames), ``r2`` and ``rmse_nm``.
        """
        if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
            raise ValueError(f"n_splits must be an integer >= 2; got {n_splits!r}")
        positions, beads = _load_aa(self.mapping, data, frames, box_vectors_nm)
        if len(positions) < n_splits:
            raise ValueError(f"cannot split {len(positions)} frames into {n_splits} folds")
        blocks = np.array_split(np.arange(len(positions)), n_splits)
        folds = []
        for b in np.random.default_rng(seed).permutation(n_splits):
            test = blocks[b]
            train = np.concatenate([blocks[j] for j in range(n_splits) if j != b])
            model = self._fit_arrays(positions[train], beads[train])
            s = model._score_arrays(positions[test], beads[test])
            folds.append({"block": int(b), "test_frames": (int(test[0]), int(test[-1])), "r2": s["r2"],
                          "rmse_nm": s["rmse_nm"]})
        r2 = np.array([f["r2"] for f in folds])
        rmse = np.array([f["rmse_nm"] for f in folds])
        return {"r2_mean": float(r2.mean()), "r2_std": float(r2.std()), "rmse_nm_mean": float(rmse.mean()),
                "rmse_nm_std": float(rmse.std()), "n_splits": int(n_splits), "n_frames": int(len(positions)),
                "folds": folds}
