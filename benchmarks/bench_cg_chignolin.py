"""Force-matched CG chignolin (Cα map, OBC2, 350 K): stability and distance distributions (issue 4).

AA reference (amber14 + OBC2 at 350 K, from the extended chain) -> 10-bead Cα map -> priors + SchNet ->
replicas of CG Langevin dynamics (TorchForce, 4 fs) -> blow-ups, and the Jensen–Shannon divergence of every
bead-pair distance distribution against the mapped AA data (and of the end-to-end distance).

Training forces are mapped with the beads' net forces (``--force-map constraint-aware``, the default) or the
least-noise consistent force map (``optimized``); a potential of the other map found in the work folder is run
beside it (see bench_cg_alanine.py). Recorded run: ``--aa-ns 3 --force-map constraint-aware --train-only``, then
``--aa-ns 3 --force-map optimized``.

    python benchmarks/bench_cg_chignolin.py [--aa-ns 10] [--replicas 8] [--steps 250000] [--force-map MAP] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save  # noqa: E402
from bench_cg_alanine import DEFAULT_FORCE_MAP, FORCE_MAPS, run_cg  # noqa: E402

from openmm_backmap import metrics, systems  # noqa: E402
from openmm_backmap.data import CGDataset, simulate_reference  # noqa: E402
from openmm_backmap.mapping import CGMapping, map_dataset  # noqa: E402
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aa-ns", type=float, default=10.0)
    parser.add_argument("--train-frames", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250_000)
    parser.add_argument("--dt-fs", type=float, default=4.0)
    parser.add_argument("--equilibration-steps", type=int, default=50_000, help="AA steps before the first frame")
    parser.add_argument("--work", type=Path, default=RESULTS / "work_cg_chignolin")
    parser.add_argument("--force-map", choices=FORCE_MAPS, default=DEFAULT_FORCE_MAP,
                        help="force map of the training data (see bench_cg_alanine.py)")
    parser.add_argument("--train-only", action="store_true", help="stop after training (and saving) the potential")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 20 ps of AA data (100 frames) after 2000 equilibration steps, 2 epochs, "
                             "2 replicas × 2000 CG steps; the potential is always retrained")
    args = parser.parse_args()
    if args.quick:
        args.aa_ns, args.equilibration_steps, args.epochs, args.replicas, args.steps = 0.02, 2000, 2, 2, 2000
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    ts = systems.chignolin("obc2")
    n_steps = int(args.aa_ns * 500_000) // 100 * 100
    aa = simulate_reference(work / "aa.h5", ts.topology, ts.system, ts.positions, n_steps=n_steps,
                            report_interval=100, temperature_K=350.0, equilibration_steps=args.equilibration_steps,
                            append=True, seed=1, progress=not args.quick)
    mapping = CGMapping.from_preset(ts.topology, "ca", system=ts.system)
    if args.force_map == "optimized":
        mapping = mapping.with_optimized_force_map(aa)

    def tag(force_map: str) -> str:
        return "" if force_map == "constraint-aware" else f"_{force_map}"

    cg_path = map_dataset(aa, mapping, work / f"cg{tag(args.force_map)}.h5", overwrite=True)
    with CGDataset(cg_path) as cg:
        ref = cg.positions[:].astype(np.float64)
    model_path = work / f"potential{tag(args.force_map)}.pt"
    if model_path.exists() and not args.quick:
        full = CGPotential.load(model_path, mapping=mapping)
    else:
        full = ForceMatchingTrainer(mapping, cg_path, max_epochs=args.epochs, patience=6, max_frames=args.train_frames,
                                    batch_size=256, learning_rate=2e-3, log=work / f"training{tag(args.force_map)}.csv",
                                    seed=0).fit()
        full.save(model_path)
    if args.train_only:
        print(f"trained: {model_path}", full.metadata.get("val_force_mse"), full.metadata.get("priors_only_val_force_mse"))
        return
    models = {f"priors + SchNet, {args.force_map} force map": full}
    for other in FORCE_MAPS:  # the other map's potential too, if trained: side by side in one run
        path = work / f"potential{tag(other)}.pt"
        if other != args.force_map and path.exists() and not args.quick:
            models[f"priors + SchNet, {other} force map"] = CGPotential.load(path, mapping=mapping)
    models["priors only"] = full.priors_only()

    pairs = np.array(list(combinations(range(mapping.n_beads), 2)))
    ref_d = metrics.distances(ref, pairs)
    rng = np.random.default_rng(0)
    starts = [ref[i] for i in rng.choice(len(ref), size=args.replicas, replace=False)]
    results = {}
    for label, model in models.items():
        frames, info = run_cg(mapping, model.float(), starts, args.steps, args.dt_fs, 250, seed=2, temperature_K=350.0)
        xyz = frames.reshape(-1, mapping.n_beads, 3) if len(frames) else np.zeros((0, mapping.n_beads, 3))
        row = {**info, "frames": len(xyz)}
        if len(xyz) > 10:
            d = metrics.distances(xyz, pairs)
            jsd = [metrics.histogram_jsd(ref_d[:, k], d[:, k], bins=100) for k in range(len(pairs))]
            row.update(distance_jsd_mean=float(np.mean(jsd)), distance_jsd_max=float(np.max(jsd)),
                       end_to_end_jsd=jsd[len(pairs) - 1] if pairs[-1].tolist() == [0, mapping.n_beads - 1]
                       else metrics.histogram_jsd(ref_d[:, 8], d[:, 8]),
                       bonded_jsd_max=float(max(j for j, (a, b) in zip(jsd, pairs) if b == a + 1)))
        results[label] = row
        print(label, {k: v for k, v in row.items() if k != "blow_up"}, row["blow_up"], flush=True)

    md = [f"AA reference: {args.aa_ns} ns of chignolin (GYDPETGTWG, amber14 + OBC2, 350 K, from the extended chain), "
          f"{len(ref)} frames mapped to the 10-bead Cα model. CG: {args.replicas} replicas × {args.steps} steps at "
          f"{args.dt_fs} fs, Langevin 350 K, TorchForce on Reference.", "",
          "| model | blow-ups | mean / max JSD over the 45 Cα–Cα distance distributions | max JSD, Cα(i)–Cα(i+1) | "
          "CG steps/s |", "|---|---|---|---|---|"]
    for label, r in results.items():
        if "distance_jsd_mean" in r:
            md.append(f"| {label} | {'0' if r['blow_up'] is None else '1 (' + r['blow_up'][:60] + ')'} | "
                      f"{r['distance_jsd_mean']:.3f} / {r['distance_jsd_max']:.3f} | {r['bonded_jsd_max']:.3f} | "
                      f"{r['steps_per_s']:.0f} |")
        else:
            md.append(f"| {label} | {r['blow_up']} | – | – | – |")
    md.append(f"\nValidation force MSE ({args.force_map} force map targets): priors only {full.metadata.get('priors_only_val_force_mse', float('nan')):.0f}, "
              f"priors + SchNet {full.metadata.get('val_force_mse', float('nan')):.0f} (kJ/mol/nm)²; wall time "
              f"{time.perf_counter() - t_start:.0f} s. A {args.aa_ns} ns reference from an extended chain does not "
              "sample chignolin's folding equilibrium; the comparison is with the sampled ensemble.\n")
    save("cg_chignolin", {"settings": vars(args) | {"work": str(args.work)}, "results": results}, "\n".join(md))


if __name__ == "__main__":
    main()
