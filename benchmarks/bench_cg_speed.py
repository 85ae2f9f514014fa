"""Speed of the CG alanine dipeptide in OpenMM vs the AA system (issue 4; all measured in one run).

- CG (6 beads, priors + SchNet with the default architecture, float32) with the TorchForce and the PythonForce
  backend, at 4 fs, on the Reference platform; the TorchForce with 8 independent copies in one System; and an
  empty CG system (same particles, no force) to isolate the per-step cost of the force.
- AA alanine dipeptide in TIP3P with PME at 2 fs (CPU platform) and in OBC2 (Reference), for comparison.
Target: CG ns/day >= 20x AA TIP3P ns/day.

The machine may be shared with other jobs: every system is measured ``--rounds`` times, interleaved, and
the best round counts (the load average during the run is recorded).

    python benchmarks/bench_cg_speed.py [--seconds 10] [--rounds 3] [--quick]
"""
from __future__ import annotations

import argparse
import os
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
from openmm_backmap.data import CGDataset, simulate_reference  # noqa: E402
from openmm_backmap.mapping import CGMapping, map_dataset  # noqa: E402
from openmm_backmap.platforms import choose_platform  # noqa: E402
from openmm_backmap.potential import CGPotential, create_cg_system  # noqa: E402
from openmm_backmap.potential.priors import fit_priors  # noqa: E402
from openmm_backmap.potential.schnet import SchNet  # noqa: E402
from openmm_backmap.potential.trainer import DEFAULT_NETWORK  # noqa: E402


def steps_per_second(system, positions, dt_fs, seconds, platform=None, box=None):
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, dt_fs * u.femtosecond)
    context = openmm.Context(system, integrator, choose_platform(system, platform))
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    integrator.step(50)
    n, t0 = 0, time.perf_counter()
    chunk = 10
    while time.perf_counter() - t0 < seconds:
        integrator.step(chunk)
        n += chunk
        if n == 100 and time.perf_counter() - t0 < 0.05 * seconds:
            chunk = 200
    return n / (time.perf_counter() - t0), context.getPlatform().getName()


