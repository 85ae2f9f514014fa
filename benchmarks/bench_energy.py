"""AAEnergy speed against OpenMM, measured side by side in one run.

1. Energies + forces of 256 alanine-dipeptide solute configurations: batched AAEnergy (float64) vs a loop over
   an OpenMM CPU Context (target: >= 10x faster).  Also with OBC2 implicit solvent (GB through the bridge).
2. A 300-molecule benzene box (PME): frames/s of AAEnergy (PME through the bridge) vs OpenMM CPU, and of the
   native reaction-field variant.

    python benchmarks/bench_energy.py [--repeats 5] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.unit as u
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import save  # noqa: E402

from openmm_backmap import systems  # noqa: E402
from openmm_backmap.energy import AAEnergy  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _openmm_loop(system, positions, box, platform):
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName(platform))

    def run():
        for b in range(len(positions)):
            if box is not None:
                ctx.setPeriodicBoxVectors(*box[b])
            ctx.setPositions(positions[b])
            ctx.getState(getEnergy=True, getForces=True)
    return run


def _configs(ts, batch, sigma=0.01):
    x = ts.minimized(max_iterations=500).positions_nm
    rng = np.random.default_rng(0)
    return x[None] + rng.normal(scale=sigma, size=(batch,) + x.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--configs", type=int, default=256, help="alanine-dipeptide configurations per batch")
    parser.add_argument("--benzene-molecules", type=int, default=300)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, 64 configurations, a 100-molecule benzene box")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.configs, args.benzene_molecules = 1, 64, 100
    torch.set_num_threads(args.threads)
    rows = []

    # 1. alanine dipeptide solute, 256 configurations (--configs)
    for solvent in ("vacuum", "obc2"):
        ts = systems.alanine_dipeptide(solvent)
        x = _configs(ts, args.configs)
        energy = AAEnergy(ts.system)
        xt = torch.tensor(x)
        t_torch = _median_time(lambda: energy.energy_and_forces(xt), args.repeats)
        energy32, xt32 = AAEnergy(ts.system).to(torch.float32), xt.float()
        t_torch32 = _median_time(lambda: energy32.energy_and_forces(xt32), args.repeats)
        t_cpu = _median_time(_openmm_loop(ts.system, x, None, "CPU"), args.repeats)
        t_ref = _median_time(_openmm_loop(ts.system, x, None, "Reference"), args.repeats)
        rows.append({"case": f"alanine dipeptide ({solvent}), {args.configs} configs",
                     "atoms": ts.system.getNumParticles(),
                     "aaenergy_s": t_torch, "aaenergy_float32_s": t_torch32, "openmm_cpu_s": t_cpu,
                     "openmm_reference_s": t_ref,
                     "speedup_vs_cpu": t_cpu / t_torch, "routing": energy.describe()})
        print(rows[-1]["case"], f"AAEnergy {1e3 * t_torch:.1f} ms (float32 {1e3 * t_torch32:.1f}), "
              f"OpenMM CPU {1e3 * t_cpu:.1f} ms, "
              f"Reference {1e3 * t_ref:.1f} ms -> {t_cpu / t_torch:.1f}x", flush=True)

    # 2. 300-molecule benzene box (--benzene-molecules), PME
    ts = systems.liquid("BENZ", n_molecules=args.benzene_molecules)
    n_frames = 4
    x = _configs(ts, n_frames, sigma=0.002)
    box = np.repeat(np.asarray(ts.topology.getPeriodicBoxVectors().value_in_unit(u.nanometer))[None], n_frames, 0)
    xt, bt = torch.tensor(x), torch.tensor(box)
    pme_ref = AAEnergy(ts.system)                      # bridge in double precision (Reference)
    pme_cpu = AAEnergy(ts.system, platform="CPU")      # bridge on the CPU platform (mixed precision)
    rf_system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(ts.system))
    for f in rf_system.getForces():
        if isinstance(f, openmm.NonbondedForce):
            f.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    rf_native = AAEnergy(rf_system)
    slow = min(2, args.repeats)  # repetitions of the slow evaluators
    timings = {
        "AAEnergy, PME via bridge (Reference, double)": _median_time(lambda: pme_ref.energy_and_forces(xt, bt), slow),
        "AAEnergy, PME via bridge (CPU platform)": _median_time(lambda: pme_cpu.energy_and_forces(xt, bt), args.repeats),
        "AAEnergy, native reaction field (float64)": _median_time(lambda: rf_native.energy_and_forces(xt, bt), slow),
        "OpenMM CPU Context loop, PME": _median_time(_openmm_loop(ts.system, x, box, "CPU"), args.repeats),
        "OpenMM CPU Context loop, reaction field": _median_time(_openmm_loop(rf_system, x, box, "CPU"), args.repeats),
    }
    benzene = {k: n_frames / v for k, v in timings.items()}
    for k, v in benzene.items():
        print(f"benzene {args.benzene_molecules}: {k}: {v:.2f} frames/s", flush=True)

    md = ["| case | atoms | AAEnergy float64 | AAEnergy float32 | OpenMM CPU loop | OpenMM Reference loop | "
          "speed-up vs CPU (float64 / float32) | target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['case']} | {r['atoms']} | {1e3 * r['aaenergy_s']:.1f} ms | {1e3 * r['aaenergy_float32_s']:.1f} ms | "
                  f"{1e3 * r['openmm_cpu_s']:.1f} ms | {1e3 * r['openmm_reference_s']:.1f} ms | "
                  f"{r['speedup_vs_cpu']:.1f}x / {r['openmm_cpu_s'] / r['aaenergy_float32_s']:.1f}x | ≥ 10x |")
    md.append("")
    md.append(f"Energies and forces (autograd) of all configurations, float64, torch threads = {args.threads}; "
              "median of repeated runs. In OBC2 the GB term goes through the OpenMM bridge (Reference platform, "
              "one Context reused), the rest is native.\n")
    md.append(f"{args.benzene_molecules}-molecule benzene box ({ts.system.getNumParticles()} atoms), energies + "
              "forces, frames/s:\n")
    md.append("| evaluator | frames/s |")
    md.append("|---|---|")
    for k, v in benzene.items():
        md.append(f"| {k} | {v:.2f} |")
    md.append("\nPME has no native torch version: AAEnergy evaluates it through the exact OpenMM bridge, so its "
              "speed is OpenMM's (Reference in double precision by default; `platform=\"CPU\"` for speed).\n")
    save("energy", {"alanine_dipeptide": rows, f"benzene_{args.benzene_molecules}_frames_per_s": benzene,
                    "torch_threads": args.threads, "repeats": args.repeats, "quick": args.quick}, "\n".join(md))


if __name__ == "__main__":
    main()
