"""Liquid benzene end to end: AA data -> CG potential -> backmapper -> CG run in OpenMM backmapped on the fly.

A plain script to copy for a molecular liquid (seed 004's test system). Every step uses the public API:

1. a box of CGenFF benzene (``charmm36.xml``, PME) built by our own code, NPT-equilibrated at 300 K and 1 bar,
   then an NVT production run that stores positions and forces;
2. the 3-bead map of seed 004 (two carbons and their hydrogens per bead; ``--map 1-bead`` for one bead per
   molecule), and a CG potential (Boltzmann-inverted priors + SchNet with periodic neighbours) fitted by force
   matching with the energy term of seed 004 eq. 6, which that paper needed for stable liquid runs;
3. the temporally coherent backmapper, conditioned on each molecule's local environment (beads and previous atoms of
   the neighbours within 0.6 nm, across periodic images) and on the previous AA frame;
4. CG Langevin dynamics with the TorchForce, the BackmapReporter writing the AA trajectory with its box (DCD +
   PDB) next to the usual StateDataReporter, and a quick check of the result: CG centre-of-mass g(r) against the
   AA reference and the intermolecular clash score of the backmapped frames. ``--relax 200`` minimises every
   backmapped frame with the AA force field (beads held), which removes the hydrogen overlaps between neighbours
   at a cost of seconds per frame (docs/backmapping.md).

    python examples/benzene_liquid.py --out benzene_run                 # 300 molecules, about an hour on 2 cores
    python examples/benzene_liquid.py --molecules 60 --aa-ps 20 --out b  # a few minutes
"""
import argparse
from pathlib import Path

import torch  # noqa: F401  (import torch before openmm)

import mdtraj as md
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u

from openmm_backmap import metrics, systems
from openmm_backmap.backmap import BackmapperTrainer, Relaxer
from openmm_backmap.data import AADataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset
from openmm_backmap.potential import ForceMatchingTrainer, create_cg_system
from openmm_backmap.reporters import BackmapReporter, CGRunGuard

