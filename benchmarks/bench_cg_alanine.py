"""Quality of the force-matched CG alanine dipeptide (issue 4 targets).

AA reference (amber14 + OBC2, 300 K) -> backbone-cb 6-bead map -> priors-only and priors+SchNet potentials
-> CG Langevin dynamics in OpenMM (TorchForce, 4 fs, replicas as independent copies in one System) ->
φ/ψ free-energy-surface JSD (36×36) and CG bond/angle/dihedral JSDs against the mapped AA data, and the
number of blow-ups.  Targets: FES JSD <= 0.05; each bond/angle/dihedral JSD <= 0.02; 0 blow-ups in
8 replicas × 250 000 steps.

The training forces are mapped with the beads' net forces (``--force-map constraint-aware``, the default) or with
the least-noise consistent force map fitted on the AA forces (``optimized``). The potentials of both maps (default
number of frames) found in the work folder are evaluated in the same run, so all can be compared side by side.
The recorded run, whose 500 000-frame optimised potential meets the targets (docs/potential.md):

    python benchmarks/bench_cg_alanine.py --force-map constraint-aware --train-only
    python benchmarks/bench_cg_alanine.py --force-map optimized --train-only
    python benchmarks/bench_cg_alanine.py --force-map optimized --train-frames 500000 --epochs 15 --train-only
    python benchmarks/bench_cg_alanine.py --force-map optimized --train-frames 500000 --steps 250000
    python benchmarks/bench_cg_alanine.py [--aa-ns 100] [--replicas 8] [--steps 250000] [--epochs 40] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save  # noqa: E402

from openmm_backmap import metrics, systems  # noqa: E402
from openmm_backmap.data import CGDataset, simulate_reference  # noqa: E402
from openmm_backmap.mapping import CGMapping, map_dataset  # noqa: E402
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system  # noqa: E402
from openmm_backmap.potential.priors import angles_from_bonds, dihedrals_from_bonds  # noqa: E402
from openmm_backmap.reporters import CGRunGuard, SimulationBlowUp  # noqa: E402

PHI, PSI = [0, 1, 2, 4], [1, 2, 4, 5]  # backbone-cb beads: ACE C, N, CA, CB, C, NME N
WORK = RESULTS / "work_cg_alanine"
#: Length of the AA reference (ns). 20 ns holds a single excursion to the left-handed region (φ > 0), so its two
#: halves differ by a dihedral JSD of 0.035, above the 0.02 target; 100 ns (about 25 min on one core) does not.
DEFAULT_AA_NS = 100.0
FORCE_MAPS = ("constraint-aware", "optimized")
#: Force map of the training data by default: the library's default (the beads' net forces, constraint-aware). The
#: optimised map lowers the noise of the targets fourfold here; trained on all 500 000 frames it is the potential
#: that meets the targets (--force-map optimized --train-frames 500000; docs/potential.md).
DEFAULT_FORCE_MAP = "constraint-aware"
#: Frames (strided over the reference) the potential is trained on by default: 100 000 of the 500 000, 80 % training
#: (a short default run; these potentials miss the ψ-dihedral target, the 500 000-frame one meets it). Other numbers
#: keep their own potential files.
DEFAULT_TRAIN_FRAMES = 100_000


def work_files(aa_ns: float, work: Path = WORK, force_map: str = "constraint-aware",
               train_frames: int = DEFAULT_TRAIN_FRAMES) -> dict:
    """Files of one reference length, force map and number of training frames: AA data (``aa``), mapped data
    (``cg``), potential, training log."""
    tag = f"{aa_ns:g}ns" + ("" if force_map == "constraint-aware" else f"_{force_map}")
    model = tag + ("" if train_frames == DEFAULT_TRAIN_FRAMES else f"_{train_frames // 1000}kframes")
    return {"aa": work / f"aa_{aa_ns:g}ns.h5", "cg": work / f"cg_{tag}.h5",
            "potential": work / f"potential_{model}.pt", "log": work / f"training_{model}.csv"}


def run_cg(mapping, potential, starts, n_steps, dt_fs, report_every, seed, temperature_K=300.0):
    """Independent replicas (copies in one System); returns frames (n_reports, replicas, 6, 3), info."""
    n_rep = len(starts)
    system = create_cg_system(mapping, potential, n_copies=n_rep)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * u.kelvin, 1 / u.picosecond, dt_fs * u.femtosecond)
    integrator.setRandomNumberSeed(seed)
    top = app.Topology()
    for _ in range(n_rep):
        chain = top.addChain()
        res = top.addResidue("CG", chain)
        for name in mapping.bead_names:
            top.addAtom(name, app.Element.getBySymbol("C"), res)
    sim = app.Simulation(top, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(np.concatenate(starts))
    sim.context.setVelocitiesToTemperature(temperature_K * u.kelvin, seed)
    guard = CGRunGuard(1000, max_temperature_K=1500)
    sim.reporters.append(guard)
    frames, blew = [], None
    t0 = time.perf_counter()
    try:
        for _ in range(n_steps // report_every):
            sim.step(report_every)
            state = sim.context.getState(getPositions=True)
            frames.append(state.getPositions(asNumpy=True).value_in_unit(u.nanometer).reshape(n_rep, -1, 3))
    except SimulationBlowUp as exc:
        blew = str(exc)
    seconds = time.perf_counter() - t0
    return np.array(frames), {"blow_up": blew, "steps_done": sim.currentStep, "seconds": seconds,
                              "steps_per_s": sim.currentStep / seconds}


def cg_geometry(xyz, bonds):
    ang, dih = angles_from_bonds(bonds), dihedrals_from_bonds(bonds)
    return {"bond": metrics.distances(xyz, bonds), "angle": metrics.angles(xyz, ang),
            "dihedral": metrics.dihedrals(xyz, dih)}, ang, dih


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aa-ns", type=float, default=DEFAULT_AA_NS,
                        help="AA reference length (ns); a longer run extends the stored shorter one if present")
    parser.add_argument("--train-frames", type=int, default=DEFAULT_TRAIN_FRAMES,
                        help="frames (strided over the whole reference; 80%% of them train) to train on; other "
                             "numbers than the default keep their own potential files, and the potentials of the "
                             "default number are run beside them")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--dt-fs", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--force-map", choices=FORCE_MAPS, default=DEFAULT_FORCE_MAP,
                        help="force map of the training data: the beads' net forces with constrained hydrogens "
                             "(constraint-aware) or the least-noise consistent map fitted on the AA forces (optimized)")
    parser.add_argument("--train-only", action="store_true", help="stop after training (and saving) the potential")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 0.2 ns of AA data (1000 frames), 3 epochs, 2 replicas × 4000 CG steps; the "
                             "potential is always retrained")
    args = parser.parse_args()
    if args.quick:
        args.aa_ns, args.train_frames, args.epochs, args.replicas, args.steps = 0.2, 1000, 3, 2, 4000
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    ts = systems.alanine_dipeptide("obc2")
    n_steps = int(args.aa_ns * 500_000) // 100 * 100
    files = work_files(args.aa_ns, work, args.force_map, args.train_frames)
    if not files["aa"].exists():  # extend the longest shorter reference instead of starting over
        shorter = sorted((p for p in work.glob("aa_*ns.h5") if float(p.stem[3:-2]) < args.aa_ns),
                         key=lambda p: float(p.stem[3:-2]))
        if shorter:
            import shutil

            shutil.copyfile(shorter[-1], files["aa"])
    aa = simulate_reference(files["aa"], ts.topology, ts.system, ts.positions, n_steps=n_steps,
                            report_interval=100, equilibration_steps=10_000, append=True, seed=1,
                            progress=not args.quick)
    mapping = CGMapping.from_preset(ts.topology, "backbone-cb", system=ts.system)
    if args.force_map == "optimized":
        mapping = mapping.with_optimized_force_map(aa)
    cg_path = map_dataset(aa, mapping, files["cg"], overwrite=True)
    with CGDataset(cg_path) as cg:
        ref = cg.positions[:].astype(np.float64)
    bonds = np.array([[b[0].index, b[1].index] for b in mapping.cg_topology.bonds])

    model_path = files["potential"]
    if model_path.exists() and not args.quick:
        full = CGPotential.load(model_path, mapping=mapping)
    else:
        trainer = ForceMatchingTrainer(mapping, cg_path, max_epochs=args.epochs, patience=6,
                                       max_frames=args.train_frames, batch_size=256, learning_rate=2e-3,
                                       log=files["log"], seed=0)
        full = trainer.fit()
        full.save(model_path)
    if args.train_only:
        print(f"trained: {model_path}", full.metadata.get("val_force_mse"), full.metadata.get("priors_only_val_force_mse"))
        return
    def label(force_map: str, train_frames: int) -> str:
        return f"priors + SchNet, {force_map} force map" + (
            "" if train_frames == DEFAULT_TRAIN_FRAMES else f", {train_frames // 1000}k frames")

    models = {label(args.force_map, args.train_frames): full}
    # the other trained potentials (other force map, default number of frames): side by side in one run
    for other, frames in ((m, n) for m in FORCE_MAPS for n in dict.fromkeys([args.train_frames, DEFAULT_TRAIN_FRAMES])):
        path = work_files(args.aa_ns, work, other, frames)["potential"]
        if (other, frames) != (args.force_map, args.train_frames) and path.exists() and not args.quick:
            models[label(other, frames)] = CGPotential.load(path, mapping=mapping)
    models["priors only"] = full.priors_only()

    rng = np.random.default_rng(0)
    starts = [ref[i] for i in rng.choice(len(ref), size=args.replicas, replace=False)]
    ref_geo, ang, dih = cg_geometry(ref, bonds)
    phi_ref, psi_ref = metrics.dihedrals(ref, [PHI])[:, 0], metrics.dihedrals(ref, [PSI])[:, 0]
    results, surfaces = {}, {"AA reference (mapped)": (phi_ref, psi_ref)}
    # sampling noise of the metrics: the first half of the AA reference against the second
    half = len(ref) // 2
    noise = {"fes_jsd": metrics.fes_jsd(phi_ref[:half], psi_ref[:half], phi_ref[half:], psi_ref[half:]),
             "dihedral_jsd_max": max(metrics.histogram_jsd(ref_geo["dihedral"][:half, k], ref_geo["dihedral"][half:, k],
                                                           bins=72, range=(-np.pi, np.pi))
                                     for k in range(ref_geo["dihedral"].shape[1]))}
    for label, model in models.items():
        frames, info = run_cg(mapping, model.float(), starts, args.steps, args.dt_fs, 250, seed=2)
        xyz = frames.reshape(-1, 6, 3) if len(frames) else np.zeros((0, 6, 3))
        row = {**info, "frames": len(xyz)}
        if len(xyz) > 10:
            phi, psi = metrics.dihedrals(xyz, [PHI])[:, 0], metrics.dihedrals(xyz, [PSI])[:, 0]
            surfaces[f"CG, {label}"] = (phi, psi)
            geo, _, _ = cg_geometry(xyz, bonds)
            row["fes_jsd"] = metrics.fes_jsd(phi_ref, psi_ref, phi, psi)
            for kind, data in geo.items():
                rng_kind = (-np.pi, np.pi) if kind == "dihedral" else None
                row[f"{kind}_jsd"] = [metrics.histogram_jsd(ref_geo[kind][:, k], data[:, k], bins=72 if kind == "dihedral" else 100,
                                                            range=rng_kind) for k in range(data.shape[1])]
        results[label] = row
        print(label, {k: v for k, v in row.items() if k != "blow_up"}, row["blow_up"], flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(surfaces), figsize=(4.2 * len(surfaces), 3.8), dpi=110)
    for ax, (title, (phi, psi)) in zip(np.atleast_1d(axes), surfaces.items()):
        f, edges = metrics.free_energy_surface(phi, psi)
        im = ax.pcolormesh(np.degrees(edges), np.degrees(edges), np.where(np.isfinite(f), f, np.nan).T,
                           cmap="viridis", vmax=25)
        ax.set(xlabel="φ (deg)", ylabel="ψ (deg)")
        ax.set_title(textwrap.fill(title, 28), fontsize=10)  # long model names would run into each other
    fig.colorbar(im, ax=axes, label="free energy (kJ/mol)")
    fig.savefig(RESULTS / "cg_alanine_fes.png", bbox_inches="tight")

    md = [f"AA reference: {args.aa_ns} ns of alanine dipeptide (amber14 + OBC2, 300 K), {len(ref)} frames mapped to "
          f"backbone-cb; potentials trained on {DEFAULT_TRAIN_FRAMES} frames strided over it unless their label says "
          f"otherwise (time-block split 80/10/10). "
          f"CG: {args.replicas} replicas × {args.steps} steps at {args.dt_fs} fs, Langevin 300 K, 1/ps, TorchForce "
          "on Reference, float32 model.", "",
          "| model | FES JSD (target ≤ 0.05) | max bond JSD | max angle JSD | max dihedral JSD (targets ≤ 0.02) | "
          "blow-ups | CG steps/s (all replicas) |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "fes_jsd" in r:
            md.append(f"| {label} | {r['fes_jsd']:.3f} | {max(r['bond_jsd']):.3f} | {max(r['angle_jsd']):.3f} | "
                      f"{max(r['dihedral_jsd']):.3f} | {'0' if r['blow_up'] is None else '1 (' + r['blow_up'][:80] + ')'} "
                      f"| {r['steps_per_s']:.0f} |")
        else:
            md.append(f"| {label} | – | – | – | – | {r['blow_up']} | – |")
    md.append(f"\nValidation force MSE ({args.force_map} force map targets): priors only {full.metadata.get('priors_only_val_force_mse', float('nan')):.0f}, "
              f"priors + SchNet {full.metadata.get('val_force_mse', float('nan')):.0f} (kJ/mol/nm)²; "
              f"wall time {time.perf_counter() - t_start:.0f} s. Sampling noise of the metrics (first half of the AA "
              f"reference against the second, {half} frames each): FES JSD {noise['fes_jsd']:.3f}, max dihedral JSD "
              f"{noise['dihedral_jsd_max']:.3f}.\n\n![FES](../benchmarks/results/cg_alanine_fes.png)\n")
    save("cg_alanine", {"settings": vars(args) | {"work": str(args.work)}, "results": results,
                        "reference_halves": noise,
                        "training": {k: v for k, v in full.metadata.items() if "mse" in k or k in ("frames", "epochs")}},
         "\n".join(md))


if __name__ == "__main__":
    main()
