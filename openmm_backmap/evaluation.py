"""Evaluate a backmapped run against an AA reference: numbers (``metrics.json``), plots and one HTML report.

:func:`evaluate_run` takes an AA reference dataset (our HDF5), a backmapped AA trajectory (e.g. written by the
:class:`~openmm_backmap.reporters.BackmapReporter` during a CG run) and, optionally, a baseline trajectory (e.g. a
frame-based backmapper), the CG trajectory, the CG run's ``StateDataReporter`` log and the CG mapping. It
computes the metrics of DESIGN.md ("Metrics") that the inputs allow, compares them with :data:`TARGETS`, and
writes ``metrics.json``, PNG figures and ``report.html`` (:func:`openmm_backmap.report.write_report`).

Metrics (functions of :mod:`openmm_backmap.metrics`, combined as in ``benchmarks/bench_backmap_alanine.py``):

* bond score (reference lengths = mean over the reference frames) and clash score;
* AA potential-energy distribution (JSD, mean shift; median shift with its split by term category) with the
  reference's System (or ``system``) via :class:`~openmm_backmap.energy.AAEnergy`, both sides recomputed from
  stored coordinates;
* φ/ψ free-energy-surface JSD on a 36×36 grid (peptides: φ and ψ of the same residue, pooled over residues);
* bond/angle/dihedral JSDs and Ψ;
* intra-frame velocity JSD at the lag of the backmapped file (atoms without bead weight when a mapping is given),
  and its ratio backmapped / baseline;
* drift: mean AA energy of the last 10 % of the frames minus the first 10 %, against one standard deviation;
* CG run: temperature and energy traces from the log, CG bond/angle/dihedral JSDs and the φ/ψ FES of the CG
  trajectory against the mapped reference (φ/ψ only when every φ/ψ atom is a single-atom bead).

Units: nm, ps, kJ/mol, K, radians (degrees in plots).
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time as _time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from . import metrics as M
from .formats import read_frames, topology_pdb_path, trajectory_format

__all__ = ["TARGETS", "evaluate_run", "check_target", "read_state_log"]

#: Issue targets: metric key → (comparison, threshold). ``"abs<="``: ``|value| ≤ threshold``; ``"abs<=std"``:
#: ``|value| ≤ threshold ×`` the standard deviation of the energies (drift); ``velocity_jsd_ratio`` is the velocity
#: JSD of the backmapped trajectory divided by that of the baseline.
TARGETS: dict[str, tuple[str, float]] = {
    "bond_score": (">=", 0.99),
    "clash_score": ("<=", 0.005),
    "energy_jsd": ("<=", 0.05),
    "energy_shift_kj_mol": ("abs<=", 5.0),
    "fes_jsd": ("<=", 0.05),
    "velocity_jsd_ratio": ("<=", 1.0 / 3.0),
    "drift_kj_mol": ("abs<=std", 1.0),
}

_NAMES = {
    "bond_score": "Bond score (share of bonds within ±10 % of the reference length)",
    "clash_score": "Clash score (residues with heavy atoms closer than 1.2 Å)",
    "energy_jsd": "AA potential-energy JSD",
    "energy_shift_kj_mol": "AA potential-energy mean shift",
    "energy_mean_kj_mol": "AA potential energy (mean)",
    "energy_median_shift_kj_mol": "AA potential-energy median shift",
    "drift_kj_mol": "Energy drift (mean of last 10 % − first 10 %)",
    "fes_jsd": "φ/ψ free-energy surface JSD (36×36)",
    "bonds_jsd_mean": "Bond-length JSD (mean over bond types)",
    "angles_jsd_mean": "Angle JSD (mean over angle types)",
    "dihedrals_jsd_mean": "Dihedral JSD (mean over dihedral types)",
    "psi_total": "Ψ (L1 distance of bond, angle and dihedral distributions, summed)",
    "velocity_jsd": "Intra-frame velocity JSD",
    "velocity_jsd_all_atoms": "Intra-frame velocity JSD (all atoms)",
    "velocity_jsd_ratio": "Velocity JSD ratio backmapped / baseline",
    "cg_bonds_jsd_mean": "CG bond-length JSD vs mapped reference (mean over types)",
    "cg_angles_jsd_mean": "CG angle JSD vs mapped reference (mean over types)",
    "cg_dihedrals_jsd_mean": "CG dihedral JSD vs mapped reference (mean over types)",
    "cg_temperature_mean_K": "CG run temperature (mean)",
    "cg_temperature_std_K": "CG run temperature (standard deviation)",
    "cg_potential_energy_mean_kj_mol": "CG run potential energy (mean)",
}

_COLORS = {"AA reference": "k", "backmapped": "tab:blue", "baseline": "tab:orange", "CG run": "tab:green"}
_LAG_TOLERANCE = 0.01  # relative: frame pairs whose spacing differs more from the lag are not used
_MAX_CONTEXT_FRAMES = 1000  # reference frames used for its own bond/clash scores (context rows)
_MAX_PLOT_FRAMES = 2000


# ----------------------------------------------------------------------------------------------------
# Targets and rows
# ----------------------------------------------------------------------------------------------------


def check_target(key: str, value: Optional[float],
                 scale: Optional[float] = None) -> tuple[Optional[str], Optional[bool]]:
    """The target text and whether ``value`` meets it (``None``: no target, or no value to judge).

    ``scale`` is the standard deviation for ``"abs<=std"`` targets (drift).
    """
    if key not in TARGETS:
        return None, None
    op, threshold = TARGETS[key]
    if op == "abs<=std":
        if scale is None:
            return f"|x| ≤ {threshold:g} σ", None
        limit = threshold * scale
        text = f"|x| ≤ {threshold:g} σ = {limit:.3g} kJ/mol"
    elif op == ">=":
        limit, text = threshold, f"≥ {threshold:g}"
    elif op == "<=":
        limit = threshold
        text = "≤ 1/3 of the baseline's" if key == "velocity_jsd_ratio" else f"≤ {threshold:g}"
    else:
        limit, text = threshold, f"|x| ≤ {threshold:g} kJ/mol" if key.endswith("kj_mol") else f"|x| ≤ {threshold:g}"
    if value is None or not np.isfinite(value):
        if key == "velocity_jsd_ratio" and value is not None and value == math.inf:
            return text, False
        return text, None
    if op == ">=":
        return text, bool(value >= limit)
    if op == "<=":
        return text, bool(value <= limit)
    return text, bool(abs(value) <= limit)


def _row(key: str, subject: str, value: Any, *, unit: str = "", note: str = "", name: Optional[str] = None,
         judged: bool = True, scale: Optional[float] = None) -> dict[str, Any]:
    value = None if value is None else float(value)
    target, passed = check_target(key, value, scale) if judged else (None, None)
    return {"key": key, "name": name or _NAMES.get(key, key), "subject": subject, "value": value, "unit": unit,
            "target": target, "passed": passed, "note": note}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Trajectory:
    label: str
    path: Path
    xyz: np.ndarray  # (frames, atoms, 3) float64 nm
    time: Optional[np.ndarray]  # ps, or None when the file stores no times
    box: Optional[np.ndarray]  # (frames, 3, 3) nm


def _as_mdtraj_topology(value: Any, what: str):
    import mdtraj
    import openmm.app as app

    if isinstance(value, mdtraj.Topology):
        return value
    if isinstance(value, app.Topology):
        return mdtraj.Topology.from_openmm(value)
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such topology file {path}")
    return mdtraj.load_topology(str(path))


def _check_finite(xyz: np.ndarray, label: str, path: Any) -> None:
    bad = ~np.isfinite(xyz).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{label} trajectory {path}: NaN or infinite coordinates in {int(bad.sum())} of {len(xyz)} "
                         f"frames (first: frame {int(np.argmax(bad))})")


def _check_same_atoms(top, ref_top, label: str, path: Any) -> None:
    if top.n_atoms != ref_top.n_atoms:
        raise ValueError(f"atom count mismatch: the {label} trajectory {path} has {top.n_atoms} atoms, the reference "
                         f"topology {ref_top.n_atoms}")
    for i, (a, b) in enumerate(zip(top.atoms, ref_top.atoms)):
        za, zb = getattr(a.element, "atomic_number", 0) or 0, getattr(b.element, "atomic_number", 0) or 0
        if za > 0 and zb > 0 and za != zb:
            raise ValueError(f"atom order mismatch: atom {i} is {a} ({a.element.symbol}) in the {label} trajectory "
                             f"{path} but {b} ({b.element.symbol}) in the reference")


def _load_trajectory(path: Any, topology: Any, ref_top, label: str, topology_arg: str) -> _Trajectory:
    """Read an AA trajectory file and check it against the reference topology."""
    path = Path(path)
    fmt = trajectory_format(path)
    if not path.exists():
        raise FileNotFoundError(f"{label} trajectory {path} does not exist")
    if topology is not None:
        top = _as_mdtraj_topology(topology, topology_arg)
        source = f"the topology given as {topology_arg}"
    elif fmt in ("dcd", "xtc"):
        pdb = topology_pdb_path(path)
        if not pdb.exists():
            raise ValueError(f"{label} trajectory {path} is a {fmt.upper()} file without its topology: expected "
                             f"{pdb} next to it (the writer puts it there); pass {topology_arg}= (a PDB file or a "
                             f"topology) instead")
        top = _as_mdtraj_topology(pdb, topology_arg)
        source = str(pdb)
    elif fmt == "pdb":
        top = _as_mdtraj_topology(path, topology_arg)
        source = str(path)
    else:  # .h5: topology stored in the file (mdtraj layout)
        import mdtraj

        top = mdtraj.load_topology(str(path))
        source = f"the topology stored in {path}"
    frames = read_frames(path)
    xyz = np.asarray(frames["xyz"], dtype=np.float64)
    if xyz.ndim != 3 or len(xyz) == 0:
        raise ValueError(f"{label} trajectory {path} holds no frames")
    if xyz.shape[1] != top.n_atoms:
        raise ValueError(f"{label} trajectory {path} holds {xyz.shape[1]} atoms but {source} has {top.n_atoms}")
    _check_same_atoms(top, ref_top, label, path)
    _check_finite(xyz, label, path)
    t = frames.get("time")
    t = None if t is None else np.asarray(t, dtype=np.float64)
    if t is not None and (len(t) != len(xyz) or not np.isfinite(t).all() or (len(t) > 1 and np.ptp(t) <= 0)):
        t = None
    box = frames.get("box")
    return _Trajectory(label, path, xyz, t, None if box is None else np.asarray(box, dtype=np.float64))


def _median_spacing(t: Optional[np.ndarray]) -> Optional[float]:
    if t is None or len(t) < 2:
        return None
    dt = float(np.median(np.diff(t)))
    return dt if dt > 0 else None


def read_state_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Columns of an OpenMM ``StateDataReporter`` file (CSV, any separator), keyed by their header names.

    The header is the first line starting with ``#`` (``#"Step","Time (ps)",...``); later ``#`` lines (a run
    appended after a restart) and rows that are not all numbers are skipped.
    """
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} is empty")
    header_line = next((line for line in lines if line.startswith("#")), lines[0])
    body = header_line.lstrip("#")
    sep = "," if "," in body else ("\t" if "\t" in body else None)

    def split(line: str) -> list[str]:
        if sep is None:
            return line.split()
        return [f.strip().strip('"') for f in next(csv.reader([line], delimiter=sep))]

    header = split(body)
    rows = []
    for line in lines:
        if line.startswith("#") or line is header_line:
            continue
        fields = split(line)
        if len(fields) != len(header):
            continue
        try:
            rows.append([float(f) for f in fields])
        except ValueError:
            continue
    if not rows:
        raise ValueError(f"{path}: no data rows under the header {header}")
    data = np.array(rows, dtype=np.float64)
    return {name: data[:, k] for k, name in enumerate(header)}


