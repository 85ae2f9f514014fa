"""The local environment of every backmapping unit: neighbouring beads and atoms within a cutoff.

In a liquid a molecule's atoms must fit between its neighbours, so the decoder of a unit also sees the points
around it (deepBackmap's local environment, seed 001): the *current* beads of the other units and, when the model is
conditioned on the previous frame, the *previous* AA atoms of the other units (a one-bead molecule's neighbours
carry their orientation only there). Points are searched within ``cutoff`` of the unit's bead centroid across
periodic images, at most ``max_neighbors`` (the nearest) per unit, and passed to the network in the unit's local
frame. The search is a k-d tree over the whole frame (periodic for orthorhombic boxes; triclinic boxes fall back to
a chunked minimum-image search), so its cost grows as N log N with the number of molecules, not N².
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from .._units import minimum_image

#: Element classes of atom points (one-hot channels after the bead types).
ELEMENT_CLASSES = ("H", "C", "N", "O", "S")


class Neighbors(NamedTuple):
    """Environment of ``U`` units: local coordinates (nm) ``(U, K, 3)``, point types ``(U, K)`` and smooth
    cutoff weights ``(U, K)`` (0 for padding)."""

    local: torch.Tensor
    types: torch.Tensor
    weight: torch.Tensor


class EnvironmentIndex:
    """Bookkeeping of the points of a frame (beads, then output atoms) for a unit layout.

    Parameters
    ----------
    layout
        The :class:`~openmm_backmap._units.UnitLayout`.
    bead_types
        Type name of every bead.
    atom_elements
        Element symbol of every output atom (in ``layout.atoms`` order).
    cutoff_nm, max_neighbors
        Search radius around the unit's bead centroid (nm) and the number of nearest points kept.
    """

    def __init__(self, layout, bead_types, atom_elements, cutoff_nm: float, max_neighbors: int) -> None:
        if cutoff_nm <= 0 or max_neighbors < 1:
            raise ValueError("environment cutoff must be > 0 nm and max_neighbors >= 1")
        self.cutoff, self.max_neighbors = float(cutoff_nm), int(max_neighbors)
        self.type_names = sorted(set(bead_types))
        type_of = {t: i for i, t in enumerate(self.type_names)}
        n_bt = len(self.type_names)
        self.n_types = n_bt + len(ELEMENT_CLASSES) + 1
        self.bead_type = np.array([type_of[t] for t in bead_types], dtype=np.int64)
        self.atom_type = np.array([n_bt + (ELEMENT_CLASSES.index(e) if e in ELEMENT_CLASSES else len(ELEMENT_CLASSES))
                                   for e in atom_elements], dtype=np.int64)
        n_beads, n_atoms = len(bead_types), len(atom_elements)
        self.bead_unit = np.full(n_beads, -1, dtype=np.int64)
        self.atom_unit = np.full(n_atoms, -1, dtype=np.int64)
        self.unit_ids: list[np.ndarray] = []
        out = layout.output_index
        start = 0
        for kind in layout.kinds:
            ids = np.arange(start, start + kind.n_units)
            self.bead_unit[kind.bead_index] = ids[:, None]
            self.atom_unit[out[kind.atom_index]] = ids[:, None]
            self.unit_ids.append(ids)
            start += kind.n_units

    def neighbors(self, k: int, centres: torch.Tensor, rot: torch.Tensor, beads: torch.Tensor,
                  previous: Optional[torch.Tensor], box: Optional[torch.Tensor]) -> Neighbors:
        """Environment of the units of kind ``k`` in ``B`` frames.

        ``centres`` ``(B*U, 3)`` and ``rot`` ``(B*U, 3, 3)`` are the units' local frames (global coordinates, nm);
        ``beads`` ``(B, n_beads, 3)``, ``previous`` ``(B, n_atoms, 3)`` or ``None``, ``box`` ``(B, 3, 3)`` or
        ``None``. Coordinates may carry gradients (rollout training); the search itself does not.
        """
        n_frames = beads.shape[0]
        return self._neighbors(self.unit_ids[k], centres.reshape(n_frames, -1, 3), rot, beads, previous, box)

    def neighbors_all(self, centres: list[torch.Tensor], rots: list[torch.Tensor], beads: torch.Tensor,
                      previous: Optional[torch.Tensor], box: Optional[torch.Tensor]) -> list[Neighbors]:
        """:meth:`neighbors` of every kind (``centres[k]``, ``rots[k]`` as there) from one search per frame: the
        same result as one call per kind, at the cost of one."""
        n_frames = beads.shape[0]
        units = np.concatenate(self.unit_ids)
        c = torch.cat([x.reshape(n_frames, -1, 3) for x in centres], dim=1)
        rot = torch.cat([x.reshape(n_frames, -1, 3, 3) for x in rots], dim=1).flatten(0, 1)
        env = self._neighbors(units, c, rot, beads, previous, box)
        out, start = [], 0
        for ids in self.unit_ids:
            part = slice(start, start + len(ids))
            out.append(Neighbors(*(t.reshape(n_frames, len(units), *t.shape[1:])[:, part].flatten(0, 1)
                                   for t in env)))
            start += len(ids)
        return out

    def _neighbors(self, units: np.ndarray, c: torch.Tensor, rot: torch.Tensor, beads: torch.Tensor,
                   previous: Optional[torch.Tensor], box: Optional[torch.Tensor]) -> Neighbors:
        """Environment of the units ``units`` (ids) with centres ``c`` ``(B, U, 3)`` and rotations ``rot``
        ``(B*U, 3, 3)``."""
        n_frames = beads.shape[0]
        n_units = len(units)
        points = beads if previous is None else torch.cat([beads, previous.to(beads.dtype)], dim=1)
        point_unit = self.bead_unit if previous is None else np.concatenate([self.bead_unit, self.atom_unit])
        point_type = self.bead_type if previous is None else np.concatenate([self.bead_type, self.atom_type])
        idx = np.full((n_frames, n_units, self.max_neighbors), -1, dtype=np.int64)
        with torch.no_grad():
            pts_np = points.detach().double().numpy()
            c_np = c.detach().double().numpy()
            box_np = box.detach().double().numpy() if box is not None else None
            for f in range(n_frames):
                idx[f] = self._search(c_np[f], pts_np[f], None if box_np is None else box_np[f], units, point_unit)
        valid = torch.as_tensor(idx >= 0)
        safe = torch.as_tensor(np.where(idx >= 0, idx, 0))
        gathered = torch.gather(points, 1, safe.reshape(n_frames, -1, 1).expand(-1, -1, 3))
        delta = gathered.reshape(n_frames, n_units, -1, 3) - c.unsqueeze(2)
        if box is not None:
            delta = minimum_image(delta, box.to(delta.dtype)[:, None, None])
        delta = delta.reshape(n_frames * n_units, -1, 3)
        local = delta @ rot.to(delta.dtype)
        r = local.norm(dim=-1)
        weight = 0.5 * (torch.cos(torch.pi * torch.clamp(r / self.cutoff, max=1.0)) + 1.0)
        weight = weight * valid.reshape(n_frames * n_units, -1).to(weight.dtype)
        types = torch.as_tensor(point_type)[safe.reshape(n_frames * n_units, -1)]
        return Neighbors(local, types, weight)

    def _search(self, centres: np.ndarray, points: np.ndarray, box: Optional[np.ndarray], units: np.ndarray,
                point_unit: np.ndarray) -> np.ndarray:
        """Indices ``(U, K)`` of the nearest points of other units within the cutoff (−1 padded)."""
        from scipy.spatial import cKDTree

        k_own = int(np.bincount(point_unit[point_unit >= 0]).max()) if (point_unit >= 0).any() else 0
        k_query = min(len(points), self.max_neighbors + k_own)
        orthorhombic = box is None or not (np.abs(box - np.diag(np.diag(box))) > 1e-9).any()
        if orthorhombic:
            if box is not None:
                lengths = np.diag(box)
                if (2 * self.cutoff > lengths).any():
                    raise ValueError(f"the box ({lengths} nm) is smaller than twice the environment cutoff "
                                     f"({self.cutoff} nm)")
                tree = cKDTree(np.mod(points, lengths), boxsize=lengths)
                dist, found = tree.query(np.mod(centres, lengths), k=k_query, distance_upper_bound=self.cutoff)
            else:
                tree = cKDTree(points)
                dist, found = tree.query(centres, k=k_query, distance_upper_bound=self.cutoff)
            found = found.reshape(len(centres), -1)
            found = np.where(found >= len(points), -1, found)
        else:  # triclinic: chunked minimum-image search in torch
            found = self._brute_force(centres, points, box, k_query)
        own = np.where(found >= 0, point_unit[np.maximum(found, 0)] == units[:, None], False)
        found = np.where(own, -1, found)
        # keep the first max_neighbors valid entries (already sorted by distance)
        order = np.argsort(found < 0, axis=1, kind="stable")
        found = np.take_along_axis(found, order, axis=1)[:, : self.max_neighbors]
        if found.shape[1] < self.max_neighbors:
            found = np.pad(found, ((0, 0), (0, self.max_neighbors - found.shape[1])), constant_values=-1)
        return found

    def _brute_force(self, centres: np.ndarray, points: np.ndarray, box: np.ndarray, k_query: int,
                     chunk: int = 256) -> np.ndarray:
        pts = torch.as_tensor(points)
        b = torch.as_tensor(box)
        out = np.full((len(centres), k_query), -1, dtype=np.int64)
        for start in range(0, len(centres), chunk):
            c = torch.as_tensor(centres[start:start + chunk])
            d = minimum_image(pts.unsqueeze(0) - c.unsqueeze(1), b).norm(dim=-1)
            val, idx = torch.topk(d, k_query, dim=1, largest=False)
            out[start:start + chunk] = np.where(val.numpy() <= self.cutoff, idx.numpy(), -1)
        return out
