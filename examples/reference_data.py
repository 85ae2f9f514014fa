"""Generate AA reference data with forces and map it to a CG model.

A plain script to copy: alanine dipeptide in OBC2 implicit solvent (amber14/ff14SB), Langevin dynamics
at 300 K, a frame with positions, forces and energies every 0.2 ps, then the 6-bead backbone-cb map
(seed 003, §8.2.1) with constraint-aware force aggregation.

    python examples/reference_data.py --ns 1 --out ala2_data
"""
import argparse
from pathlib import Path

import numpy as np

from openmm_backmap import systems
from openmm_backmap.data import AADataset, CGDataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=float, default=1.0, help="production length (ns)")
    parser.add_argument("--out", type=Path, default=Path("ala2_data"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # 1. The AA system, built from the sequence with OpenMM's own force field files.
    ala2 = systems.alanine_dipeptide("obc2")

    # 2. Reference MD: 2 fs steps, a frame every 100 steps; re-running continues an interrupted run.
    n_steps = int(args.ns * 500_000) // 100 * 100
    aa_path = simulate_reference(args.out / "ala2_aa.h5", ala2.topology, ala2.system, ala2.positions,
                                 n_steps=n_steps, report_interval=100, temperature_K=300.0,
                                 equilibration_steps=5_000, seed=args.seed, append=True)

    # 3. Map to CG: positions by the 6 single-atom beads, forces with hydrogens aggregated to their heavy atoms.
    with AADataset(aa_path) as aa:
        mapping = CGMapping.from_preset(aa.topology, "backbone-cb").with_constraints(aa.system)
        mapping.save(args.out / "backbone-cb.yaml")
        cg_path = map_dataset(aa, mapping, args.out / "ala2_cg.h5", overwrite=True)
        train, val, test = aa.split((0.8, 0.1, 0.1), n_blocks=10, seed=args.seed)
        print(f"AA: {aa.n_frames} frames of {aa.n_atoms} atoms; split {len(train)}/{len(val)}/{len(test)} frames")

    with CGDataset(cg_path) as cg:
        forces = cg.forces[:]
        print(f"CG: {cg.n_atoms} beads {mapping.bead_names}; mean |F_bead| = "
              f"{np.linalg.norm(forces, axis=-1).mean():.1f} kJ/mol/nm")


if __name__ == "__main__":
    main()
