"""Offline backmapping: a CG trajectory file → an AA trajectory file, with the same engine as the reporter."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def read_cg_trajectory(path: str | os.PathLike, topology: Any = None) -> dict[str, Any]:
    """Positions ``(n_frames, n_beads, 3)`` nm, times (ps), steps and boxes ``(n_frames, 3, 3)`` (or ``None``) of a CG
    trajectory: an openmm-backmap CG dataset (``.h5`` written by ``map_dataset``), or any file mdtraj reads (DCD, XTC
    and others need ``topology``: a PDB file, an mdtraj or an OpenMM topology)."""
    import h5py
    import mdtraj as md

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such CG trajectory: {path}")
    if path.suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as handle:
            ours = "positions" in handle and "step" in handle
        if ours:
            from ..data import CGDataset

            with CGDataset(path) as ds:
                return {"xyz": ds.positions[:].astype(np.float64), "time": ds.time[:].astype(np.float64),
                        "step": ds.step[:].astype(np.int64),
                        "box": ds.box_vectors[:].astype(np.float64) if ds.periodic else None}
    from ..formats import FORMATS, read_frames

    if path.suffix.lower() in FORMATS and path.suffix.lower() != ".pdb":
        # OpenMM's and our writers keep steps and times (DCD: first step, interval and dt in the header), which
        # mdtraj does not read back; files from other programs fall through to mdtraj.
        try:
            frames = read_frames(path, _as_openmm_or_none(topology))
        except (ValueError, OSError, KeyError):
            frames = None
        if frames is not None and frames.get("time") is not None:
            return {"xyz": np.asarray(frames["xyz"], dtype=np.float64),
                    "time": np.asarray(frames["time"], dtype=np.float64),
                    "step": None if frames.get("step") is None else np.asarray(frames["step"], dtype=np.int64),
                    "box": None if frames.get("box") is None else np.asarray(frames["box"], dtype=np.float64)}
    if topology is not None and not isinstance(topology, (str, os.PathLike, md.Topology)):
        topology = md.Topology.from_openmm(topology)
    traj = md.load(str(path), top=str(topology) if isinstance(topology, (str, os.PathLike)) else topology)
    box = traj.unitcell_vectors.astype(np.float64) if traj.unitcell_vectors is not None else None
    time = np.asarray(traj.time, dtype=np.float64)
    return {"xyz": traj.xyz.astype(np.float64), "time": time, "step": None, "box": box}


def _as_openmm_or_none(topology: Any):
    import mdtraj as md

    if topology is None:
        return None
    if isinstance(topology, (str, os.PathLike)):
        return md.load_topology(str(topology)).to_openmm()
    if isinstance(topology, md.Topology):
        return topology.to_openmm()
    return topology


def backmap(cg_trajectory: Any, backmapper: Any, output: str | os.PathLike, *, topology: Any = None,
            seed: int = 0, first_frame_nm: Any = None, mode: str = "model", stride: int = 1,
            relax: Any = None, candidates: Optional[int] = None, progress: bool = True) -> Path:
    """Backmap a CG trajectory file and write the AA trajectory.

    Parameters
    ----------
    cg_trajectory
        CG trajectory file (see :func:`read_cg_trajectory`) or an array ``(n_frames, n_beads, 3)`` in nm.
    backmapper
        A :class:`~openmm_backmap.backmap.TemporalBackmapper` or the path of a saved one.
    output
        AA trajectory file; the format follows the extension (``.dcd``, ``.xtc``, ``.h5``, ``.pdb``), and DCD/XTC get
        their topology as a PDB next to them. Time stamps of the CG file are kept.
    topology
        Topology for CG formats that carry none (DCD, XTC): PDB file, mdtraj or OpenMM topology.
    seed, mode
        See :class:`~openmm_backmap.backmap.BackmapChain`.
    first_frame_nm
        AA frame ``(n_atoms, 3)`` nm that precedes the first CG frame; default: a library pick.
    stride
        Backmap every ``stride``-th CG frame (the backmapper was trained for one lag; use the stride that matches).
    relax
        Optional :class:`~openmm_backmap.backmap.Relaxer` or AA ``openmm.System``: minimise every frame with the AA
        force field, beads held in place (see :class:`~openmm_backmap.backmap.BackmapChain`).
    candidates
        Latent draws per residue for residue-unit backmappers (default: 8 for those, 1 otherwise; see
        :class:`~openmm_backmap.backmap.BackmapChain`).

    Returns
    -------
    pathlib.Path
        The output file.
    """
    from ..formats import AATrajectoryWriter
    from .model import TemporalBackmapper

    if not isinstance(backmapper, TemporalBackmapper):
        backmapper = TemporalBackmapper.load(backmapper)
    if isinstance(cg_trajectory, (str, os.PathLike)):
        cg = read_cg_trajectory(cg_trajectory, topology)
    else:
        xyz = np.asarray(cg_trajectory, dtype=np.float64)
        cg = {"xyz": xyz, "time": np.arange(len(xyz), dtype=np.float64), "step": None, "box": None}
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    sl = slice(None, None, int(stride))
    xyz, times = cg["xyz"][sl], cg["time"][sl]
    steps = cg["step"][sl] if cg["step"] is not None else np.arange(len(xyz)) * int(stride)
    boxes = cg["box"][sl] if cg["box"] is not None else None
    if xyz.ndim != 3 or xyz.shape[1:] != (backmapper.n_beads, 3):
        raise ValueError(f"the CG trajectory has {xyz.shape[1] if xyz.ndim == 3 else '?'} particles per frame; "
                         f"the backmapper expects {backmapper.n_beads} beads")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    chain = backmapper.chain(seed=seed, mode=mode, relax=relax, candidates=candidates)
    if first_frame_nm is not None:
        chain.previous = first_frame_nm
    frames = range(len(xyz))
    if progress:
        from tqdm.auto import tqdm

        frames = tqdm(frames, desc=f"backmapping -> {output.name}", unit="frame")
    dt = float(np.median(np.diff(times) / np.maximum(np.diff(steps), 1))) if len(times) > 1 else None
    with AATrajectoryWriter(output, backmapper.topology, dt_ps=dt) as writer:
        for t in frames:
            box = None if boxes is None else boxes[t]
            aa = chain.step(xyz[t], box)
            writer.write(aa, step=int(steps[t]), time_ps=float(times[t]), box_vectors_nm=box)
    return output