PRESETS = {"3-bead": "benzene-3bead", "1-bead": "molecule"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--molecules", type=int, default=300, help="benzene molecules in the box")
    parser.add_argument("--cutoff-nm", type=float, default=1.0, help="AA nonbonded cutoff (nm); box >= 2 cutoffs")
    parser.add_argument("--npt-ps", type=float, default=40.0, help="NPT equilibration (ps)")
    parser.add_argument("--aa-ps", type=float, default=100.0, help="NVT production with forces (ps)")
    parser.add_argument("--map", choices=sorted(PRESETS), default="3-bead")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs of both models")
    parser.add_argument("--cg-ps", type=float, default=100.0, help="CG simulation length (ps)")
    parser.add_argument("--out", type=Path, default=Path("benzene_run"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relax", type=int, default=0, metavar="ITERATIONS",
                        help="minimise every backmapped frame with the AA System for at most this many iterations "
                             "(default: 0, off)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    # 1. AA reference data: NPT equilibration, then NVT production storing forces every 0.1 ps.
    box = systems.liquid("BENZ", args.molecules, seed=args.seed, cutoff_nm=args.cutoff_nm,
                         switch_nm=args.cutoff_nm - 0.1)
    aa_path = simulate_reference(args.out / "aa.h5", box.topology, box.system, box.positions,
                                 n_steps=int(args.aa_ps / 0.002) // 50 * 50, report_interval=50,
                                 equilibration_steps=int(args.npt_ps / 0.002), pressure_bar=1.0,
                                 platform="CPU", seed=args.seed, append=True)
    with AADataset(aa_path) as aa:
        n_frames = aa.n_frames
        density = aa.settings.get("production_density_g_cm3")
        last = aa.positions[-1].astype(np.float64)
        aa_box = aa.box_vectors[-1].astype(np.float64)
    print(f"AA data: {n_frames} frames -> {aa_path} (NPT density {density} g/cm3)")

    # 2. Mapping and CG potential (force matching + energy term), trained on the first 80 % of the frames.
    mapping = CGMapping.from_preset(box.topology, PRESETS[args.map])
    cg_path = map_dataset(aa_path, mapping, args.out / "cg.h5", overwrite=True)
    potential = ForceMatchingTrainer(mapping, cg_path, energy_weight=0.1, max_epochs=args.epochs, batch_size=8,
                                     max_frames=int(0.8 * n_frames), log=args.out / "potential_training.csv",
                                     seed=args.seed).fit()
    potential.save(args.out / "potential.pt")

    # 3. Backmapper: local environment + previous frame, lag = the frame spacing (0.1 ps). The AA energy term of
    #    the loss is left out: AAEnergy has no PME, and intramolecular geometry is held by the distance terms.
    backmapper = BackmapperTrainer(mapping, aa_path, energy=None, max_frames=int(0.8 * n_frames), batch_size=4,
                                   architecture={"environment_cutoff_nm": 0.6}, max_epochs=args.epochs,
                                   library_size=500, log=args.out / "backmapper_training.csv", seed=args.seed).fit()
    backmapper.save(args.out / "backmapper.pt")

    # 4. CG run in OpenMM, backmapped on the fly.
    timestep_ps = 0.004
    system = create_cg_system(mapping, potential, backend="torch", box_vectors_nm=aa_box)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, timestep_ps * u.picosecond)
    integrator.setRandomNumberSeed(args.seed + 1)  # OpenMM takes 0 to mean "a new random seed every run"
    cg_top = mapping.to_openmm_topology()
    cg_top.setPeriodicBoxVectors(aa_box * u.nanometer)
    simulation = app.Simulation(cg_top, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPeriodicBoxVectors(*aa_box)
    simulation.context.setPositions(mapping.map_positions(mapping.make_molecules_whole(last[None], aa_box[None]))[0])
    simulation.context.setVelocitiesToTemperature(300 * u.kelvin, args.seed + 1)
    interval = max(1, round(backmapper.lag_ps / timestep_ps))
    simulation.reporters += [
        BackmapReporter(args.out / "aa_run.dcd", interval, backmapper, seed=args.seed,
                        first_frame=last[backmapper.atom_indices],
                        relax=Relaxer(box.system, mapping, max_iterations=args.relax) if args.relax else None),
        app.StateDataReporter(str(args.out / "cg_log.csv"), interval * 10, step=True, time=True,
                              potentialEnergy=True, temperature=True),
        CGRunGuard(interval * 10, max_temperature_K=900.0, last_good_file=args.out / "last_good.pdb"),
    ]
    simulation.step(int(args.cg_ps / timestep_ps) // interval * interval)
    for reporter in simulation.reporters:
        if hasattr(reporter, "close"):
            reporter.close()

    # 5. A first look: intermolecular clashes in the backmapped run and the molecules' COM g(r), CG vs AA.
    run = md.load(str(args.out / "aa_run.dcd"), top=str(args.out / "aa_run.pdb"))
    clash = metrics.clash_score(run.xyz, run.topology, groups="residue", scope="inter",
                                box_vectors_nm=run.unitcell_vectors)
    with AADataset(aa_path) as aa:
        ref = aa.to_mdtraj(slice(int(0.8 * n_frames), n_frames))
    r, g_ref = _com_rdf(ref)
    _, g_run = _com_rdf(run)
    print(f"backmapped {run.n_frames} frames -> {args.out / 'aa_run.dcd'}; intermolecular clash score {clash:.4f}")
    # hydrogens count here (not in the clash score): molecules whose LJ energy exceeds every one in the AA data
    every = max(1, run.n_frames // 20)
    lj_ref = metrics.molecule_lj_energies(ref.xyz[::every], box.system, ref.topology, ref.unitcell_vectors[::every])
    lj_run = metrics.molecule_lj_energies(run.xyz[::every], box.system, run.topology, run.unitcell_vectors[::every])
    print(f"molecules with an LJ energy above the AA maximum: {(lj_run > lj_ref.max()).mean():.1%}"
          f"{' (frames relaxed)' if args.relax else ' (try --relax 200)'}")
    print(f"COM g(r) L1 distance, backmapped CG run vs AA: {metrics.rdf_l1_nm(r, g_ref, g_run):.3f} nm")


def _com_rdf(traj: md.Trajectory):
    """Centre-of-mass g(r) of the molecules of an mdtraj trajectory (molecules made whole by mdtraj)."""
    traj = traj.make_molecules_whole(inplace=False)
    com = np.stack([md.compute_center_of_mass(traj, select=f"resid {r.index}") for r in traj.topology.residues],
                   axis=1)
    idx = np.arange(com.shape[1])
    r_max = min(1.2, 0.49 * float(traj.unitcell_lengths.min()))  # minimum image: at most half the box
    return metrics.radial_distribution(com, traj.unitcell_vectors, idx, idx, r_max_nm=r_max, n_bins=60)


if __name__ == "__main__":
    main()
