"""Autoregressive inference: a stateful chain (used by the reporter) and whole-array backmapping."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .._validation import as_box_vectors, as_coordinates, check_finite

MODES = ("model", "library")


class BackmapChain:
    """Backmaps consecutive CG frames of ``n_replicas`` trajectories, one call to :meth:`step` per frame.

    The first step takes its AA frame from the backmapper's library (per unit, lowest CG RMSD after superposition),
    unless :attr:`previous` was set (a user-given first frame, or the last frame written before a restart); later
    steps decode with the previous output as condition. Random numbers come from one seeded generator, so the same
    seed and input give the same output.

    Parameters
    ----------
    backmapper
        A :class:`~openmm_backmap.backmap.TemporalBackmapper`.
    seed
        Seed of the latent draws and of the library picks.
    n_replicas
        Number of trajectories backmapped together (batched).
    mode
        ``"model"`` (the VAE) or ``"library"`` (every frame a library lookup: the thesis's baseline).
    relax
        Optional :class:`~openmm_backmap.backmap.Relaxer` (or the AA ``openmm.System``, for one with default
        settings): every frame is minimised with the AA force field, beads held in place, and the relaxed frame is
        both the output and the condition of the next step.
    candidates
        Latent draws per unit and step. Default (``None``): 8 for residue units whose bonds between residues were
        fitted (``backmapper.has_link_geometry``), else 1. With residue units, ``candidates`` > 1 decodes every residue
        that many times (one batched network call per kind, as for one draw) and keeps one candidate per residue,
        drawn in chain order with probability ∝ exp(−½ Σ((d − μ)/σ)²) over the bonds and angles joining it to the
        residues already placed (μ, σ: their distances in the training data). Residues oriented by three or more
        frame beads are placed first, in chain order, then the others (chain termini under a Cα map). This is
        sequential importance resampling of the product of the per-residue model and the data's geometry across
        residues: it repairs the peptide bonds that two independently sampled residues would otherwise break.
    """

    def __init__(self, backmapper, *, seed: int = 0, n_replicas: int = 1, mode: str = "model",
                 relax: Any = None, candidates: Optional[int] = None) -> None:
        from .relax import as_relaxer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.candidates = backmapper._check_candidates(candidates)
        self.relaxer = as_relaxer(relax, backmapper)
        self.backmapper = backmapper.eval()
        self.n_replicas = int(n_replicas)
        self.mode = mode
        self.generator = torch.Generator().manual_seed(int(seed))
        self._previous: Optional[torch.Tensor] = None
        self.n_steps = 0

    def reseed(self, seed: int) -> None:
        """Restart the random stream (latent draws, library picks) from ``seed``."""
        self.generator.manual_seed(int(seed))

    @property
    def previous(self) -> Optional[np.ndarray]:
        """The last AA frame(s) ``(n_replicas, n_atoms, 3)`` in nm, or ``None`` before the first step."""
        return None if self._previous is None else self._previous.numpy().copy()

    @previous.setter
    def previous(self, value: Any) -> None:
        xyz = as_coordinates(value, self.backmapper.n_atoms, name="previous AA frame")
        if xyz.ndim == 2:
            xyz = np.broadcast_to(xyz, (self.n_replicas, *xyz.shape))
        if xyz.shape[0] != self.n_replicas:
            raise ValueError(f"previous AA frame has {xyz.shape[0]} replicas, the chain {self.n_replicas}")
        check_finite(xyz, name="previous AA frame")
        self._previous = torch.as_tensor(np.array(xyz, dtype=np.float64))

    def step(self, cg_positions_nm: Any, box_vectors_nm: Any = None) -> np.ndarray:
        """Backmap the next CG frame.

        Parameters
        ----------
        cg_positions_nm
            ``(n_beads, 3)`` for one replica or ``(n_replicas, n_beads, 3)``, nm; need not be wrapped.
        box_vectors_nm
            ``(3, 3)`` or ``(n_replicas, 3, 3)`` box vectors (rows) in nm for periodic systems, else ``None``.

        Returns
        -------
        numpy.ndarray
            AA positions in nm, ``(n_atoms, 3)`` or ``(n_replicas, n_atoms, 3)`` (same leading shape as the input).
        """
        bm = self.backmapper
        xyz = as_coordinates(cg_positions_nm, bm.n_beads, name="CG positions")
        single = xyz.ndim == 2
        frames = xyz[None] if single else xyz
        if frames.shape[0] != self.n_replicas:
            raise ValueError(f"got {frames.shape[0]} CG frames for a chain of {self.n_replicas} replicas")
        check_finite(frames, name="CG positions")
        beads = torch.as_tensor(np.array(frames, dtype=np.float64))
        box = None
        if box_vectors_nm is not None:
            b = as_box_vectors(box_vectors_nm)
            b = np.broadcast_to(b, (self.n_replicas, 3, 3)) if b.ndim == 2 else b
            box = torch.as_tensor(np.array(b, dtype=np.float64))
        if self.mode == "library" or (self._previous is None and bm.condition_on_previous):
            out = bm.library_frames(beads, box, self.generator)
        else:
            out = bm.decode_frames(beads, self._previous if bm.condition_on_previous else None, box, self.generator,
                                   self.candidates)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"backmapping produced non-finite coordinates at chain step {self.n_steps}")
        if self.relaxer is not None:
            out = torch.as_tensor(self.relaxer.relax(out.numpy(), frames, None if box is None else box.numpy()))
        self._previous = out
        self.n_steps += 1
        result = out.numpy().copy()
        return result[0] if single else result


def backmap_array(backmapper, cg_positions_nm: Any, box_vectors_nm: Any = None, *, seed: int = 0,
                  first_frame_nm: Any = None, mode: str = "model", relax: Any = None,
                  candidates: Optional[int] = None,
                  progress: bool = False) -> np.ndarray:
    """Backmap a whole CG trajectory ``(n_frames, n_beads, 3)`` nm; see
    :meth:`~openmm_backmap.backmap.TemporalBackmapper.backmap_trajectory`."""
    xyz = as_coordinates(cg_positions_nm, backmapper.n_beads, name="CG trajectory")
    if xyz.ndim != 3:
        xyz = xyz[None]
    boxes = None
    if box_vectors_nm is not None:
        boxes = as_box_vectors(box_vectors_nm)
        boxes = np.broadcast_to(boxes, (len(xyz), 3, 3)) if boxes.ndim == 2 else boxes
        if len(boxes) != len(xyz):
            raise ValueError(f"{len(boxes)} boxes for {len(xyz)} CG frames")
    chain = BackmapChain(backmapper, seed=seed, mode=mode, relax=relax, candidates=candidates)
    out = np.empty((len(xyz), backmapper.n_atoms, 3), dtype=np.float64)
    start = 0
    if first_frame_nm is not None:
        chain.previous = first_frame_nm
        out[0] = chain.previous[0]
        start = 1
    frames = range(start, len(xyz))
    if progress:
        from tqdm.auto import tqdm

        frames = tqdm(frames, desc="backmapping", unit="frame")
    for t in frames:
        out[t] = chain.step(xyz[t], None if boxes is None else boxes[t])
    return out