#: Independent copies of the CG molecule in one System (replicas at the cost of about one model call).
N_COPIES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="wall time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements per system (best counts)")
    parser.add_argument("--aa-steps", type=int, default=20_000,
                        help="steps of the AA OBC2 run whose mapped frames fit the priors (frames every 100 steps)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 1 s per system, priors fitted to a 10 000-step AA run")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.aa_steps = 1.0, 1, 10_000
    torch.set_num_threads(1)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ts = systems.alanine_dipeptide("obc2")
        aa = simulate_reference(Path(tmp) / "aa.h5", ts.topology, ts.system, ts.positions, n_steps=args.aa_steps,
                                report_interval=100, progress=False)
        mapping = CGMapping.from_preset(ts.topology, "backbone-cb")
        with CGDataset(map_dataset(aa, mapping, Path(tmp) / "cg.h5", progress=False)) as cg:
            xyz = cg.positions[:].astype(np.float64)
    bonds = [[b[0].index, b[1].index] for b in mapping.cg_topology.bonds]
    priors = fit_priors(xyz, bonds, 300.0, bead_types=mapping.bead_types)
    types = sorted(set(mapping.bead_types))
    net = SchNet(bead_types=[types.index(t) for t in mapping.bead_types], n_types=len(types), **DEFAULT_NETWORK)
    potential = CGPotential([*priors, net], n_priors=len(priors), bead_names=mapping.bead_names,
                            bead_types=mapping.bead_types, mapping_fingerprint=mapping.topology_fingerprint).float()
    start = xyz[-1]

    empty = openmm.System()
    for m in mapping.bead_masses:
        empty.addParticle(float(m))
    cg = {backend: create_cg_system(mapping, potential, backend=backend) for backend in ("torch", "python")}
    copies = create_cg_system(mapping, potential, backend="torch", n_copies=N_COPIES)
    wet = systems.alanine_dipeptide("tip3p")
    box = wet.topology.getPeriodicBoxVectors()
    wet_start = wet.minimized(max_iterations=200).positions
    dry_start = ts.minimized().positions
    runs = {
        "CG, empty system (no force)": lambda: steps_per_second(empty, start, 4, args.seconds, "Reference") + (4,),
        "CG, torch backend": lambda: steps_per_second(cg["torch"], start, 4, args.seconds, "Reference") + (4,),
        "CG, python backend": lambda: steps_per_second(cg["python"], start, 4, args.seconds, "Reference") + (4,),
        f"CG, torch backend, {N_COPIES} copies in one System": lambda: steps_per_second(
            copies, np.tile(start, (N_COPIES, 1)), 4, args.seconds, "Reference") + (4,),
        "AA, TIP3P + PME": lambda: steps_per_second(wet.system, wet_start, 2, args.seconds, box=box) + (2,),
        "AA, OBC2 implicit solvent": lambda: steps_per_second(ts.system, dry_start, 2, args.seconds) + (2,),
    }
    samples = {k: [] for k in runs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for k, run in runs.items():
            samples[k].append(run())
        load.append(os.getloadavg()[0])
    rows = {k: max(v, key=lambda sample: sample[0]) for k, v in samples.items()}

    ns_day = {k: v[0] * v[2] * 1e-6 * 86400 for k, v in rows.items()}
    per_step_us = {k: 1e6 / v[0] for k, v in rows.items()}
    force_cost = {b: per_step_us[f"CG, {b} backend"] - per_step_us["CG, empty system (no force)"]
                  for b in ("torch", "python")}
    ratio = ns_day["CG, torch backend"] / ns_day["AA, TIP3P + PME"]
    aggregate = N_COPIES * ns_day[f"CG, torch backend, {N_COPIES} copies in one System"] / ns_day["AA, TIP3P + PME"]
    round_ratios = [cg_sample[0] * cg_sample[2] / (aa_sample[0] * aa_sample[2])
                    for cg_sample, aa_sample in zip(samples["CG, torch backend"], samples["AA, TIP3P + PME"])]
    for k in rows:
        print(f"{k}: {rows[k][0]:.0f} steps/s ({rows[k][1]}), {ns_day[k]:.1f} ns/day", flush=True)
    print(f"CG torch vs AA TIP3P: {ratio:.1f}x ({aggregate:.0f}x with {N_COPIES} copies); force cost per step: "
          f"{force_cost}")

    md = ["| system | platform | time step | steps/s | ns/day | µs/step |", "|---|---|---|---|---|---|"]
    for k, (sps, plat, dt) in rows.items():
        md.append(f"| {k} | {plat} | {dt} fs | {sps:.0f} | {ns_day[k]:.1f} | {per_step_us[k]:.0f} |")
    md.append(f"\nCG with the TorchForce vs AA in TIP3P/PME: **{ratio:.1f}×** more simulated time per day (target ≥ 20×). "
              f"Cost of the CG force per step over the empty system: TorchForce {force_cost['torch']:.0f} µs, "
              f"PythonForce {force_cost['python']:.0f} µs. Model: priors + SchNet (hidden {DEFAULT_NETWORK['hidden']}, "
              f"{DEFAULT_NETWORK['n_interactions']} interactions, cutoff {DEFAULT_NETWORK['cutoff_nm']} nm), float32, "
              "torch threads = 1; the AA TIP3P run uses the CPU platform's threads. "
              f"Best of {args.rounds} interleaved rounds of {args.seconds:g} s per system; 1-minute load average "
              f"{min(load):.1f}-{max(load):.1f} during the run ({os.cpu_count()} cores); the ratio within each round: "
              f"{', '.join(f'{r:.1f}×' for r in round_ratios)}. With {N_COPIES} independent copies in one System "
              f"(`create_cg_system(..., n_copies={N_COPIES})`; ns/day per copy in the table) the aggregate sampling "
              f"rate is {aggregate:.0f}× AA TIP3P. AA in OBC2 implicit solvent (Reference platform) runs "
              f"{ns_day['AA, OBC2 implicit solvent'] / ns_day['CG, torch backend']:.0f}× faster than the CG TorchForce: "
              "for a molecule this small no CG-ML model here beats implicit solvent.\n")
    save("cg_speed", {"steps_per_s": {k: v[0] for k, v in rows.items()}, "ns_per_day": ns_day,
                      "force_cost_us": force_cost, "ratio_cg_torch_vs_aa_tip3p": ratio,
                      "ratio_cg_torch_vs_aa_tip3p_per_round": round_ratios,
                      f"ratio_{N_COPIES}_copies_aggregate_vs_aa_tip3p": aggregate,
                      "rounds": args.rounds, "seconds": args.seconds, "quick": args.quick,
                      "steps_per_s_all_rounds": {k: [sample[0] for sample in v] for k, v in samples.items()},
                      "load_average_1min": load}, "\n".join(md))


if __name__ == "__main__":
    main()
