"""Spread of the CG alanine-dipeptide metrics between CG runs: the trained potentials of ``bench_cg_alanine`` run
again with other starting frames and another Langevin seed.

``bench_cg_alanine`` runs every potential once (8 replicas from frames picked with seed 0, integrator seed 2). This
script reruns chosen potentials from its work folder with ``--seed`` (starting frames and integrator seed), 8
replicas × 250 000 steps at 4 fs, and reports the FES JSD and the largest dihedral JSD of all replicas and of each
half of them, so the spread of the metrics between CG runs of one potential is measured, not guessed:

    python benchmarks/bench_cg_alanine_reseed.py --seed 3 --potentials 100ns_optimized_500kframes 100ns_optimized
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save  # noqa: E402
from bench_cg_alanine import PHI, PSI, WORK, cg_geometry, run_cg  # noqa: E402

from openmm_backmap import metrics, systems  # noqa: E402
from openmm_backmap.data import CGDataset  # noqa: E402
from openmm_backmap.mapping import CGMapping  # noqa: E402
from openmm_backmap.potential import CGPotential  # noqa: E402


def scores(xyz: np.ndarray, ref_geo: dict, phi_ref: np.ndarray, psi_ref: np.ndarray, bonds: np.ndarray) -> dict:
    geo, _, _ = cg_geometry(xyz, bonds)
    phi, psi = metrics.dihedrals(xyz, [PHI])[:, 0], metrics.dihedrals(xyz, [PSI])[:, 0]
    return {"fes_jsd": float(metrics.fes_jsd(phi_ref, psi_ref, phi, psi)),
            "max_dihedral_jsd": float(max(metrics.histogram_jsd(ref_geo["dihedral"][:, k], geo["dihedral"][:, k],
                                                                bins=72, range=(-np.pi, np.pi))
                                          for k in range(geo["dihedral"].shape[1])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=3, help="seed of the starting frames; the integrator gets seed+10")
    parser.add_argument("--potentials", nargs="+", default=["100ns_optimized_500kframes", "100ns_optimized"],
                        help="potential_<NAME>.pt files of bench_cg_alanine's work folder")
    parser.add_argument("--data", default="cg_100ns_optimized.h5", help="mapped reference in the work folder")
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 replicas × 2000 steps")
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.steps = 2, 2000
    torch.set_num_threads(1)
    ts = systems.alanine_dipeptide("obc2")
    data = args.work / args.data
    if not data.exists():
        message = f"{data} is missing: run benchmarks/bench_cg_alanine.py first"
        if args.quick:  # a smoke run of all benchmarks on a fresh clone: nothing trained to rerun
            print(message)
            return
        raise SystemExit(message)
    with CGDataset(data) as cg:
        ref = cg.positions[:].astype(np.float64)
        mapping = CGMapping.from_yaml(cg.text("mapping"), ts.topology)
    bonds = np.array([[b[0].index, b[1].index] for b in mapping.cg_topology.bonds])
    ref_geo, _, _ = cg_geometry(ref, bonds)
    phi_ref, psi_ref = metrics.dihedrals(ref, [PHI])[:, 0], metrics.dihedrals(ref, [PSI])[:, 0]
    results = {}
    for name in args.potentials:
        potential = CGPotential.load(args.work / f"potential_{name}.pt", mapping=mapping)
        rng = np.random.default_rng(args.seed)
        starts = [ref[i] for i in rng.choice(len(ref), size=args.replicas, replace=False)]
        frames, info = run_cg(mapping, potential.float(), starts, args.steps, 4.0, 250, seed=args.seed + 10)
        half = args.replicas // 2
        row = {"blow_up": info["blow_up"], "steps_per_s": info["steps_per_s"],
               "all": scores(frames.reshape(-1, 6, 3), ref_geo, phi_ref, psi_ref, bonds),
               "first_half": scores(frames[:, :half].reshape(-1, 6, 3), ref_geo, phi_ref, psi_ref, bonds),
               "second_half": scores(frames[:, half:].reshape(-1, 6, 3), ref_geo, phi_ref, psi_ref, bonds)}
        results[name] = row
        print(name, row, flush=True)
    lines = [f"Potentials of `bench_cg_alanine` rerun with starting-frame seed {args.seed} and integrator seed "
             f"{args.seed + 10} (the recorded `cg_alanine` run used 0 and 2): {args.replicas} replicas × {args.steps} "
             "steps at 4 fs, 300 K. FES JSD / largest dihedral JSD against the mapped AA reference (targets ≤ 0.05 / "
             "≤ 0.02), for all replicas and for each half of them.", "",
             "| potential | all replicas | first half | second half | blow-ups |", "|---|---|---|---|---|"]
    for name, r in results.items():
        cells = " | ".join(f"{r[k]['fes_jsd']:.3f} / {r[k]['max_dihedral_jsd']:.3f}"
                           for k in ("all", "first_half", "second_half"))
        lines.append(f"| {name} | {cells} | {0 if r['blow_up'] is None else 1} |")
    save("cg_alanine_reseed", {"settings": vars(args) | {"work": str(args.work)}, "results": results},
         "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
