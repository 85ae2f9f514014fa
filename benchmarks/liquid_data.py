"""AA reference data of the CGenFF liquids: benzene, hexane and cumene at 300 K (issue 6).

Each box from :func:`openmm_backmap.systems.liquid` (CHARMM36/CGenFF, PME, HBonds constraints, packed at
the experimental density) is minimized, equilibrated under NPT at 1 bar (MonteCarloBarostat every 25
steps) and then run NVT in the mean equilibrated box, storing positions, forces and velocities
(:func:`openmm_backmap.data.simulate_reference` with ``pressure_bar``).  LangevinMiddleIntegrator,
300 K, 2 fs, 1/ps friction, CPU platform.

=======  ==========  =========  ==========  =============  ===============================
liquid   molecules   NPT (ps)   NVT (ps)    frame (ps)     output
=======  ==========  =========  ==========  =============  ===============================
BENZ     300         40         100         0.1            work_liquids/aa_benzene.h5
HEXA     200         40         60          0.2            work_liquids/aa_hexane.h5
CUME     200         40         60          0.2            work_liquids/aa_cumene.h5
=======  ==========  =========  ==========  =============  ===============================

Re-running continues an interrupted run (``append=True``): a file whose production was cut short is
finished from its last frame; a crash during the equilibration (no file yet) restarts the liquid.

    OMP_NUM_THREADS=1 OPENMM_CPU_THREADS=1 python benchmarks/liquid_data.py --all
    python benchmarks/liquid_data.py --only BENZ
    python benchmarks/liquid_data.py --quick          # a tiny smoke test in work_liquids/quick/
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from openmm_backmap import systems
from openmm_backmap.data import AADataset, simulate_reference

RESULTS = Path(__file__).parent / "results" / "work_liquids"
TEMPERATURE_K = 300.0
PRESSURE_BAR = 1.0
TIMESTEP_PS = 0.002
FRICTION_PER_PS = 1.0

# resname: (file stem, molecules, NPT ps, NVT ps, frame spacing ps)
LIQUIDS = {
    "BENZ": ("aa_benzene", 300, 40.0, 100.0, 0.1),
    "HEXA": ("aa_hexane", 200, 40.0, 60.0, 0.2),
    "CUME": ("aa_cumene", 200, 40.0, 60.0, 0.2),
}
ORDER = ("BENZ", "HEXA", "CUME")


def _steps(ps: float) -> int:
    return int(round(ps / TIMESTEP_PS))


def generate(
    resname: str,
    n_molecules: int,
    out_path: str | os.PathLike,
    *,
    equilibration_ps: float = 40.0,
    production_ps: float = 100.0,
    frame_ps: float = 0.1,
    seed: int = 0,
    platform: str = "CPU",
    progress: bool = True,
) -> dict:
    """Equilibrate one liquid under NPT and store an NVT production run with forces in ``out_path``.

    Resumes an existing ``out_path`` (same settings) instead of starting over.  Returns a summary with the
    wall time and steps per second of this call.
    """
    out_path = Path(out_path)
    report_interval = _steps(frame_ps)
    n_steps = _steps(production_ps)
    n_steps -= n_steps % report_interval
    equilibration_steps = _steps(equilibration_ps)
    frames_before = 0
    if out_path.exists():
        try:
            with AADataset(out_path) as ds:
                frames_before = ds.n_frames
        except Exception as exc:  # unreadable leftovers: start over
            print(f"{out_path}: cannot be read ({exc}); starting over", flush=True)
            out_path.unlink()
    fresh = frames_before == 0

    t0 = time.perf_counter()
    built = systems.liquid(resname, n_molecules, seed=seed)
    t_build = time.perf_counter() - t0
    print(f"{resname}: {n_molecules} molecules, {built.system.getNumParticles()} atoms; "
          f"{'fresh run' if fresh else f'resuming after {frames_before} frames'}; "
          f"NPT {equilibration_ps:g} ps, NVT {production_ps:g} ps, frame every {frame_ps:g} ps -> {out_path}",
          flush=True)
    t1 = time.perf_counter()
    simulate_reference(
        out_path, built.topology, built.system, built.positions,
        n_steps=n_steps, report_interval=report_interval, temperature_K=TEMPERATURE_K,
        timestep_ps=TIMESTEP_PS, friction_per_ps=FRICTION_PER_PS, equilibration_steps=equilibration_steps,
        pressure_bar=PRESSURE_BAR, barostat_interval=25, append=True, seed=seed, platform=platform,
        dtype="float32", progress=progress,
        settings={"system": built.name, **built.metadata, "script": "benchmarks/liquid_data.py"},
    )
    wall = time.perf_counter() - t1
    with AADataset(out_path) as ds:
        frames_after = ds.n_frames
        settings = ds.settings
    steps = (frames_after - frames_before) * report_interval + (equilibration_steps if fresh else 0)
    summary = {
        "resname": resname, "n_molecules": n_molecules, "n_atoms": built.system.getNumParticles(),
        "out": str(out_path), "frames": frames_after, "steps_run": steps, "build_s": round(t_build, 1),
        "wall_s": round(wall, 1), "steps_per_s": round(steps / wall, 1) if wall > 0 else None,
        "npt_density_g_cm3": settings.get("npt_density_g_cm3"),
        "production_density_g_cm3": settings.get("production_density_g_cm3"),
    }
    print(f"{resname}: done, {frames_after} frames; {steps} steps in {wall:.0f} s = "
          f"{summary['steps_per_s']} steps/s (incl. minimization and set-up); NPT density "
          f"{summary['npt_density_g_cm3']} g/cm3", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="benzene, hexane, cumene in turn (default)")
    parser.add_argument("--only", nargs="+", choices=ORDER, help="only these liquids")
    parser.add_argument("--quick", action="store_true", help="tiny smoke test (64 molecules, 0.2+0.2 ps)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {RESULTS})")
    parser.add_argument("--platform", default="CPU", help="OpenMM platform (default: CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    names = args.only or ORDER
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    if args.quick and args.out is None and out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} "
          f"OPENMM_CPU_THREADS={os.environ.get('OPENMM_CPU_THREADS')}", flush=True)
    for name in names:
        stem, n_molecules, eq_ps, prod_ps, frame_ps = LIQUIDS[name]
        if args.quick:
            n_molecules, eq_ps, prod_ps, frame_ps = 64, 0.2, 0.2, 0.02
        generate(name, n_molecules, out_dir / f"{stem}.h5", equilibration_ps=eq_ps, production_ps=prod_ps,
                 frame_ps=frame_ps, platform=args.platform, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
