"""Metrics shared across the project: distribution distances, free-energy surfaces, geometry.

Definitions (DESIGN.md): Jensen–Shannon divergences are computed on fixed histograms with the natural
logarithm (so 0 <= JSD <= ln 2); the φ/ψ free-energy-surface JSD uses a 36×36 grid over [-π, π)².
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ._physics import BOLTZMANN_KJ_MOL_K


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence (nats) of two histograms (normalised here; empty bins allowed)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in shape: {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0 or (p < 0).any() or (q < 0).any():
        raise ValueError("histograms must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / m[mask])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def histogram_jsd(a: np.ndarray, b: np.ndarray, *, bins: int = 100, range: Sequence[float] | None = None) -> float:
    """JSD of the 1D distributions of samples ``a`` and ``b`` on a common fixed histogram.

    ``range`` defaults to the joint 0.1–99.9 percentiles (so a few outliers do not squeeze the bins).
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if range is None:
        both = np.concatenate([a, b])
        range = (np.percentile(both, 0.1), np.percentile(both, 99.9))
    ha, edges = np.histogram(a, bins=bins, range=range)
    hb, _ = np.histogram(b, bins=edges)
    return jensen_shannon(ha, hb)


def dihedral_jsd(a: np.ndarray, b: np.ndarray, *, bins: int = 36) -> float:
    """JSD of two dihedral-angle samples (radians) on ``bins`` bins over [-π, π)."""
    return histogram_jsd(a, b, bins=bins, range=(-np.pi, np.pi))


def fes_jsd(phi_a, psi_a, phi_b, psi_b, *, bins: int = 36) -> float:
    """JSD of two φ/ψ distributions (radians) on a ``bins``×``bins`` grid over [-π, π)²."""
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    ha, _, _ = np.histogram2d(np.ravel(phi_a), np.ravel(psi_a), bins=[edges, edges])
    hb, _, _ = np.histogram2d(np.ravel(phi_b), np.ravel(psi_b), bins=[edges, edges])
    return jensen_shannon(ha, hb)


def free_energy_surface(phi, psi, *, temperature_K: float = 300.0, bins: int = 36):
    """-kT ln p(φ, ψ) in kJ/mol (minimum 0; unsampled bins are ``inf``) and the bin edges (radians)."""
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    h, _, _ = np.histogram2d(np.ravel(phi), np.ravel(psi), bins=[edges, edges], density=True)
    with np.errstate(divide="ignore"):
        f = -BOLTZMANN_KJ_MOL_K * temperature_K * np.log(h)
    return f - f[np.isfinite(f)].min(), edges


def distances(xyz: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Distances ``(frames, P)`` (nm) between atom pairs ``(P, 2)`` of ``xyz (frames, n, 3)``."""
    pairs = np.asarray(pairs, dtype=int)
    return np.linalg.norm(xyz[:, pairs[:, 1]] - xyz[:, pairs[:, 0]], axis=-1)


def angles(xyz: np.ndarray, triples: np.ndarray) -> np.ndarray:
    """Angles ``(frames, T)`` in radians at the middle atom of each triple."""
    t = np.asarray(triples, dtype=int)
    u = xyz[:, t[:, 0]] - xyz[:, t[:, 1]]
    v = xyz[:, t[:, 2]] - xyz[:, t[:, 1]]
    return np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), np.sum(u * v, axis=-1))


def dihedrals(xyz: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """Dihedral angles ``(frames, Q)`` in radians, IUPAC sign convention (as OpenMM and mdtraj)."""
    q = np.asarray(quads, dtype=int)
    b0 = xyz[:, q[:, 1]] - xyz[:, q[:, 0]]
    b1 = xyz[:, q[:, 2]] - xyz[:, q[:, 1]]
    b2 = xyz[:, q[:, 3]] - xyz[:, q[:, 2]]
    n1, n2 = np.cross(b0, b1), np.cross(b1, b2)
    m1 = np.cross(n1, b1 / np.linalg.norm(b1, axis=-1, keepdims=True))
    return -np.arctan2(np.sum(m1 * n2, axis=-1), np.sum(n1 * n2, axis=-1))
