"""Cost of storing positions + forces + velocities every 100 steps, against the same run without a reporter.

Target (issue 2): <= 10 % overhead.  The two variants are run interleaved (A B A B ...) in one process
and the ratio is taken from the medians, so machine noise affects both alike.

    python benchmarks/bench_data_writer.py [--repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openmm
import openmm.app as app
import openmm.unit as u

sys.path.insert(0, str(Path(__file__).parent))
from _common import save  # noqa: E402

from openmm_backmap import systems  # noqa: E402
from openmm_backmap.data import AADataReporter  # noqa: E402
from openmm_backmap.platforms import choose_platform  # noqa: E402


def _simulation(test_system):
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.002 * u.picosecond)
    integrator.setRandomNumberSeed(1)
    sim = app.Simulation(test_system.topology, test_system.system, integrator, choose_platform(test_system.system))
    box = test_system.topology.getPeriodicBoxVectors()
    if box is not None:
        sim.context.setPeriodicBoxVectors(*box)
    sim.context.setPositions(test_system.positions)
    sim.minimizeEnergy(maxIterations=200)
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    return sim


def measure(test_system, n_steps: int, interval: int, repeats: int, tmp: Path) -> dict:
    sim = _simulation(test_system)
    sim.step(min(n_steps, 2000))  # warm-up
    plain, with_reporter = [], []
    for r in range(repeats):
        sim.reporters.clear()
        t0 = time.perf_counter()
        sim.step(n_steps)
        plain.append(time.perf_counter() - t0)
        reporter = AADataReporter(tmp / f"{test_system.name}_{r}.h5", interval)
        sim.reporters.append(reporter)
        t0 = time.perf_counter()
        sim.step(n_steps)
        with_reporter.append(time.perf_counter() - t0)
        reporter.close()
        sim.reporters.clear()
    a, b = statistics.median(plain), statistics.median(with_reporter)
    return {
        "system": test_system.name,
        "atoms": test_system.system.getNumParticles(),
        "platform": sim.context.getPlatform().getName(),
        "steps_per_run": n_steps,
        "report_interval": interval,
        "steps_per_s_plain": n_steps / a,
        "steps_per_s_with_reporter": n_steps / b,
        "overhead": b / a - 1,
        "plain_s": plain,
        "with_reporter_s": with_reporter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 repetitions of 1/10 the steps (5000 OBC2, 200 TIP3P)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    if args.quick:
        args.repeats = 2
    cases = [
        (systems.alanine_dipeptide("obc2"), 50_000 // scale),
        (systems.alanine_dipeptide("tip3p"), 2_000 // scale),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for test_system, n_steps in cases:
            row = measure(test_system, n_steps, 100, args.repeats, Path(tmp))
            rows.append(row)
            print(f"{row['system']}: {row['steps_per_s_plain']:.0f} -> {row['steps_per_s_with_reporter']:.0f} "
                  f"steps/s, overhead {100 * row['overhead']:+.1f} %", flush=True)
    md = ["| system | atoms | platform | steps/s, no reporter | steps/s, AADataReporter every 100 steps | overhead | target |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['system']} | {r['atoms']} | {r['platform']} | {r['steps_per_s_plain']:.0f} | "
                  f"{r['steps_per_s_with_reporter']:.0f} | {100 * r['overhead']:+.1f} % | ≤ 10 % |")
    md.append(f"\nMedians of {args.repeats} interleaved repetitions; positions, forces and velocities stored "
              "in float32 with a flush per frame.\n")
    save("data_writer", {"cases": rows, "repeats": args.repeats, "quick": args.quick}, "\n".join(md))


if __name__ == "__main__":
    main()
