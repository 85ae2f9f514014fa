"""Temporally coherent backmapping of CG trajectories to atomistic resolution (seed 003, chapter 8).

``BackmapperTrainer(mapping, aa_dataset, ...).fit() -> TemporalBackmapper``; ``backmapper.chain()`` backmaps frame
by frame (used by :class:`~openmm_backmap.reporters.BackmapReporter`), ``backmapper.backmap_trajectory()`` a
whole array.

``KNNRegressionBaseline(mapping).fit(aa_dataset) -> KNNBackmapperModel`` is the per-molecule kNN regression
baseline of seed 000 (frame by frame, no temporal coherence).

``Relaxer(aa_system, mapping)`` minimises backmapped frames with the AA force field, beads held in place; pass it
(or the AA System) as ``relax=`` to the chain, ``backmap_trajectory``, ``backmap`` or the reporter.
"""
from .baseline import KNNBackmapperModel, KNNRegressionBaseline
from .inference import BackmapChain
from .model import TemporalBackmapper
from .offline import backmap, read_cg_trajectory
from .relax import Relaxer
from .trainer import BackmapperTrainer

__all__ = ["BackmapChain", "BackmapperTrainer", "KNNBackmapperModel", "KNNRegressionBaseline",
           "Relaxer", "TemporalBackmapper", "backmap", "read_cg_trajectory"]
