"""Densities of the CGenFF liquids (benzene, cumene, hexane) under NPT against experiment.

Each box from :func:`openmm_backmap.systems.liquid` (packed at the experimental density) is minimized
and run at 300 K and 1 bar (LangevinMiddleIntegrator, 2 fs, 1/ps friction, HBonds constraints,
MonteCarloBarostat every 25 steps) on the CPU platform.  The density is sampled every 0.5 ps and
averaged over the second half of the run; the error is the standard error of 5 block averages.

Defaults (200 molecules, 60 ps) keep the whole benchmark at about 15 minutes on 2 cores.  The boxes
start at the experimental density, so only a small volume relaxation is needed: the MC barostat
settles within a few ps, and the 30 ps second half holds about 60 samples whose block averages
give a standard error of a few 1e-3 g/cm3 at this size (instantaneous fluctuations are about 1 %).

    python benchmarks/bench_liquid_density.py [--n-molecules 200] [--ps 60] [--only BENZ HEXA] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import openmm
from openmm import unit
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _common import save  # noqa: E402

from openmm_backmap import systems  # noqa: E402

LIQUIDS = {"BENZ": "benzene", "CUME": "cumene", "HEXA": "hexane"}
TEMPERATURE_K = 300.0
PRESSURE_BAR = 1.0
TIMESTEP_PS = 0.002
SAMPLE_EVERY = 250  # steps (0.5 ps; --quick: 50)
N_BLOCKS = 5
SYSTEM_KEYS = ("forcefield", "nonbonded_method", "cutoff_nm", "switch_nm", "dispersion_correction",
               "lennard_jones_force", "box_nm", "tolerance_nm")


def run(resname: str, n_molecules: int, length_ps: float, seed: int, sample_every: int = SAMPLE_EVERY) -> dict:
    """Equilibrate one liquid under NPT and return its density statistics (g/cm3)."""
    built = systems.liquid(resname, n_molecules, seed=seed)
    system = built.system
    barostat = openmm.MonteCarloBarostat(PRESSURE_BAR * unit.bar, TEMPERATURE_K * unit.kelvin, 25)
    barostat.setRandomNumberSeed(seed + 1)
    system.addForce(barostat)
    minimized = built.minimized(max_iterations=1000, platform="CPU")
    integrator = openmm.LangevinMiddleIntegrator(
        TEMPERATURE_K * unit.kelvin, 1 / unit.picosecond, TIMESTEP_PS * unit.picosecond
    )
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(minimized.positions)
    context.setVelocitiesToTemperature(TEMPERATURE_K * unit.kelvin, seed + 1)

    mass_g = sum(system.getParticleMass(i).value_in_unit(unit.dalton)
                 for i in range(system.getNumParticles())) / 6.02214076e23
    n_samples = int(round(length_ps / TIMESTEP_PS / sample_every))
    times, densities = [], []
    start = time.perf_counter()
    progress = tqdm(total=n_samples * sample_every * TIMESTEP_PS, desc=f"{LIQUIDS.get(resname, resname)} NPT",
                    unit="ps", bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} ps [{elapsed}<{remaining}{postfix}]")
    for k in range(1, n_samples + 1):
        integrator.step(sample_every)
        volume_nm3 = context.getState().getPeriodicBoxVolume().value_in_unit(unit.nanometer**3)
        times.append(k * sample_every * TIMESTEP_PS)
        densities.append(mass_g / (volume_nm3 * 1e-21))
        progress.update(sample_every * TIMESTEP_PS)
        progress.set_postfix_str(f"{densities[-1]:.3f} g/cm3")
    progress.close()
    wall = time.perf_counter() - start

    production = np.array(densities[len(densities) // 2:])
    blocks = np.array([b.mean() for b in np.array_split(production, N_BLOCKS)])
    mean = float(production.mean())
    experiment = systems.LIQUID_DENSITIES[resname]
    return {
        "resname": resname,
        "molecule": LIQUIDS.get(resname, resname),
        "n_molecules": n_molecules,
        "n_atoms": system.getNumParticles(),
        "length_ps": length_ps,
        "density_mean_g_cm3": mean,
        "density_sem_g_cm3": float(blocks.std(ddof=1) / np.sqrt(N_BLOCKS)),
        "density_std_g_cm3": float(production.std(ddof=1)),
        "experiment_g_cm3": experiment,
        "deviation_percent": 100 * (mean / experiment - 1),
        "steps_per_s": n_samples * sample_every / wall,
        "sample_every_ps": sample_every * TIMESTEP_PS,
        "system": {k: v for k, v in built.metadata.items() if k in SYSTEM_KEYS},
        "time_ps": times,
        "density_g_cm3": densities,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-molecules", type=int, default=200, help="molecules per box (default 200)")
    parser.add_argument("--ps", type=float, default=60.0, help="NPT length per liquid in ps (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=list(LIQUIDS), help="residue names to run (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 molecules per box (the fewest that pack at seed 0 with the box over "
                             "twice the cutoff), 2 ps per liquid, density sampled every 0.1 ps")
    args = parser.parse_args()
    sample_every = 50 if args.quick else SAMPLE_EVERY
    if args.quick:
        args.n_molecules, args.ps = 100, 2.0
    if args.n_molecules < 1 or args.ps < 2 * sample_every * TIMESTEP_PS * N_BLOCKS:
        parser.error("need --n-molecules >= 1 and --ps long enough for 5 blocks of samples in the second half")

    rows = []
    for resname in args.only or LIQUIDS:
        row = run(resname, args.n_molecules, args.ps, args.seed, sample_every)
        rows.append(row)
        print(f"{row['molecule']}: {row['density_mean_g_cm3']:.4f} ± {row['density_sem_g_cm3']:.4f} g/cm3 "
              f"(experiment {row['experiment_g_cm3']}, {row['deviation_percent']:+.1f} %), "
              f"{row['steps_per_s']:.0f} steps/s", flush=True)

    settings = {
        "temperature_K": TEMPERATURE_K, "pressure_bar": PRESSURE_BAR, "timestep_ps": TIMESTEP_PS,
        "friction_per_ps": 1.0, "barostat": "MonteCarloBarostat every 25 steps", "constraints": "HBonds",
        "platform": "CPU", "n_molecules": args.n_molecules, "length_ps": args.ps, "seed": args.seed,
        "sample_every_ps": sample_every * TIMESTEP_PS, "average": "second half, SEM from 5 blocks",
        "processor": platform.processor(), "cpu_count": os.cpu_count(), "openmm": openmm.__version__,
        "quick": args.quick,
    }
    md = ["| liquid | molecules | atoms | ps | density (g/cm³) | experiment (g/cm³) | deviation | steps/s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['molecule']} ({r['resname']}) | {r['n_molecules']} | {r['n_atoms']} | {r['length_ps']:g} | "
                  f"{r['density_mean_g_cm3']:.4f} ± {r['density_sem_g_cm3']:.4f} | {r['experiment_g_cm3']} | "
                  f"{r['deviation_percent']:+.1f} % | {r['steps_per_s']:.0f} |")
    md.append(
        f"\nCHARMM36/CGenFF (`charmm36.xml`), PME, LJ cutoff {rows[0]['system']['cutoff_nm']} nm switched from "
        f"{rows[0]['system']['switch_nm']} nm, long-range dispersion correction; {TEMPERATURE_K:g} K, "
        f"{PRESSURE_BAR:g} bar, LangevinMiddleIntegrator 2 fs, HBonds, MonteCarloBarostat, CPU platform. Mean over "
        "the second half of each run ± standard error of 5 blocks. Experiment: CRC Handbook, 25 °C (the runs are "
        "at 27 °C, about 0.2 % less dense). The machine is shared, so steps/s are indicative only.\n"
    )
    save("liquid_density", {"settings": settings, "liquids": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
