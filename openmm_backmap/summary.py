"""Short summaries of AA and CG datasets (numbers plus a couple of plots)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._physics import BOLTZMANN_KJ_MOL_K, degrees_of_freedom
from .data import AADataset, CGDataset



def kinetic_temperature(dataset: AADataset, chunk: int = 2048) -> np.ndarray:
    """Instantaneous temperature (K) of every frame from the stored velocities.

    Degrees of freedom: 3 per massive particle, minus constraints, minus 3 if the system removes
    centre-of-mass motion.
    """
    dof = degrees_of_freedom(dataset.system)
    masses = np.array([dataset.system.getParticleMass(i)._value for i in range(dataset.n_atoms)])
    out = []
    for start in range(0, dataset.n_frames, chunk):
        v = dataset.velocities[start: start + chunk].astype(np.float64)
        ke = 0.5 * np.einsum("i,fij->f", masses, v**2)
        out.append(2 * ke / (dof * BOLTZMANN_KJ_MOL_K))
    return np.concatenate(out) if out else np.zeros(0)


def _bond_lengths(cg: CGDataset) -> dict[str, np.ndarray]:
    top = cg.topology
    atoms = list(top.atoms())
    xyz = cg.positions[:]
    out = {}
    for a, b in top.bonds():
        d = np.linalg.norm(xyz[:, b.index] - xyz[:, a.index], axis=-1)
        label = lambda atom: f"{atom.residue.name}:{atom.name}"  # noqa: E731
        out[f"{label(atoms[a.index])}-{label(atoms[b.index])}"] = d
    return out


def dataset_summary(aa_path: str | os.PathLike, cg_path: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Summarise an AA dataset and its CG mapping; writes ``summary.md`` and PNG plots into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mdtraj

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    with AADataset(aa_path) as aa:
        settings = aa.settings
        temps = kinetic_temperature(aa)
        energy = aa.potential_energy
        forces = aa.forces[:]
        summary["aa"] = {
            "file": str(aa_path),
            "frames": aa.n_frames,
            "atoms": aa.n_atoms,
            "simulated_ps": round(float(aa.time[-1] - 2 * aa.time[0] + aa.time[1]), 6) if aa.n_frames > 1 else 0.0,
            "frame_interval_ps": round(float(aa.time[1] - aa.time[0]), 9) if aa.n_frames > 1 else None,
            "temperature_set_K": settings.get("temperature_K"),
            "temperature_mean_K": float(temps.mean()),
            "potential_energy_mean_kJ_mol": float(energy.mean()),
            "potential_energy_std_kJ_mol": float(energy.std()),
            "force_rms_kJ_mol_nm": float(np.sqrt((forces.astype(np.float64) ** 2).mean())),
            "platform": settings.get("platform"),
        }
        traj = aa.to_mdtraj()
        _, phi = mdtraj.compute_phi(traj)
        _, psi = mdtraj.compute_psi(traj)
    if phi.size:
        phi, psi = np.degrees(phi[:, 0]), np.degrees(psi[:, 0])
        basins = {
            "beta/PII (phi<0, psi>100 or psi<-150)": (phi < 0) & ((psi > 100) | (psi < -150)),
            "alpha_R (phi<0, -150<psi<100)": (phi < 0) & (psi > -150) & (psi <= 100),
            "alpha_L / C7ax (phi>0)": phi > 0,
        }
        summary["aa"]["basin_populations"] = {k: float(v.mean()) for k, v in basins.items()}
        fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=120)
        h = ax.hist2d(phi, psi, bins=60, range=[[-180, 180], [-180, 180]], cmap="viridis", cmin=1)
        fig.colorbar(h[3], ax=ax, label="frames")
        ax.set(xlabel="φ (deg)", ylabel="ψ (deg)", title="AA reference: φ/ψ")
        fig.tight_layout()
        fig.savefig(out / "ramachandran_aa.png")
        plt.close(fig)

    with CGDataset(cg_path) as cg:
        bonds = _bond_lengths(cg)
        cg_forces = cg.forces[:].astype(np.float64)
        summary["cg"] = {
            "file": str(cg_path),
            "frames": cg.n_frames,
            "beads": cg.n_atoms,
            "bead_names": [a.name for a in cg.topology.atoms()],
            "bond_length_mean_std_nm": {k: [float(v.mean()), float(v.std())] for k, v in bonds.items()},
            "force_rms_kJ_mol_nm": float(np.sqrt((cg_forces**2).mean())),
        }
    if bonds:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
        for name, d in bonds.items():
            ax.hist(d, bins=80, histtype="step", density=True, label=name)
        ax.set(xlabel="CG bond length (nm)", ylabel="density", title="Mapped CG bond lengths")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "cg_bonds.png")
        plt.close(fig)

    lines = ["# Dataset summary", "", "## AA reference", ""]
    lines += [f"- {k}: {v}" for k, v in summary["aa"].items() if k != "basin_populations"]
    for k, v in summary["aa"].get("basin_populations", {}).items():
        lines.append(f"- population {k}: {v:.3f}")
    lines += ["", "## CG (mapped)", ""]
    lines += [f"- {k}: {v}" for k, v in summary["cg"].items() if k != "bond_length_mean_std_nm"]
    for k, (m, s) in summary["cg"]["bond_length_mean_std_nm"].items():
        lines.append(f"- bond {k}: {m:.4f} ± {s:.4f} nm")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