def _column(log: Mapping[str, np.ndarray], *needles: str) -> Optional[np.ndarray]:
    for name, values in log.items():
        if any(n.lower() in name.lower() for n in needles):
            return values
    return None


# ----------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------


def _phi_psi_quads(top) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """φ and ψ atom quadruples of the residues that have both (pooled over residues), or ``None``."""
    import mdtraj

    probe = mdtraj.Trajectory(np.zeros((1, top.n_atoms, 3), dtype=np.float32), top)
    phi, _ = mdtraj.compute_phi(probe)
    psi, _ = mdtraj.compute_psi(probe)
    if len(phi) == 0 or len(psi) == 0:
        return None
    phi_by_res = {top.atom(int(q[2])).residue.index: q for q in phi}  # CA
    psi_by_res = {top.atom(int(q[1])).residue.index: q for q in psi}  # CA
    common = sorted(set(phi_by_res) & set(psi_by_res))
    if not common:
        return None
    return (np.array([phi_by_res[r] for r in common], dtype=np.int64),
            np.array([psi_by_res[r] for r in common], dtype=np.int64))


def _single_atom_beads(mapping) -> dict[int, int]:
    """AA atom index → bead index for beads that sit exactly on one atom."""
    p = np.asarray(mapping.position_matrix)
    out = {}
    for b, row in enumerate(p):
        nz = np.flatnonzero(row)
        if len(nz) == 1 and abs(row[nz[0]] - 1.0) < 1e-9:
            out.setdefault(int(nz[0]), b)
    return out


