"""Wall-time cost of the BackmapReporter on a running CG simulation (issue 5 speed target).

CG alanine dipeptide (backbone-cb, 6 beads; priors + SchNet as a TorchForce and as a PythonForce, Reference
platform, 4 fs) is run for ``--steps`` steps without any reporter and with a ``BackmapReporter`` writing the AA
trajectory (DCD + PDB) every ``--interval`` steps (default 100, the issue's setting), the two taking turns for
``--rounds`` rounds so that load on the machine hits them alike. Target: with the reporter ≤ 1.2× the wall time
without it. A third case adds CG ``DCDReporter`` + ``StateDataReporter`` to both sides (a typical script), and a
fourth backmaps with relaxation (``relax=`` the AA System, 200 L-BFGS iterations; no target, for the docs).

Models: the trained potential of ``bench_cg_alanine`` and temporal backmapper of ``bench_backmap_alanine`` when
their work folders hold them; otherwise both are trained here, briefly, on a 400 ps AA run (the cost of a step
depends on the architecture, which is the library default either way, not on how well it is trained). The
backmapper trained here pairs frames 0.4 ps apart (= ``--interval`` × 4 fs); the bench_backmap_alanine model's
lag is 1 ps, so the reporter warns about the mismatch, which does not change its cost.

    python benchmarks/bench_reporter_overhead.py [--steps 20000] [--interval 100] [--rounds 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save  # noqa: E402

from openmm_backmap import systems  # noqa: E402
from openmm_backmap.backmap import BackmapperTrainer, TemporalBackmapper  # noqa: E402
from openmm_backmap.data import CGDataset, simulate_reference  # noqa: E402
from openmm_backmap.mapping import CGMapping, map_dataset  # noqa: E402
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system  # noqa: E402
from openmm_backmap.reporters import BackmapReporter  # noqa: E402

DT_FS = 4.0
TARGET = 1.2


def models(tmp: Path, mapping: CGMapping, aa_system: openmm.System, topology, positions, interval: int,
           epochs: int) -> tuple[CGPotential, TemporalBackmapper, str, np.ndarray]:
    """(potential, backmapper, where they come from, a CG start frame)."""
    pot_path = RESULTS / "work_cg_alanine" / "potential.pt"
    bm_path = RESULTS / "work_backmap_alanine" / "backmapper_temporal.pt"
    aa = simulate_reference(tmp / "aa.h5", topology, aa_system, positions, n_steps=200_000, report_interval=100,
                            equilibration_steps=5_000, seed=3, progress=False)  # 400 ps, a frame every 0.2 ps
    force_mapping = mapping.with_constraints(aa_system)
    cg_path = map_dataset(aa, force_mapping, tmp / "cg.h5", progress=False)
    with CGDataset(cg_path) as cg:
        start = cg.positions[-1].astype(np.float64)
    if pot_path.exists() and bm_path.exists():
        return (CGPotential.load(pot_path, mapping=force_mapping), TemporalBackmapper.load(bm_path, mapping),
                "trained by bench_cg_alanine and bench_backmap_alanine", start)
    potential = ForceMatchingTrainer(force_mapping, cg_path, max_epochs=epochs, seed=0, progress=False).fit()
    stride = max(1, int(round(interval * DT_FS / 1000 / 0.2)))  # AA frames are 0.2 ps apart
    backmapper = BackmapperTrainer(mapping, aa, stride=stride, max_epochs=epochs, seed=0, progress=False).fit()
    return potential, backmapper, f"trained here for {epochs} epochs on a 400 ps AA run", start


def timed_run(system: openmm.System, topology, start: np.ndarray, steps: int, reporters) -> float:
    """Wall seconds of ``steps`` steps of a fresh Simulation (Context creation not timed), reporters closed after."""
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, DT_FS * u.femtosecond)
    integrator.setRandomNumberSeed(7)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(start)
    simulation.context.setVelocitiesToTemperature(300 * u.kelvin, 7)
    simulation.reporters.extend(reporters)
    t0 = time.perf_counter()
    simulation.step(steps)
    seconds = time.perf_counter() - t0
    for reporter in reporters:
        if hasattr(reporter, "close"):
            reporter.close()
        elif hasattr(reporter, "_out"):
            reporter._out.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20_000, help="CG steps per timed run")
    parser.add_argument("--interval", type=int, default=100, help="reportInterval of every reporter (steps)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median ratio counts)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs when the models are trained here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1000 steps, 1 training epoch")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.epochs = 1000, 1, 1
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the lag-mismatch warning of a borrowed backmapper is expected here
    ts = systems.alanine_dipeptide("obc2")
    mapping = CGMapping.from_preset(ts.topology, "backbone-cb")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        potential, backmapper, origin, start = models(tmp, mapping, ts.system, ts.topology, ts.positions,
                                                      args.interval, args.epochs)
        setup_s = time.perf_counter() - t0
        cg_top = mapping.to_openmm_topology()
        reports = args.steps // args.interval
        cases = {}
        for backend in ("torch", "python"):
            system = create_cg_system(mapping.with_constraints(ts.system), potential.float(), backend=backend)

            def plain(extra=False, backend=backend):
                return [app.DCDReporter(str(tmp / f"cg_{backend}.dcd"), args.interval),
                        app.StateDataReporter(str(tmp / f"cg_{backend}.csv"), args.interval, step=True,
                                              temperature=True)] if extra else []

            def backmap(extra=False, relax=None, backend=backend):
                return plain(extra) + [BackmapReporter(tmp / f"aa_{backend}.dcd", args.interval, backmapper,
                                                       relax=relax)]

            cases[f"{backend}"] = (system, plain, backmap)
            cases[f"{backend}, with DCDReporter + StateDataReporter"] = (
                system, lambda p=plain: p(True), lambda b=backmap: b(True))
        relax_system = ts.system
        cases["torch, BackmapReporter with relax (200 L-BFGS iterations)"] = (
            cases["torch"][0], cases["torch"][1], lambda b=cases["torch"][2]: b(relax=relax_system))
        seconds = {name: {"without": [], "with": []} for name in cases}
        load = [os.getloadavg()[0]]
        for _ in range(args.rounds):
            for name, (system, without, with_) in cases.items():
                seconds[name]["without"].append(timed_run(system, cg_top, start, args.steps, without()))
                seconds[name]["with"].append(timed_run(system, cg_top, start, args.steps, with_()))
            load.append(os.getloadavg()[0])
    rows = {}
    for name, s in seconds.items():
        ratios = [b / a for a, b in zip(s["without"], s["with"])]
        rows[name] = {"ratio_median": float(np.median(ratios)), "ratios": ratios,
                      "seconds_without": s["without"], "seconds_with": s["with"],
                      "steps_per_s_without": float(args.steps / np.median(s["without"])),
                      "steps_per_s_with": float(args.steps / np.median(s["with"])),
                      "ms_per_report": float(1e3 * (np.median(s["with"]) - np.median(s["without"])) / reports)}
    lines = ["| CG force, reporters | steps/s without | steps/s with BackmapReporter | wall-time ratio (median; "
             f"each round) | cost per AA frame (ms) | target |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        target = "–" if "relax" in name else f"≤ {TARGET}×"
        met = "" if "relax" in name else (" ✓" if r["ratio_median"] <= TARGET else " ✗")
        lines.append(f"| {name} | {r['steps_per_s_without']:.0f} | {r['steps_per_s_with']:.0f} | "
                     f"**{r['ratio_median']:.3f}×** ({', '.join(f'{x:.3f}' for x in r['ratios'])}) | "
                     f"{r['ms_per_report']:.2f} | {target}{met} |")
    md = ("CG alanine dipeptide (backbone-cb, 6 beads → 22 atoms), priors + SchNet (float32), Reference platform, "
          f"{DT_FS:g} fs, {args.steps} steps per run; `BackmapReporter(\"aa.dcd\", {args.interval}, backmapper)` "
          f"writes {reports} AA frames (DCD + PDB) per run, the temporal model drawing one latent per frame. "
          f"Models {origin}. Runs with and without the reporter take turns, {args.rounds} rounds; Context creation "
          f"is not timed, the reporter's first frame (library pick, file set-up) is. 1-minute load average "
          f"{min(load):.1f}-{max(load):.1f} ({os.cpu_count()} cores), torch threads = 1.\n\n" + "\n".join(lines) + "\n")
    save("reporter_overhead", {"steps": args.steps, "interval": args.interval, "rounds": args.rounds,
                               "models": origin, "setup_s": setup_s, "rows": rows, "load_average_1min": load,
                               "quick": args.quick}, md)
    print(md)


if __name__ == "__main__":
    main()
