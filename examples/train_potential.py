"""Train a force-matched CG potential and run it in OpenMM.

A plain script to copy: alanine dipeptide AA reference data (amber14 + OBC2, frames with forces every 0.2 ps;
generated here unless --aa points at an existing file from ``openmm-backmap simulate``), the 6-bead backbone-cb
map, force matching of priors + SchNet, and a short CG Langevin run with the potential as an OpenMM force.

    python examples/train_potential.py --aa-ns 2 --epochs 20 --out ala2_cg_model

Writes OUT/potential.pt (load it with ``CGPotential.load``), OUT/training.csv and, if it made them, the datasets
OUT/ala2_aa.h5 and OUT/ala2_cg.h5.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch  # noqa: F401  (import torch before openmm)

import openmm
import openmm.app as app
import openmm.unit as u

from openmm_backmap import systems
from openmm_backmap.data import AADataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system
from openmm_backmap.reporters import CGRunGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aa", type=Path, help="existing AA dataset (default: simulate one into OUT)")
    parser.add_argument("--aa-ns", type=float, default=2.0, help="length of the AA run made here (ns)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=64, help="SchNet feature size")
    parser.add_argument("--cg-steps", type=int, default=25_000, help="CG MD steps of 4 fs after training")
    parser.add_argument("--out", type=Path, default=Path("ala2_cg_model"), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small models: one thread is fastest, and robust on busy machines

    # 1. AA reference data with forces (re-running continues an interrupted run).
    aa_path = args.aa
    if aa_path is None:
        ala2 = systems.alanine_dipeptide("obc2")
        aa_path = simulate_reference(args.out / "ala2_aa.h5", ala2.topology, ala2.system, ala2.positions,
                                     n_steps=int(args.aa_ns * 500_000) // 100 * 100, report_interval=100,
                                     equilibration_steps=5_000, seed=args.seed, append=True)

    # 2. The CG map and the mapped dataset (positions and constraint-aware forces).
    with AADataset(aa_path) as aa:
        mapping = CGMapping.from_preset(aa.topology, "backbone-cb")
        cg_path = map_dataset(aa, mapping, args.out / "ala2_cg.h5", overwrite=True)

    # 3. Force matching: priors by Boltzmann inversion, then SchNet on the force residual.
    trainer = ForceMatchingTrainer(mapping, cg_path, network={"hidden": args.hidden}, max_epochs=args.epochs,
                                   log=args.out / "training.csv", seed=args.seed)
    potential = trainer.fit()
    potential.save(args.out / "potential.pt")
    meta = potential.metadata
    print(f"validation force MSE {meta['val_force_mse']:.4g} (priors only {meta['priors_only_val_force_mse']:.4g}) "
          "(kJ/mol/nm)^2")

    # 4. The potential in OpenMM: a CG System whose only force is the TorchForce (or backend="python").
    potential = CGPotential.load(args.out / "potential.pt", mapping)
    system = create_cg_system(mapping, potential, backend="torch")
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 4 * u.femtosecond)
    integrator.setRandomNumberSeed(args.seed + 1)  # OpenMM takes 0 to mean "a new random seed every run"
    simulation = app.Simulation(mapping.to_openmm_topology(), system, integrator,
                                openmm.Platform.getPlatformByName("Reference"))
    with AADataset(aa_path) as aa:
        simulation.context.setPositions(mapping.map_positions(aa.positions[0].astype(np.float64)))
    simulation.context.setVelocitiesToTemperature(300 * u.kelvin, args.seed + 1)
    simulation.reporters.append(CGRunGuard(500))  # stops with a clear error if the run blows up
    t0 = time.perf_counter()
    simulation.step(args.cg_steps)
    seconds = time.perf_counter() - t0
    state = simulation.context.getState(getEnergy=True)
    print(f"CG MD: {args.cg_steps} steps in {seconds:.1f} s ({args.cg_steps / seconds:.0f} steps/s), final potential "
          f"energy {state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole):.1f} kJ/mol")
    print(f"potential -> {args.out / 'potential.pt'}")


if __name__ == "__main__":
    main()