def _energies(energy, xyz: np.ndarray, box: Optional[np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total AA energies ``(n_frames,)`` and the energies per term category (kJ/mol); the total is their sum."""
    import torch

    chunk = max(1, min(1000, 200_000 // max(1, xyz.shape[1])))
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, len(xyz), chunk):
            pos = torch.as_tensor(xyz[start:start + chunk], dtype=torch.float64)
            b = None if box is None else torch.as_tensor(box[start:start + chunk], dtype=torch.float64)
            for category, value in energy.terms(pos, b).items():
                parts.setdefault(category, []).append(value.numpy())
    terms = {category: np.concatenate(values) for category, values in parts.items()}
    return sum(terms.values()), terms


def _drift(e: np.ndarray) -> dict[str, Any]:
    """``{"drift": {...}, "drift_kj_mol": last 10 % mean − first 10 % mean}`` of energies in frame order, or ``{}``
    with fewer than 10 frames."""
    if len(e) < 10:
        return {}
    kk = max(1, len(e) // 10)
    drift = {"first_mean_kj_mol": float(e[:kk].mean()), "last_mean_kj_mol": float(e[-kk:].mean()),
             "std_kj_mol": float(e.std()), "frames_each": int(kk)}
    return {"drift": drift, "drift_kj_mol": drift["last_mean_kj_mol"] - drift["first_mean_kj_mol"]}


def _pair_speeds(traj: _Trajectory, lag_ps: float, atoms: Optional[np.ndarray],
                 assume_spacing: bool) -> Optional[np.ndarray]:
    """Speeds ``|Δx| / τ`` of consecutive frames spaced by ``lag_ps`` (flattened), or ``None`` if there are none."""
    if len(traj.xyz) < 2:
        return None
    speeds = M.intra_frame_velocities(traj.xyz, lag_ps, atoms)
    if traj.time is not None:
        keep = np.abs(np.diff(traj.time) - lag_ps) <= _LAG_TOLERANCE * lag_ps
    elif assume_spacing:
        keep = np.ones(len(speeds), dtype=bool)
    else:
        return None
    return speeds[keep].ravel() if keep.any() else None


def _grouped(top, terms: np.ndarray, label) -> dict[str, np.ndarray]:
    """Terms grouped by a label of their atoms (read in either direction), most frequent label first."""
    atoms = list(top.atoms)
    groups: dict[str, list[int]] = {}
    for k, term in enumerate(terms):
        names = [label(atoms[i]) for i in term]
        key = "–".join(min(names, names[::-1]))
        groups.setdefault(key, []).append(k)
    order = sorted(groups, key=lambda g: (-len(groups[g]), g))
    return {g: terms[np.array(groups[g])] for g in order}


def _element_label(atom) -> str:
    return getattr(atom.element, "symbol", None) or "?"


def _bead_label(atom) -> str:
    return atom.name


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_fes(path: Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray]], temperature_K: float) -> None:
    plt = _plt()
    vmax = 25.0
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels) + 0.8, 3.7), dpi=110, squeeze=False)
    im = None
    for ax, (title, phi, psi) in zip(axes[0], panels):
        f, _ = M.free_energy_surface(phi, psi, temperature_K=temperature_K)
        f = np.where(np.isfinite(f), f, np.nan)
        im = ax.imshow(f.T, origin="lower", extent=[-180, 180, -180, 180], vmin=0, vmax=vmax, cmap="viridis",
                       aspect="equal")
        ax.set_title(f"{title} ({np.size(phi)} samples)", fontsize=10)
        ax.set_xlabel("φ (deg)")
        ax.set_ylabel("ψ (deg)")
        ax.set_xticks([-180, -90, 0, 90, 180])
        ax.set_yticks([-180, -90, 0, 90, 180])
    fig.colorbar(im, ax=axes[0].tolist(), label=f"F (kJ/mol), clipped at {vmax:g}", shrink=0.9)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _plot_energy(path: Path, energies: Mapping[str, np.ndarray], times: Mapping[str, Optional[np.ndarray]]) -> None:
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    allv = np.concatenate([np.asarray(v) for v in energies.values()])
    ref = energies.get("AA reference", allv)
    lo, hi = np.percentile(ref, [0.1, 99.9])
    lo2, hi2 = np.percentile(allv, [0.5, 99.5])
    lo, hi = min(lo, lo2), max(hi, hi2)
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    bins = np.linspace(lo - pad, hi + pad, 80)
    for name, e in energies.items():
        lw = 2 if name == "AA reference" else 1.3
        ax.hist(np.clip(e, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=lw,
                color=_COLORS.get(name), label=f"{name} (mean {np.mean(e):.1f})")
    ax.set_xlabel("AA potential energy (kJ/mol)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    for name, e in energies.items():
        if name == "AA reference":
            continue
        t = times.get(name)
        x = t if t is not None else np.arange(len(e))
        ax2.plot(x, e, lw=0.7, color=_COLORS.get(name), label=name)
        k = max(1, len(e) // 10)
        ax2.hlines([np.mean(e[:k]), np.mean(e[-k:])], [x[0], x[-k]], [x[k - 1], x[-1]], colors=_COLORS.get(name),
                   lw=2.5, linestyles="-")
    if "AA reference" in energies:
        ax2.axhline(np.mean(energies["AA reference"]), color="k", lw=1, ls="--", label="reference mean")
    ax2.set_xlabel("time (ps)" if any(times.get(n) is not None for n in energies) else "frame")
    ax2.set_ylabel("AA potential energy (kJ/mol)")
    ax2.set_title("trace; thick bars: mean of first and last 10 %", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_distributions(path: Path, top, data: Mapping[str, np.ndarray], label, max_panels: int = 4,
                        xlabel_suffix: str = "") -> None:
    """Bond lengths (top row) and angles (bottom row) pooled by label, for each trajectory in ``data``."""
    plt = _plt()
    terms = M.bonded_terms(top)
    rows = [("bonds", _grouped(top, terms["bonds"], label)), ("angles", _grouped(top, terms["angles"], label))]
    rows = [(kind, dict(list(g.items())[:max_panels])) for kind, g in rows if g]
    if not rows:
        return
    ncol = max(len(g) for _, g in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.2 * ncol, 2.8 * len(rows)), dpi=100, squeeze=False)
    for r, (kind, groups) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            if c >= len(groups):
                ax.axis("off")
                continue
            group, idx = list(groups.items())[c]
            values = {}
            for name, xyz in data.items():
                v = M.distances(xyz, idx) if kind == "bonds" else np.degrees(M.angles(xyz, idx))
                values[name] = v.ravel()
            ref = next(iter(values.values()))
            lo, hi = np.percentile(ref, [0.1, 99.9])
            pad = 0.25 * (hi - lo)
            centre = 0.5 * (lo + hi)
            # at least the bond-score window (±10 %) for bonds, ±5° for angles: constrained bonds are δ-peaks
            half = max(0.5 * (hi - lo) + pad, 0.1 * float(np.median(ref)) if kind == "bonds" else 5.0)
            bins = np.linspace(centre - half, centre + half, 70)
            for k, (name, v) in enumerate(values.items()):
                ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, histtype="step",
                        lw=2 if k == 0 else 1.2, color=_COLORS.get(name), label=name)
            ax.set_title(f"{group} ({len(idx)} {kind if len(idx) > 1 else kind[:-1]})", fontsize=9)
            ax.set_xlabel(("length (nm)" if kind == "bonds" else "angle (deg)") + xlabel_suffix, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_velocities(path: Path, speeds: Mapping[str, np.ndarray], lag_ps: float, atoms_text: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 3.8), dpi=110)
    ref = next(iter(speeds.values()))
    hi = np.percentile(np.concatenate(list(speeds.values())), 99.8) * 1.05
    hi = max(hi, np.percentile(ref, 99.9) * 1.3)
    bins = np.linspace(0, hi, 80)
    for k, (name, v) in enumerate(speeds.items()):
        ax.hist(np.clip(v, 0, hi), bins=bins, density=True, histtype="step", lw=2 if k == 0 else 1.3,
                color=_COLORS.get(name), label=name)
    ax.set_xlabel(f"intra-frame speed |Δx|/τ (nm/ps), τ = {lag_ps:g} ps, {atoms_text}")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_cg_log(path: Path, log: Mapping[str, np.ndarray], temperature_K: Optional[float]) -> bool:
    temp = _column(log, "temperature")
    pot = _column(log, "potential energy")
    if temp is None and pot is None:
        return False
    plt = _plt()
    t = _column(log, "time (ps)")
    step = _column(log, "step")
    x, xlabel = (t, "time (ps)") if t is not None else ((step, "step") if step is not None
                                                         else (np.arange(len(next(iter(log.values())))), "row"))
    panels = [(v, lab) for v, lab in ((temp, "temperature (K)"), (pot, "potential energy (kJ/mol)")) if v is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), dpi=110, squeeze=False)
    for ax, (v, lab) in zip(axes[0], panels):
        ax.plot(x, v, lw=0.8, color="tab:green")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(lab)
        if lab.startswith("temperature") and temperature_K:
            ax.axhline(temperature_K, color="k", ls="--", lw=1, label=f"reference {temperature_K:g} K")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def _structure_metrics(traj: _Trajectory, ref: dict[str, Any], top) -> dict[str, Any]:
    xyz = traj.xyz
    out: dict[str, Any] = {"frames": int(len(xyz))}
    if len(ref["bonds"]):
        out["bond_score"] = M.bond_score(xyz, ref["bonds"], ref["bond_lengths"])
    if ref["has_heavy"]:
        out["clash_score"] = M.clash_score(xyz, top, box_vectors_nm=traj.box if ref["periodic"] else None)
    if ref.get("phi") is not None:
        phi, psi = M.dihedrals(xyz, ref["quads"][0]), M.dihedrals(xyz, ref["quads"][1])
        out["fes_jsd"] = M.fes_jsd(ref["phi"], ref["psi"], phi, psi)
        out["_phi"], out["_psi"] = phi, psi
    if len(ref["bonds"]):
        ic = M.internal_coordinate_jsd(ref["xyz"], xyz, top)
        out["internal_jsd"] = ic
        out["psi"] = M.psi_score(ref["xyz"], xyz, top)
    return out


def evaluate_run(
    out_dir: str | os.PathLike,
    *,
    reference: Any,
    backmapped: str | os.PathLike,
    backmapped_topology: Any = None,
    baseline: str | os.PathLike | None = None,
    cg_trajectory: str | os.PathLike | None = None,
    cg_topology: Any = None,
    cg_log: str | os.PathLike | None = None,
    mapping: Any = None,
    system: Any = None,
    lag_ps: Optional[float] = None,
    temperature_K: Optional[float] = None,
    title: str = "openmm-backmap evaluation",
    max_reference_frames: int = 20000,
) -> dict[str, Any]:
    """Evaluate a backmapped trajectory against an AA reference; write ``metrics.json``, PNGs and ``report.html``.

    Parameters
    ----------
    out_dir
        Output folder (created).
    reference
        The AA reference: path of an openmm-backmap AA HDF5 file, or an open
        :class:`~openmm_backmap.data.AADataset`. Its System gives the energies (unless ``system``), its
        settings the temperature (unless ``temperature_K``), its topology (with bonds) the terms of every
        structural metric.
    backmapped
        The backmapped AA trajectory (``.dcd``, ``.xtc``, ``.h5`` or ``.pdb``). A DCD/XTC needs its topology
        PDB next to it (``x.dcd`` → ``x.pdb``, as :class:`~openmm_backmap.formats.AATrajectoryWriter` writes it)
        or ``backmapped_topology``.
    backmapped_topology
        Topology of ``backmapped`` (PDB path, ``openmm.app.Topology`` or ``mdtraj.Topology``); used to check the
        atoms (count and elements in order) against the reference. Also used for ``baseline`` when given.
    baseline
        Optional second AA trajectory (e.g. a frame-based backmapper) evaluated the same way; the velocity JSD
        target compares the two.
    cg_trajectory, cg_topology
        Optional CG trajectory of the run (and its topology; default: the PDB next to it, else
        ``mapping.cg_topology``). With ``mapping``, its bond/angle/dihedral distributions (and φ/ψ when every φ/ψ
        atom is a single-atom bead) are compared with the mapped reference.
    cg_log
        Optional ``StateDataReporter`` CSV of the CG run: temperature and potential-energy traces.
    mapping
        Optional :class:`~openmm_backmap.mapping.CGMapping` of the reference atoms. Also selects the atoms of
        the velocity JSD: those carrying no bead weight (placed by the backmapper; bead atoms move as the CG
        trajectory says).
    system
        ``openmm.System`` for the AA energies (default: the reference dataset's).
    lag_ps
        Time between the frames of the backmapped file used for the intra-frame velocities (default: the median
        spacing of its stored times). The reference must have frames at a whole multiple of its spacing.
    temperature_K
        Temperature of the free-energy surfaces (default: the reference's ``temperature_K`` setting, else 300 K).
    title
        Report title.
    max_reference_frames
        Reference frames beyond this count are subsampled evenly (stride).

    Returns
    -------
    dict
        ``metrics`` (list of rows: ``key``, ``name``, ``subject``, ``value``, ``unit``, ``target``, ``passed``,
        ``note``), ``html`` and ``json`` (paths), ``figures`` (list of ``{"path", "caption"}``), ``details``
        (every number by trajectory) and ``notes`` (what was skipped and why).

    Raises
    ------
    ValueError
        Atom counts or atom order of a trajectory differ from the reference, a DCD/XTC without its topology
        PDB, a trajectory without frames, NaN coordinates, a System or mapping for other atoms.
    """
    from .data import AADataset
    from .energy import AAEnergy
    from .report import machine_info, report_versions, write_report

    t_start = _time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    notes: list[str] = []
    if max_reference_frames < 2:
        raise ValueError("max_reference_frames must be at least 2")
    if lag_ps is not None and not float(lag_ps) > 0:
        raise ValueError(f"lag_ps must be positive, got {lag_ps}")

    # -- reference -------------------------------------------------------------------------------------
    owned = not isinstance(reference, AADataset)
    ds = AADataset(reference) if owned else reference
    try:
        n_ref = ds.n_frames
        if n_ref == 0:
            raise ValueError(f"the reference {ds.path} holds no frames")
        stride = -(-n_ref // int(max_reference_frames))
        ref_xyz = ds.positions[::stride].astype(np.float64)
        _check_finite(ref_xyz, "reference", ds.path)
        ref_time_all = ds.time
        periodic = bool(ds.periodic)
        ref_box = ds.box_vectors[::stride].astype(np.float64) if periodic else None
        ref_top = ds.mdtraj_topology
        settings = ds.settings
        sys_ = system if system is not None else ds.system
        stored_energy = ds.potential_energy[::stride] if system is None else None
        ref_dt = _median_spacing(ref_time_all)
        ref_path = ds.path

        # -- backmapped / baseline -------------------------------------------------------------------
        trajs = {"backmapped": _load_trajectory(backmapped, backmapped_topology, ref_top, "backmapped",
                                                "backmapped_topology")}
        if baseline is not None:
            trajs["baseline"] = _load_trajectory(baseline, backmapped_topology, ref_top, "baseline",
                                                 "backmapped_topology")
        for name, traj in trajs.items():
            if trajectory_format(traj.path) == "xtc":
                notes.append(f"{name}: XTC stores coordinates rounded to 0.001 nm, which biases the AA energies and "
                             "bond-length distributions of its frames (use .dcd or .h5 for evaluation)")
        if sys_.getNumParticles() != ref_top.n_atoms:
            raise ValueError(f"the System has {sys_.getNumParticles()} particles, the reference "
                             f"{ref_top.n_atoms} atoms")
        if mapping is not None and mapping.n_atoms != ref_top.n_atoms:
            raise ValueError(f"the mapping is for {mapping.n_atoms} atoms, the reference has {ref_top.n_atoms}")

        # lag and the reference frame pairs at that lag
        explicit_lag = lag_ps is not None
        lag = float(lag_ps) if explicit_lag else _median_spacing(trajs["backmapped"].time)
        ref_pairs = None
        if lag is None:
            notes.append("velocity JSD skipped: the backmapped file stores no frame times (PDB?); pass lag_ps")
        elif ref_dt is None:
            notes.append("velocity JSD skipped: the reference has fewer than two frames")
        else:
            k = int(round(lag / ref_dt))
            if k < 1 or abs(k * ref_dt - lag) > _LAG_TOLERANCE * lag:
                notes.append(f"velocity JSD skipped: the lag {lag:g} ps is not a whole multiple of the reference "
                             f"frame spacing {ref_dt:g} ps")
            else:
                starts = np.arange(0, n_ref - k, stride)
                ok = np.abs(ref_time_all[starts + k] - ref_time_all[starts] - lag) <= _LAG_TOLERANCE * lag
                starts = starts[ok]
                if len(starts) == 0:
                    notes.append(f"velocity JSD skipped: no reference frame pairs {lag:g} ps apart")
                else:
                    first = ref_xyz[starts // stride]
                    second = (ref_xyz[starts // stride + 1] if stride == k else
                              ds.positions[starts + k].astype(np.float64))
                    ref_pairs = (first, second)
    finally:
        if owned:
            ds.close()
    timings["read_s"] = _time.perf_counter() - t_start

    temperature = float(temperature_K if temperature_K is not None else settings.get("temperature_K") or 300.0)
    if temperature_K is None and settings.get("temperature_K") is None:
        notes.append("temperature not stored with the reference: 300 K assumed for the free-energy surfaces")

    bonds = np.array([[b[0].index, b[1].index] for b in ref_top.bonds], dtype=np.int64).reshape(-1, 2)
    ref: dict[str, Any] = {"xyz": ref_xyz, "bonds": bonds, "periodic": periodic,
                           "has_heavy": bool(any(getattr(a.element, "atomic_number", 0) > 1 for a in ref_top.atoms))}
    if len(bonds):
        ref["bond_lengths"] = M.bond_reference_lengths(ref_xyz, bonds)
    else:
        notes.append("the reference topology has no bonds: bond score and internal-coordinate JSDs skipped")
    if len(bonds) and sys_.getNumConstraints():
        span = np.ptp(M.distances(ref_xyz, bonds), axis=0)
        rigid = int(np.sum(span < 1e-3 * ref["bond_lengths"]))
        if rigid:
            notes.append(f"{rigid} of {len(bonds)} bonds are constrained (their reference lengths vary by less than "
                         "0.1 %): their bond-length JSDs are measured on bins that narrow and mostly reflect "
                         "coordinate rounding in the files (float32, DCD), not the backmapper; the bond score is "
                         "unaffected")
    if periodic:
        notes.append("periodic system: bonds and internal coordinates are measured without minimum image "
                     "(molecules must be whole in the files)")
    quads = _phi_psi_quads(ref_top)
    if quads is not None:
        ref["quads"] = quads
        ref["phi"], ref["psi"] = M.dihedrals(ref_xyz, quads[0]), M.dihedrals(ref_xyz, quads[1])
    else:
        notes.append("no φ/ψ dihedrals in the topology (not a peptide): FES JSD skipped")

    # -- structure ---------------------------------------------------------------------------------------
    t0 = _time.perf_counter()
    details: dict[str, dict[str, Any]] = {}
    for name, traj in trajs.items():
        details[name] = _structure_metrics(traj, ref, ref_top)
    ctx = ref_xyz[:: -(-len(ref_xyz) // _MAX_CONTEXT_FRAMES)]
    details["reference"] = {"frames_total": int(n_ref), "frames_used": int(len(ref_xyz)), "stride": int(stride)}
    if len(bonds):
        details["reference"]["bond_score"] = M.bond_score(ctx, bonds, ref["bond_lengths"])
    if ref["has_heavy"]:
        ctx_box = ref_box[:: -(-len(ref_xyz) // _MAX_CONTEXT_FRAMES)] if periodic else None
        details["reference"]["clash_score"] = M.clash_score(ctx, ref_top, box_vectors_nm=ctx_box)
    timings["structure_s"] = _time.perf_counter() - t0

    # -- energies ----------------------------------------------------------------------------------------
    t0 = _time.perf_counter()
    energy = AAEnergy(sys_)
    energies: dict[str, np.ndarray] = {}
    energies["AA reference"], ref_terms = _energies(energy, ref_xyz, ref_box)
    if stored_energy is not None:
        details["reference"]["stored_energy_max_abs_diff_kj_mol"] = float(
            np.max(np.abs(energies["AA reference"] - stored_energy)))
    details["reference"]["energy_mean_kj_mol"] = float(energies["AA reference"].mean())
    details["reference"]["energy_std_kj_mol"] = float(energies["AA reference"].std())
    details["reference"].update(_drift(energies["AA reference"]))
    for name, traj in trajs.items():
        if energy.periodic and traj.box is None:
            notes.append(f"{name}: the System is periodic but the file stores no box; energies skipped")
            continue
        e, terms = _energies(energy, traj.xyz, traj.box if energy.periodic else None)
        energies[name] = e
        d = details[name]
        dist = M.energy_distribution(energies["AA reference"], e)
        d.update(energy_jsd=dist["jsd"], energy_shift_kj_mol=dist["mean_shift_kj_mol"],
                 energy_mean_kj_mol=dist["predicted_mean_kj_mol"], energy_std_kj_mol=dist["predicted_std_kj_mol"])
        # Medians: a few frames with overlapping atoms (10^6 kJ/mol and more) decide the mean shift; the median
        # shift, split by term, says where the bulk of the frames sits and which part of the force field puts it there.
        d["energy_median_shift_kj_mol"] = float(np.median(e) - np.median(energies["AA reference"]))
        d["energy_median_shift_by_term_kj_mol"] = {
            k: float(np.median(terms[k]) - np.median(ref_terms[k])) for k in ref_terms if k in terms}
        d.update(_drift(e))
        if "drift" not in d:
            notes.append(f"{name}: fewer than 10 frames, drift skipped")
    timings["energy_s"] = _time.perf_counter() - t0

    # -- dynamics ----------------------------------------------------------------------------------------
    t0 = _time.perf_counter()
    speeds: dict[str, np.ndarray] = {}
    placed = None
    if mapping is not None:
        placed = np.flatnonzero(np.asarray(mapping.position_matrix).max(axis=0) == 0)
        if len(placed) == 0:
            notes.append("every atom carries bead weight: velocity JSD over all atoms")
            placed = None
    atoms_text = "atoms without bead weight" if placed is not None else "all atoms"
    if ref_pairs is not None:
        sel = slice(None) if placed is None else placed
        speeds["AA reference"] = (np.linalg.norm(ref_pairs[1][:, sel] - ref_pairs[0][:, sel], axis=-1) / lag).ravel()
        ref_all = (np.linalg.norm(ref_pairs[1] - ref_pairs[0], axis=-1) / lag).ravel()
        for name, traj in trajs.items():
            s = _pair_speeds(traj, lag, placed, explicit_lag)
            if s is None:
                notes.append(f"{name}: no consecutive frames {lag:g} ps apart, velocity JSD skipped")
                continue
            speeds[name] = s
            details[name]["velocity_jsd"] = M.histogram_jsd(speeds["AA reference"], s, bins=100)
            if placed is not None:
                s_all = _pair_speeds(traj, lag, None, explicit_lag)
                details[name]["velocity_jsd_all_atoms"] = M.histogram_jsd(ref_all, s_all, bins=100)
        bm, bl = details["backmapped"].get("velocity_jsd"), details.get("baseline", {}).get("velocity_jsd")
        if bm is not None and bl is not None:
            details["backmapped"]["velocity_jsd_ratio"] = (bm / bl if bl > 1e-12 else
                                                           (0.0 if bm <= 1e-12 else math.inf))
    timings["dynamics_s"] = _time.perf_counter() - t0

    # -- CG run ------------------------------------------------------------------------------------------
    t0 = _time.perf_counter()
    cg: dict[str, Any] = {}
    cg_xyz = None
    cg_top = None
    if cg_trajectory is not None:
        cg_path = Path(cg_trajectory)
        if not cg_path.exists():
            raise FileNotFoundError(f"CG trajectory {cg_path} does not exist")
        frames = read_frames(cg_path)
        cg_xyz = np.asarray(frames["xyz"], dtype=np.float64)
        if cg_xyz.ndim != 3 or len(cg_xyz) == 0:
            raise ValueError(f"CG trajectory {cg_path} holds no frames")
        _check_finite(cg_xyz, "CG", cg_path)
        if cg_topology is not None:
            cg_top = _as_mdtraj_topology(cg_topology, "cg_topology")
        elif trajectory_format(cg_path) in ("dcd", "xtc") and topology_pdb_path(cg_path).exists():
            cg_top = _as_mdtraj_topology(topology_pdb_path(cg_path), "cg_topology")
        elif trajectory_format(cg_path) == "pdb":
            cg_top = _as_mdtraj_topology(cg_path, "cg_topology")
        if mapping is not None:
            if cg_xyz.shape[1] != mapping.n_beads:
                raise ValueError(f"CG trajectory {cg_path} holds {cg_xyz.shape[1]} particles, the mapping "
                                 f"{mapping.n_beads} beads")
            cg_top = mapping.cg_topology  # bonds and bead names of the mapping
        elif cg_top is not None and cg_top.n_atoms != cg_xyz.shape[1]:
            raise ValueError(f"CG trajectory {cg_path} holds {cg_xyz.shape[1]} particles, its topology "
                             f"{cg_top.n_atoms}")
        cg["frames"] = int(len(cg_xyz))
        if mapping is None:
            notes.append("CG distributions skipped: they need the mapping (to map the reference)")
        else:
            mapped = mapping.map_positions(ref_xyz, ref_box[:, :, :] if periodic else None)
            cg["_mapped"] = mapped
            if cg_top.n_bonds:
                ic = M.internal_coordinate_jsd(mapped, cg_xyz, cg_top)
                cg["internal_jsd"] = ic
            else:
                notes.append("the CG topology has no bonds: CG internal-coordinate JSDs skipped")
            if quads is not None:
                single = _single_atom_beads(mapping)
                if all(int(a) in single for q in quads for a in q.ravel()):
                    cq = [np.array([[single[int(a)] for a in quad] for quad in q], dtype=np.int64) for q in quads]
                    phi, psi = M.dihedrals(cg_xyz, cq[0]), M.dihedrals(cg_xyz, cq[1])
                    cg["fes_jsd"] = M.fes_jsd(ref["phi"], ref["psi"], phi, psi)
                    cg["_phi"], cg["_psi"] = phi, psi
                else:
                    notes.append("the φ/ψ atoms are not all single-atom beads: no φ/ψ surface of the CG run")
    log = None
    if cg_log is not None:
        log = read_state_log(cg_log)
        temp = _column(log, "temperature")
        pot = _column(log, "potential energy")
        cg["log_rows"] = int(len(next(iter(log.values()))))
        if temp is not None:
            cg["temperature_mean_K"], cg["temperature_std_K"] = float(np.mean(temp)), float(np.std(temp))
        else:
            notes.append(f"{cg_log}: no temperature column")
        if pot is not None:
            cg["potential_energy_mean_kj_mol"] = float(np.mean(pot))
            cg["potential_energy_std_kj_mol"] = float(np.std(pot))
    if cg:
        details["cg"] = cg
    timings["cg_s"] = _time.perf_counter() - t0

    # -- rows ------------------------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    subjects = list(trajs)
    lag_text = f"τ = {lag:g} ps" if lag else ""

    def add(key: str, unit: str = "", note_fn=None, subjects_=subjects, with_reference: bool = False) -> None:
        for s in subjects_:
            d = details.get(s, {})
            if key in d:
                note = note_fn(d) if note_fn else ""
                scale = d["drift"]["std_kj_mol"] if key == "drift_kj_mol" else None
                rows.append(_row(key, s, d[key], unit=unit, note=note, scale=scale))
        if with_reference and key in details["reference"]:
            rows.append(_row(key, "AA reference", details["reference"][key], unit=unit, judged=False,
                             note=f"context: {min(len(ref_xyz), _MAX_CONTEXT_FRAMES)} reference frames"))

    add("bond_score", with_reference=True)
    add("clash_score", with_reference=True)
    add("energy_jsd")
    add("energy_shift_kj_mol", "kJ/mol")
    add("energy_median_shift_kj_mol", "kJ/mol", lambda d: "by term: " + ", ".join(
        f"{k} {v:+.3g}" for k, v in d["energy_median_shift_by_term_kj_mol"].items()))
    for s in subjects:
        if "energy_mean_kj_mol" in details[s]:
            rows.append(_row("energy_mean_kj_mol", s, details[s]["energy_mean_kj_mol"], unit="kJ/mol",
                             note=f"std {details[s]['energy_std_kj_mol']:.3g} kJ/mol"))
    rows.append(_row("energy_mean_kj_mol", "AA reference", details["reference"]["energy_mean_kj_mol"],
                     unit="kJ/mol", note=f"std {details['reference']['energy_std_kj_mol']:.3g} kJ/mol"))
    add("drift_kj_mol", "kJ/mol", lambda d: f"first 10 % {d['drift']['first_mean_kj_mol']:.4g}, last 10 % "
                                            f"{d['drift']['last_mean_kj_mol']:.4g} kJ/mol")
    if "drift" in details["reference"]:  # a reference that is not stationary drifts too: context for the target
        ref_drift = details["reference"]["drift"]
        rows.append(_row("drift_kj_mol", "AA reference", details["reference"]["drift_kj_mol"], unit="kJ/mol",
                         judged=False, note=f"the reference's own drift over its frames (σ {ref_drift['std_kj_mol']:.3g} "
                                            "kJ/mol); a backmapped test set follows it frame by frame"))
    add("fes_jsd")
    if "fes_jsd" in cg:
        rows.append(_row("fes_jsd", "CG run", cg["fes_jsd"], judged=False,
                         note="CG beads on the φ/ψ atoms; context for the backmapped surface"))
    for kind in ("bonds", "angles", "dihedrals"):
        for s in subjects:
            ic = details[s].get("internal_jsd")
            if ic and ic.get(f"n_{kind}", 0):
                rows.append(_row(f"{kind}_jsd_mean", s, ic[f"{kind}_mean"],
                                 note=f"max {ic[f'{kind}_max']:.3g} over {ic[f'n_{kind}']} types"))
    for s in subjects:
        if "psi" in details[s]:
            p = details[s]["psi"]
            details[s]["psi_total"] = p["total"]
            rows.append(_row("psi_total", s, p["total"], note=f"bonds {p['bonds']:.3g}, angles {p['angles']:.3g}, "
                                                           f"dihedrals {p['dihedrals']:.3g}"))
    add("velocity_jsd", note_fn=lambda d: f"{atoms_text}, {lag_text}")
    add("velocity_jsd_all_atoms", note_fn=lambda d: lag_text)
    if "velocity_jsd_ratio" in details["backmapped"]:
        rows.append(_row("velocity_jsd_ratio", "backmapped", details["backmapped"]["velocity_jsd_ratio"],
                         note=f"baseline velocity JSD {details['baseline']['velocity_jsd']:.3g}"))
    ic = cg.get("internal_jsd")
    for kind in ("bonds", "angles", "dihedrals"):
        if ic and ic.get(f"n_{kind}", 0):
            rows.append(_row(f"cg_{kind}_jsd_mean", "CG run", ic[f"{kind}_mean"],
                             note=f"max {ic[f'{kind}_max']:.3g} over {ic[f'n_{kind}']} types"))
    if "temperature_mean_K" in cg:
        rows.append(_row("cg_temperature_mean_K", "CG run", cg["temperature_mean_K"], unit="K",
                         note=f"reference {temperature:g} K; {cg['log_rows']} log rows"))
        rows.append(_row("cg_temperature_std_K", "CG run", cg["temperature_std_K"], unit="K"))
    if "potential_energy_mean_kj_mol" in cg:
        rows.append(_row("cg_potential_energy_mean_kj_mol", "CG run", cg["potential_energy_mean_kj_mol"],
                         unit="kJ/mol", note=f"std {cg['potential_energy_std_kj_mol']:.3g} kJ/mol (CG potential)"))

    # -- figures -------------------------------------------------------------------------------------------
    t0 = _time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[dict[str, str]]] = {"structure": [], "energy": [], "dynamics": [], "cg": []}
    plot_stride = -(-len(ref_xyz) // _MAX_PLOT_FRAMES)
    if "phi" in ref:
        panels = [("AA reference", ref["phi"], ref["psi"])]
        if "_phi" in cg:
            panels.append(("CG run", cg["_phi"], cg["_psi"]))
        panels += [(s, details[s]["_phi"], details[s]["_psi"]) for s in subjects]
        _plot_fes(out / "fes.png", panels, temperature)
        figures["structure"].append({"path": "fes.png", "caption": (
            f"φ/ψ free-energy surfaces −kT ln p(φ, ψ) at {temperature:g} K on a 36×36 grid "
            "(white: not sampled). "
            "Compare the basins and their relative depth with the AA reference; the CG panel (if shown) is the CG "
            "run itself, so differences between it and the reference come from the CG model, not the backmapper.")})
    if len(bonds):
        data = {"AA reference": ref_xyz[::plot_stride]}
        data.update({s: trajs[s].xyz for s in subjects})
        _plot_distributions(out / "internal.png", ref_top, data, _element_label)
        figures["structure"].append({"path": "internal.png", "caption": (
            "Bond lengths (top) and bond angles (bottom) pooled by element sequence, for the most frequent kinds "
            "(bond axes span at least the ±10 % bond-score window; values beyond an axis are piled up at its ends). "
            "Backmapped geometry should sit on the reference peaks with the same widths.")})
    if len(energies) > 1:
        _plot_energy(out / "energy.png", energies, {s: trajs[s].time for s in subjects})
        figures["energy"].append({"path": "energy.png", "caption": (
            "Left: AA potential energy of every frame (same System for all; values beyond the axis are piled up at "
            "its ends). Right: energy along the backmapped trajectories; the thick bars are the means of the first "
            "and last 10 % used for the drift criterion.")})
    if len(speeds) > 1:
        _plot_velocities(out / "velocities.png", speeds, lag, atoms_text)
        figures["dynamics"].append({"path": "velocities.png", "caption": (
            f"Intra-frame speeds |x(t) − x(t − τ)| / τ of {atoms_text} (seed 003, eq. 8.9), τ = {lag:g} ps. A "
            "temporally coherent backmapper follows the reference; independent frames give far too fast atoms.")})
    if log is not None and _plot_cg_log(out / "cg_log.png", log, temperature):
        figures["cg"].append({"path": "cg_log.png", "caption": (
            f"CG run: temperature and CG potential energy from {Path(cg_log).name}; the dashed line is the "
            "reference temperature.")})
    if cg_xyz is not None and "_mapped" in cg and cg_top.n_bonds:
        _plot_distributions(out / "cg_distributions.png", cg_top,
                            {"AA reference": cg["_mapped"][::plot_stride], "CG run": cg_xyz}, _bead_label,
                            xlabel_suffix=" (CG)")
        figures["cg"].append({"path": "cg_distributions.png", "caption": (
            "CG bond lengths and angles of the CG run against the mapped AA reference, by bead names.")})
    timings["plots_s"] = _time.perf_counter() - t0

    # -- outputs -------------------------------------------------------------------------------------------
    inputs = {
        "reference": str(ref_path), "reference_frames_total": int(n_ref), "reference_frames_used": int(len(ref_xyz)),
        "reference_stride": int(stride), "reference_frame_spacing_ps": ref_dt,
        "backmapped": str(trajs["backmapped"].path), "backmapped_frames": int(len(trajs["backmapped"].xyz)),
        "baseline": str(trajs["baseline"].path) if "baseline" in trajs else None,
        "baseline_frames": int(len(trajs["baseline"].xyz)) if "baseline" in trajs else None,
        "cg_trajectory": None if cg_trajectory is None else str(cg_trajectory),
        "cg_frames": cg.get("frames"), "cg_log": None if cg_log is None else str(cg_log),
        "mapping": None if mapping is None else repr(mapping), "lag_ps": lag, "temperature_K": temperature,
        "energy_system": "given" if system is not None else "reference dataset",
        "velocity_atoms": atoms_text, "n_atoms": int(ref_top.n_atoms),
    }
    all_figures = [f for group in figures.values() for f in group]
    timings["total_s"] = _time.perf_counter() - t_start
    versions, machine = report_versions(), machine_info()
    from ._version import __version__

    clean_details = {s: {k: v for k, v in d.items() if not k.startswith("_")} for s, d in details.items()}
    record = {
        "title": title, "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "package": {"openmm-backmap": __version__}, "inputs": inputs, "targets": TARGETS, "metrics": rows,
        "details": clean_details, "notes": notes, "figures": all_figures, "versions": versions,
        "machine": machine, "timings_s": timings,
    }
    json_path = out / "metrics.json"
    json_path.write_text(json.dumps(_jsonable(record), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                         encoding="utf-8")

    summary = (f"{len(trajs['backmapped'].xyz)} backmapped frames"
               + (f" and {len(trajs['baseline'].xyz)} baseline frames" if "baseline" in trajs else "")
               + f" against {len(ref_xyz)} AA reference frames"
               + (f" (every {stride}th of {n_ref})" if stride > 1 else "") + ".")
    input_rows = [[k, "–" if v is None else v] for k, v in inputs.items()]
    sections = [
        {"title": "Metrics", "text": summary, "metrics": rows},
        {"title": "Inputs", "table": {"columns": ["input", "value"], "rows": input_rows}},
    ]
    for key, heading in (("structure", "Structure"), ("energy", "Energies"), ("dynamics", "Dynamics"),
                         ("cg", "CG run")):
        if figures[key]:
            sections.append({"title": heading, "figures": figures[key]})
    if notes:
        sections.append({"title": "Notes", "text": "\n\n".join(notes)})
    sections.append({"title": "Files", "text": f"All numbers: {json_path.name}. Figures: "
                     + (", ".join(f["path"] for f in all_figures) or "none") + " (same folder as this page)."})
    how_to_read = (
        "Each row of the metric table compares one trajectory (backmapped, baseline, or the CG run) with the AA "
        "reference. Rows with a target show ✓ (met) or ✗ (missed); – marks numbers shown for context (the "
        "reference against itself, means, CG distributions). Jensen–Shannon divergences (JSD) are in nats: 0 for "
        "identical histograms, ln 2 ≈ 0.69 for disjoint ones. The bond score and clash score judge every single "
        "frame; the energy, FES and internal-coordinate JSDs judge whole distributions, so a trajectory can have "
        "good geometry and still sample the wrong states. The velocity JSD measures how smoothly atoms move "
        "between consecutive backmapped frames compared with real AA dynamics; with a baseline, the target asks "
        "for a third of the baseline's value. The drift row compares the mean AA energy of the last and first "
        "10 % of the frames against one standard deviation. The figures show the distributions behind the numbers."
    )
    html_path = write_report(out / "report.html", title=title, sections=sections, how_to_read=how_to_read,
                             versions=versions, machine=machine)
    return {"metrics": rows, "html": html_path, "json": json_path,
            "figures": [{"path": str(out / f["path"]), "caption": f["caption"]} for f in all_figures],
            "details": clean_details, "notes": notes}
