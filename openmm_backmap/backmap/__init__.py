"""Temporally coherent backmapping of CG trajectories to atomistic resolution (seed 003, chapter 8).

``BackmapperTrainer(mapping, aa_dataset, ...).fit() -> TemporalBackmapper``; ``backmapper.chain()`` backmaps frame
by frame (used by :class:`~openmm_backmap.reporters.BackmapReporter`), ``backmapper.backmap_trajectory()`` a
whole array.
"""
from .inference import BackmapChain
from .model import TemporalBackmapper
from .offline import backmap, read_cg_trajectory
from .trainer import BackmapperTrainer

__all__ = ["BackmapChain", "BackmapperTrainer", "TemporalBackmapper", "backmap", "read_cg_trajectory"]
