"""CG molecular dynamics in OpenMM with on-the-fly backmapping to an atomistic trajectory.

A plain script to copy. It needs an AA dataset and a CG potential, e.g. from ``examples/train_potential.py``:

    python examples/train_potential.py --out ala2_cg_model
    python examples/run_cg_with_backmapping.py --aa ala2_cg_model/ala2_aa.h5 \\
        --potential ala2_cg_model/potential.pt --ns 0.5 --out ala2_run

The temporally coherent backmapper is trained here on the AA dataset (lag 1 ps) unless --backmapper names a saved
one. The CG simulation is an ordinary ``openmm.app.Simulation``; the ``BackmapReporter`` turns its CG frames into an
AA trajectory (OUT/aa.dcd with its topology OUT/aa.pdb) while it runs, with OUT/current.pdb as a live view.
"""
import argparse
from pathlib import Path

import torch  # noqa: F401  (import torch before openmm)

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u

from openmm_backmap.backmap import BackmapperTrainer, TemporalBackmapper
from openmm_backmap.data import AADataset
from openmm_backmap.mapping import CGMapping
from openmm_backmap.potential import CGPotential, create_cg_system
from openmm_backmap.reporters import BackmapReporter, CGRunGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aa", type=Path, required=True, help="AA dataset (training data and starting structure)")
    parser.add_argument("--potential", type=Path, required=True, help="CG potential (CGPotential.save)")
    parser.add_argument("--backmapper", type=Path, help="saved backmapper (default: train one into OUT)")
    parser.add_argument("--epochs", type=int, default=30, help="backmapper training epochs (if trained here)")
    parser.add_argument("--hidden", type=int, default=256, help="backmapper layer width (if trained here)")
    parser.add_argument("--lag-ps", type=float, default=1.0, help="time between backmapped frames (ps)")
    parser.add_argument("--ns", type=float, default=0.5, help="CG simulation length (ns)")
    parser.add_argument("--out", type=Path, default=Path("ala2_run"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    timestep_ps = 0.004

    # 1. The backmapper: trained on AA frames lag_ps apart (the stride follows from the dataset's frame spacing).
    with AADataset(args.aa) as aa:
        spacing_ps = float(np.median(np.diff(aa.time[:100])))
        start = aa.positions[0].astype(np.float64)  # the AA structure the CG run starts from
        topology = aa.topology
    if args.backmapper is not None:
        backmapper = TemporalBackmapper.load(args.backmapper)
    else:
        mapping = CGMapping.from_preset(topology, "backbone-cb")
        trainer = BackmapperTrainer(mapping, args.aa, stride=max(1, round(args.lag_ps / spacing_ps)),
                                    architecture={"hidden": args.hidden}, max_epochs=args.epochs,
                                    log=args.out / "backmapper_training.csv", seed=args.seed)
        backmapper = trainer.fit()
        backmapper.save(args.out / "backmapper.pt")
    mapping = backmapper.mapping  # a saved backmapper carries its mapping (and the AA topology)

    # 2. The CG system: the potential as an OpenMM force on one particle per bead.
    potential = CGPotential.load(args.potential, mapping)
    system = create_cg_system(mapping, potential, backend="torch")
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, timestep_ps * u.picosecond)
    integrator.setRandomNumberSeed(args.seed + 1)  # OpenMM takes 0 to mean "a new random seed every run"
    cg_topology = mapping.to_openmm_topology()
    simulation = app.Simulation(cg_topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    beads = mapping.map_positions(start)
    simulation.context.setPositions(beads)
    simulation.context.setVelocitiesToTemperature(300 * u.kelvin, args.seed + 1)
    with open(args.out / "cg.pdb", "w") as handle:
        app.PDBFile.writeFile(cg_topology, beads * 10 * u.angstrom, handle)

    # 3. Reporters: CG trajectory and log as usual, plus the AA trajectory backmapped every lag_ps.
    interval = max(1, round(backmapper.lag_ps / timestep_ps))
    backmap_reporter = BackmapReporter(args.out / "aa.dcd", interval, backmapper, seed=args.seed,
                                       first_frame=start[backmapper.atom_indices], live_pdb=args.out / "current.pdb")
    simulation.reporters += [
        app.DCDReporter(str(args.out / "cg.dcd"), interval),
        app.StateDataReporter(str(args.out / "cg_log.csv"), interval, step=True, potentialEnergy=True,
                              temperature=True, speed=True),
        CGRunGuard(interval, last_good_file=args.out / "last_good.pdb"),
        backmap_reporter,
    ]
    n_steps = int(round(args.ns * 1000 / timestep_ps)) // interval * interval
    simulation.step(n_steps)
    backmap_reporter.close()
    print(f"{n_steps} CG steps; {n_steps // interval} AA frames every {interval * timestep_ps:g} ps "
          f"-> {args.out / 'aa.dcd'} (topology {args.out / 'aa.pdb'})")


if __name__ == "__main__":
    main()
