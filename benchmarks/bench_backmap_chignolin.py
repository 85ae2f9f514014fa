"""Temporally coherent backmapping of chignolin, Cα map (issue 5: "report the same for chignolin").

Training data: the AA reference of ``bench_cg_chignolin`` (3 ns in the recorded run; amber14 + OBC2, 350 K, frames
every 0.2 ps, started from the extended chain). Test data: an independent 2 ns trajectory (other seed, 10 000
frames every 0.2 ps), mapped to the 10 Cα beads and backmapped autoregressively (lag 0.2 ps) by the temporal model,
the frame-based baseline and the library lookup. Metrics and the HTML report come from ``openmm_backmap.evaluation.evaluate_run``.
The models work residue by residue (``--units residue``, each residue framed by the Cα of its neighbours and
conditioned on their previous atoms within 0.6 nm); ``--units molecule`` is the earlier recipe, the whole chain
as one unit.

    python benchmarks/bench_backmap_chignolin.py [--units residue] [--epochs 60] [--test-ns 2] [--rollout-steps 0]
        [--candidates M] [--relax ITERATIONS] [--relax-md STEPS ...] [--hidden WIDTH] [--latency-against WIDTH ...]
        [--cg-frames N] [--retrain] [--train-only temporal|frame] [--quick]

The generalization set (seed 003's): when ``bench_cg_chignolin`` has trained its potential, 4 CG replicas of
``--cg-frames`` frames each (one every 0.2 ps) are run with it at 350 K and backmapped by the temporal and the
frame-based model; only distributions can be compared with the AA test run.

``--relax`` adds a ``temporal_relax`` row: the temporal chain with every frame minimised with the AA System (beads
held) and, with ``--relax-md``, then run that many restrained Langevin steps at 350 K (``Relaxer``). Several
``--relax-md`` values give one row each (``temporal_relax_md<STEPS>``).

``--latency-against 512`` times one chain step of the saved 512-wide temporal model beside the default one.

``--quick`` (a smoke run) trains on a short AA run of its own (unless the results folder has the data of
``bench_cg_chignolin``) and tests on a short one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save  # noqa: E402

from openmm_backmap import systems  # noqa: E402
from openmm_backmap.backmap import BackmapperTrainer, TemporalBackmapper  # noqa: E402
from openmm_backmap.backmap.model import DEFAULT_ARCHITECTURE  # noqa: E402
from openmm_backmap.data import AADataset, simulate_reference  # noqa: E402
from openmm_backmap.evaluation import evaluate_run  # noqa: E402
from openmm_backmap.formats import AATrajectoryWriter  # noqa: E402
from openmm_backmap.mapping import CGMapping  # noqa: E402

DEFAULT_HIDDEN = DEFAULT_ARCHITECTURE["hidden"]
LATENCY_STEPS, LATENCY_BLOCK = 600, 50
LAG_PS = 0.2  # the test run's frame interval, and the models' training lag
GENERALIZATION_REPLICAS = 4


def step_latency_ms(chains: dict, cg: np.ndarray) -> dict:
    """Median wall time (ms) of one ``BackmapChain.step`` per chain, with the model loaded: the chains take turns
    in blocks of ``LATENCY_BLOCK`` consecutive test frames, so load on the machine hits them alike. Each chain's
    first step (the library pick that starts it) is not timed."""
    times = {name: [] for name in chains}
    for chain in chains.values():
        chain.step(cg[0])
    for start in range(1, LATENCY_STEPS + 1, LATENCY_BLOCK):
        for name, chain in chains.items():
            for frame in cg[start:start + LATENCY_BLOCK]:
                t0 = time.perf_counter()
                chain.step(frame)
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * float(np.median(t)), "p90_ms": 1e3 * float(np.percentile(t, 90)),
                   "steps": len(t)} for name, t in times.items()}


KEYS = ("bond_score", "clash_score", "energy_jsd", "energy_shift_kj_mol", "energy_median_shift_kj_mol", "fes_jsd",
        "velocity_jsd", "velocity_jsd_ratio", "drift_kj_mol")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--units", choices=("residue", "molecule"), default="residue")
    parser.add_argument("--environment-cutoff", type=float, default=None,
                        help="nm (default: 0.6 with residue units, none with one unit)")
    parser.add_argument("--test-ns", type=float, default=2.0, help="length of the AA test run (frames every 0.2 ps)")
    parser.add_argument("--rollout-steps", type=int, default=0,
                        help="rollout training of the temporal model (steps fed its own output)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="latent draws per residue, one kept along the chain by the bonds between residues "
                             "(BackmapChain's candidates; default: the library's, 8 for residue units); residue "
                             "units also get `_plain` rows with one draw")
    parser.add_argument("--relax", type=int, default=0, metavar="ITERATIONS",
                        help="also backmap with the temporal model relaxing every frame (Relaxer, this many L-BFGS "
                             "iterations; default 0: no such row)")
    parser.add_argument("--relax-md", type=int, nargs="+", default=[0], metavar="STEPS",
                        help="restrained Langevin steps at 350 K after --relax's minimisation (10/ps, 2 fs); several "
                             "values: one relaxed row each")
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN,
                        help="width of the per-residue networks (default: the library's, %(default)s); another width "
                             "keeps its models and results apart (`_h<width>` files, backmap_chignolin_h<width>.md)")
    parser.add_argument("--latency-against", type=int, nargs="*", default=[], metavar="WIDTH",
                        help="also time one chain step of the saved temporal models of these widths, interleaved "
                             "with the default model's (ratios measured side by side)")
    parser.add_argument("--cg-frames", type=int, default=1000,
                        help="frames per CG replica (4 replicas, τ apart) of the generalization set: CG MD with "
                             "bench_cg_chignolin's potential, backmapped (0: none; skipped without that potential)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="evaluate the backmapped trajectories already in the work folder instead of backmapping "
                             "again (CG MD included); their cost per frame is taken from the last recorded run")
    parser.add_argument("--train-only", choices=("temporal", "frame"), default=None,
                        help="train (or retrain) this model, save it and stop: lets the two models train in "
                             "parallel processes")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, a 20 ps test run (100 frames) after 1000 equilibration steps, and "
                             "without bench_cg_chignolin's data a 40 ps training run of its own (AA MD on the "
                             "fastest platform, not Reference); models always retrained, not saved")
    args = parser.parse_args()
    if args.units == "molecule":  # one unit: nothing links units
        args.candidates = 1
    compare_plain = args.candidates != 1
    equilibration_steps, md_platform = 50_000, "Reference"
    if args.quick:
        args.epochs, args.test_ns, equilibration_steps, md_platform = 2, 0.02, 1000, None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = RESULTS / "work_backmap_chignolin"
    work.mkdir(parents=True, exist_ok=True)
    train_path = RESULTS / "work_cg_chignolin" / "aa.h5"
    cln = systems.chignolin("obc2")
    timings = {}
    if not train_path.exists() and args.quick:  # smoke run: a small training set of its own
        train_path = work / "aa_train_0.04ns.h5"
        if not train_path.exists():
            t0 = time.perf_counter()
            simulate_reference(train_path, cln.topology, cln.system, cln.positions, n_steps=20_000,
                               report_interval=100, temperature_K=350.0, equilibration_steps=equilibration_steps,
                               seed=1, platform=md_platform, progress=False)
            timings["train_md_s"] = time.perf_counter() - t0
    if not train_path.exists():
        raise SystemExit(f"{train_path} is missing: run benchmarks/bench_cg_chignolin.py first")
    with AADataset(train_path) as ds:
        train_ns = len(ds.time) * float(np.median(np.diff(ds.time[:]))) / 1000
    test_path = work / f"aa_test_{args.test_ns:g}ns.h5"
    if not test_path.exists():
        t0 = time.perf_counter()
        simulate_reference(test_path, cln.topology, cln.system, cln.positions,
                           n_steps=int(args.test_ns * 500_000) // 100 * 100, report_interval=100,
                           temperature_K=350.0, equilibration_steps=equilibration_steps, seed=77,
                           platform=md_platform, progress=not args.quick)
        timings["test_md_s"] = time.perf_counter() - t0
    mapping = CGMapping.from_preset(cln.topology, "ca")
    with AADataset(test_path) as ds:
        cg = mapping.map_positions(ds.positions[:].astype(np.float64))
        times = ds.time[:]
    np.save(work / "cg_test.npy", cg)

    models = {}
    cutoff = args.environment_cutoff if args.environment_cutoff is not None else (
        0.6 if args.units == "residue" else 0.0)
    width = "" if args.hidden == DEFAULT_HIDDEN else f"_h{args.hidden}"
    unit_tag = "" if args.units == "molecule" else f"_{args.units}"
    tag = unit_tag + width
    base = {"hidden": args.hidden, "units": args.units, "environment_cutoff_nm": cutoff}
    for name, arch in (("temporal", {}), ("frame", {"condition_on_previous": False})):
        if args.train_only not in (None, name):
            continue
        path = work / f"backmapper_{name}{tag}.pt"
        if path.exists() and not args.retrain and not args.quick and args.train_only is None:
            models[name] = TemporalBackmapper.load(path, mapping)
            continue
        t0 = time.perf_counter()
        models[name] = BackmapperTrainer(mapping, train_path, architecture={**base, **arch},
                                         max_epochs=args.epochs, patience=10, batch_size=64,
                                         log=work / f"training_{name}{tag}.csv", seed=0,
                                         rollout_steps=args.rollout_steps if name == "temporal" else 0,
                                         ).fit()
        timings[f"train_{name}_s"] = time.perf_counter() - t0
        if not args.quick:
            models[name].save(path)
    if args.train_only is not None:
        return

    if compare_plain:
        with AADataset(train_path) as ds:  # models trained before format version 4 lack the link geometry
            train_xyz = ds.positions[:].astype(np.float64)
        for model in models.values():
            if not model.has_link_geometry:
                model.fit_link_geometry(train_xyz[: int(0.8 * len(train_xyz))])
    runs = [("temporal", models["temporal"], "model", args.candidates, None),
            ("frame", models["frame"], "model", args.candidates, None),
            ("library", models["temporal"], "library", 1, None)]
    if compare_plain:
        runs += [("temporal_plain", models["temporal"], "model", 1, None),
                 ("frame_plain", models["frame"], "model", 1, None)]
    relaxers = {}
    if args.relax > 0:
        from openmm_backmap.backmap import Relaxer

        for md_steps in args.relax_md:
            name = "temporal_relax" if len(args.relax_md) == 1 else f"temporal_relax_md{md_steps}"
            relaxers[name] = Relaxer(cln.system, mapping, atoms=models["temporal"].atom_indices,
                                     max_iterations=args.relax, md_steps=md_steps, temperature_K=350.0, seed=1)
            runs.append((name, models["temporal"], "model", args.candidates, relaxers[name]))
    n_candidates = models["temporal"].chain(candidates=args.candidates).candidates
    outputs = {}
    recorded = RESULTS / f"backmap_chignolin{'' if args.hidden == DEFAULT_HIDDEN else f'_h{args.hidden}'}.json"
    previous = json.loads(recorded.read_text()) if args.reuse and recorded.exists() else {}
    for name, model, mode, candidates, relax in runs:
        out = work / f"aa_{name}{tag}.dcd"
        sidecar = out.with_suffix(".json")  # the cost of the run that wrote `out`, kept for --reuse
        key = f"backmap_{name}_ms_per_frame"
        if args.reuse and out.exists():
            outputs[name] = out
            stored = json.loads(sidecar.read_text()) if sidecar.exists() else {}
            if key in stored or key in previous.get("timings", {}):
                timings[key] = stored.get(key, previous.get("timings", {}).get(key))
            if relax is not None:
                relax.md_rejected = stored.get("md_rejected")
            continue
        t0 = time.perf_counter()
        xyz = model.backmap_trajectory(cg, seed=1, mode=mode, candidates=candidates, relax=relax, progress=True)
        timings[key] = 1e3 * (time.perf_counter() - t0) / len(cg)
        with AATrajectoryWriter(out, model.topology, dt_ps=0.002) as writer:
            for t, frame in enumerate(xyz):
                writer.write(frame, step=100 * (t + 1), time_ps=float(times[t]))
        outputs[name] = out
        sidecar.write_text(json.dumps({key: timings[key], "md_rejected": None if relax is None else relax.md_rejected}))

    # -- generalization set: CG MD with the force-matched potential, backmapped by both models ------------------
    generalization = None
    pot_path = RESULTS / "work_cg_chignolin" / "potential.pt"
    # HDF5, which stores every frame's step: one τ is left out between replicas, which a DCD cannot do
    reused = [work / f"aa_{name}{tag}.h5" for name in ("generalization", "generalization_frame")
              + (("generalization_relax",) if relaxers else ())]
    gen_sidecar = reused[0].with_suffix(".json")
    if args.reuse and all(p.exists() for p in reused) and gen_sidecar.exists():
        generalization = json.loads(gen_sidecar.read_text())
        outputs.update({p.stem.removeprefix("aa_").removesuffix(tag): p for p in reused})
    elif args.cg_frames > 0 and pot_path.exists() and not args.quick:
        from bench_cg_alanine import run_cg

        from openmm_backmap.potential import CGPotential

        cg_mapping = CGMapping.from_preset(cln.topology, "ca", system=cln.system)  # as the potential was trained
        potential = CGPotential.load(pot_path, mapping=cg_mapping)
        per_frame = int(round(LAG_PS / 0.004))  # 4 fs steps, one frame every τ
        start_frames = np.linspace(0, len(cg) - 1, GENERALIZATION_REPLICAS).astype(int)
        starts = [cg[i] for i in start_frames]
        with AADataset(test_path) as ds:  # the AA frames the CG replicas start from: each chain's first condition
            first_aa = [ds.positions[int(i)].astype(np.float64) for i in start_frames]
        t0 = time.perf_counter()
        frames, info = run_cg(cg_mapping, potential.float(), starts, args.cg_frames * per_frame, 4.0, per_frame,
                              seed=11, temperature_K=350.0)
        timings["cg_md_s"] = time.perf_counter() - t0
        generalization = {"replicas": GENERALIZATION_REPLICAS, "cg_frames": int(frames.shape[0] * frames.shape[1]),
                          "blow_up": info["blow_up"], "potential": str(pot_path)}
        gen_runs = [("generalization", models["temporal"], None), ("generalization_frame", models["frame"], None)]
        if relaxers:  # the temporal chain relaxed as the first relaxed row (a Relaxer of its own: it counts frames)
            gen_runs.append(("generalization_relax", models["temporal"], Relaxer(
                cln.system, mapping, atoms=models["temporal"].atom_indices, max_iterations=args.relax,
                md_steps=args.relax_md[0], temperature_K=350.0, seed=1)))
        for name, model, relax in gen_runs:
            out = work / f"aa_{name}{tag}.h5"
            out.unlink(missing_ok=True)
            with AATrajectoryWriter(out, model.topology, dt_ps=0.004) as writer:
                for r in range(frames.shape[1]):  # replica after replica (one after the other in time), own chains
                    # conditioned on the AA frame the replica started from (BackmapReporter's first_frame), as a
                    # user who starts a CG run from a mapped AA structure would
                    with_start = np.concatenate([starts[r][None], frames[:, r]])  # frame 0: the start, given
                    xyz = model.backmap_trajectory(with_start, seed=r, first_frame_nm=first_aa[r], relax=relax,
                                                   progress=True)[1:]
                    # one τ left out between replicas: no intra-frame velocity is taken across two replicas
                    for t, frame in enumerate(xyz, start=r * (len(xyz) + 1) + 1):
                        writer.write(frame, step=per_frame * t, time_ps=LAG_PS * t)
            outputs[name] = out
            if relax is not None:
                generalization["relax_md_rejected"] = relax.md_rejected
        gen_sidecar.write_text(json.dumps(generalization))

    reports = {}
    t0 = time.perf_counter()
    pairs = [("temporal", "frame"), ("library", "frame")]
    if generalization is not None:
        pairs += [(n, "generalization_frame") for n in ("generalization", "generalization_relax") if n in outputs]
    if compare_plain:
        pairs.append(("temporal_plain", "frame_plain"))
    pairs += [(name, "frame") for name in relaxers]
    for name, baseline in pairs:
        reports[name] = evaluate_run(work / f"report_{name}{tag}", reference=test_path, backmapped=outputs[name],
                                     baseline=outputs[baseline], mapping=mapping,
                                     title=f"chignolin (Cα map): {name} vs frame-based")
    timings["evaluate_s"] = time.perf_counter() - t0
    chains = {}
    for w in [args.hidden, *args.latency_against]:
        model = models["temporal"] if w == args.hidden else TemporalBackmapper.load(
            work / f"backmapper_temporal{unit_tag}{'' if w == DEFAULT_HIDDEN else f'_h{w}'}.pt",
            mapping)
        for m in sorted({n_candidates, 1}, reverse=True):
            chains[f"{w} wide, {m} draw{'s' if m > 1 else ''}"] = model.chain(seed=1, candidates=m)
    latency = step_latency_ms(chains, cg)
    rows = {}
    for name, rep in reports.items():
        for row in rep["metrics"]:
            if row["key"] in KEYS:
                rows.setdefault(row["key"], {})[f"{name}:{row['subject']}"] = (row["value"], row["target"],
                                                                              row["passed"])
    record = {"units": args.units, "hidden": args.hidden, "environment_cutoff_nm": cutoff, "train_data": str(train_path), "train_ns": train_ns, "test_ns": args.test_ns,
              "test_frames": int(len(cg)), "lag_ps": LAG_PS,
              "epochs": {n: m.metadata.get("epochs") for n, m in models.items()},
              "rollout_steps": {n: m.metadata.get("rollout_steps") for n, m in models.items()},
              "candidates": n_candidates, "metrics": rows,
              "relax": None if not relaxers else {"max_iterations": args.relax, "md_steps": args.relax_md,
                                                     "temperature_K": 350.0, "friction_per_ps": 10.0,
                                                     "timestep_ps": 0.002, "md_rejected": {n: r.md_rejected for n, r in relaxers.items()},
                                                     "frames": int(len(cg))},
              "generalization": generalization, "latency": latency, "timings": timings, "quick": args.quick}
    lines = ["| metric | subject | value | target | met |", "|---|---|---|---|---|"]
    for key, cells in rows.items():
        for subject, (value, target, passed) in cells.items():
            mark = "–" if passed is None else ("✓" if passed else "✗")
            lines.append(f"| {key} | {subject} | {value:.4g} | {target or '–'} | {mark} |")
    source = "`cg_chignolin`" if train_path.parent.name == "work_cg_chignolin" else "a short run of its own"
    try:
        reports_dir = work.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        reports_dir = work
    md_text = (
        f"Chignolin, Cα map (10 beads → 138 atoms), 350 K. Trained on the {train_ns:g} ns AA reference of {source} "
        f"(frames every 0.2 ps, {models['temporal'].metadata['pairs']['train']} training pairs); tested on an "
        f"independent {args.test_ns:g} ns run ({len(cg)} frames, τ = 0.2 ps), backmapped autoregressively. "
        f"Units: {'one per residue, framed by the neighbouring Cα' if args.units == 'residue' else 'the whole chain'}"
        f", networks {args.hidden} wide"
        f"{f', environment {cutoff:g} nm' if cutoff else ''}. `temporal` rows compare "
        "the temporal VAE (and, as `baseline`, the frame-based model); `library` rows the library lookup"
        + (f". Both models decode every residue from {n_candidates} latent draws and keep one along the chain by "
           "the bonds between residues (`candidates`, the default for residue units)" if n_candidates > 1 else "")
        + ("; `temporal_plain` rows compare both with one draw" if compare_plain else "")
        + (f"; `temporal_relax` rows are the temporal chain with every frame minimised with the AA System (at most "
           f"{args.relax} L-BFGS iterations, beads held)"
           + (f" and then run {' or '.join(map(str, args.relax_md))} restrained Langevin steps at 350 K (2 fs, 10/ps; "
              "`_md<STEPS>`)" if any(args.relax_md) else "")
           + ", against the unrelaxed frame-based baseline" if relaxers else "")
        + (f"; `generalization` rows: {generalization['cg_frames']} frames of CG MD ({GENERALIZATION_REPLICAS} "
           f"replicas, 4 fs, 350 K, a frame every τ) with the force-matched potential of `cg_chignolin` "
           "(priors + SchNet, constraint-aware force map), backmapped by the temporal model (each replica's chain "
           "conditioned first on the AA frame the replica started from) and, as baseline, by the frame-based one"
           + ("; `generalization_relax` rows: the temporal chain relaxed as in the first relaxed row"
              if "generalization_relax" in outputs else "")
           + "; only distributions can be compared"
           + (f" (the CG run blew up: {generalization['blow_up']})" if generalization["blow_up"] else "")
           if generalization is not None else "")
        + ".\n\n"
        + "\n".join(lines) + "\n\n"
        "Backmapping cost per frame (ms, one thread): "
        + ", ".join(f"{n} {timings[f'backmap_{n}_ms_per_frame']:.2f}" for n, *_ in runs
                    if f"backmap_{n}_ms_per_frame" in timings) + ". "
        "One chain step with the model loaded (target ≤ 20 ms; median and 90th percentile of "
        f"{LATENCY_STEPS} steps, the models taking turns in blocks of {LATENCY_BLOCK}): "
        + ", ".join(f"{n} {v['median_ms']:.1f} ms (p90 {v['p90_ms']:.1f})" for n, v in latency.items()) + ". "
        f"Full reports: `{reports_dir}/report_*/report.html`.\n"
    )
    save(f"backmap_chignolin{width}", record, md_text)
    print(md_text)
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
