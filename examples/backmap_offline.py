"""Backmap a CG trajectory file offline and check the atomistic result.

A plain script to copy. Input: a CG trajectory (``cg.dcd`` with its ``cg.pdb``, or a CG dataset ``.h5`` from
``openmm-backmap map``) and a saved backmapper; optionally the AA reference dataset for the checks.

    python examples/backmap_offline.py --cg ala2_run/cg.dcd --backmapper ala2_run/backmapper.pt \\
        --reference ala2_cg_model/ala2_aa.h5 --out ala2_offline

Writes OUT/aa.dcd (+ OUT/aa.pdb) with the temporal model and OUT/aa_library.dcd with the library lookup (every frame
the closest training frame, the simplest baseline), and prints bond and clash scores of both.
"""
import argparse
from pathlib import Path

import torch  # noqa: F401  (import torch before openmm)

import mdtraj as md
import numpy as np

from openmm_backmap import metrics
from openmm_backmap.backmap import TemporalBackmapper, backmap
from openmm_backmap.data import AADataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cg", type=Path, required=True,
                        help="CG trajectory (.dcd/.xtc with a .pdb next to it, or .h5)")
    parser.add_argument("--topology", type=Path, help="CG topology PDB (default: the .pdb next to --cg)")
    parser.add_argument("--backmapper", type=Path, required=True, help="saved backmapper")
    parser.add_argument("--reference", type=Path, help="AA reference dataset for the bond lengths")
    parser.add_argument("--stride", type=int, default=1, help="backmap every n-th CG frame")
    parser.add_argument("--out", type=Path, default=Path("ala2_offline"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    backmapper = TemporalBackmapper.load(args.backmapper)
    topology = args.topology
    if topology is None and args.cg.suffix in (".dcd", ".xtc"):
        topology = args.cg.with_suffix(".pdb")

    # Two backmappings of the same CG frames: the temporal model and the library lookup.
    outputs = {}
    for name, mode in (("aa", "model"), ("aa_library", "library")):
        outputs[name] = backmap(args.cg, backmapper, args.out / f"{name}.dcd", topology=topology, seed=args.seed,
                                mode=mode, stride=args.stride)

    # Checks: bonds within 10 % of their reference length, heavy-atom clashes.
    top = backmapper.mdtraj_topology
    bonds = np.array([[a.index, b.index] for a, b in top.bonds])
    if args.reference is not None:
        with AADataset(args.reference) as ref:
            step = max(1, ref.n_frames // 2000)
            ref_xyz = ref.positions[::step].astype(np.float64)[:, backmapper.atom_indices]
    else:
        ref_xyz = None
    for name, path in outputs.items():
        traj = md.load(str(path), top=str(path.with_suffix(".pdb")))
        reference = ref_xyz if ref_xyz is not None else traj.xyz
        lengths = metrics.bond_reference_lengths(reference, bonds)
        bond, clash = metrics.bond_score(traj.xyz, bonds, lengths), metrics.clash_score(traj.xyz, top)
        print(f"{path.name}: {traj.n_frames} frames of {traj.n_atoms} atoms; bond score {bond:.3f}, "
              f"clash score {clash:.3f}")


if __name__ == "__main__":
    main()
