"""Molecular liquids end to end (issue 6): CG potentials, size transfer, backmapping, baselines, speed.

AA reference data come from ``benchmarks/liquid_data.py`` (CHARMM36/CGenFF, PME, NPT-equilibrated at 300 K and
1 bar, then NVT production with forces): ``results/work_liquids/aa_<liquid>.h5``. For every liquid and map:

* **CG potential** (priors + SchNet, force matching on the first 80 % of the frames) exported as a TorchForce
  and run with Langevin dynamics in the AA box: temperature and potential-energy traces, blow-ups, drift, the
  centre-of-mass g(r) L1 distance against the mapped AA reference (0–1.2 nm) and, for multi-bead maps, the CG
  bond/angle distribution JSDs. For benzene's one-bead map, trained with and without the energy term of seed 004
  eq. 6. **Size transfer**: the same potential transferred to the 2×2×2 tiled box (8× the molecules) and run.
* **Backmapping** of the held-out last 20 % of the AA frames (mapped to CG), autoregressively, with the temporal
  model (local environment + previous frame), the frame-based baseline (local environment, no previous frame),
  the library lookup and the kNN regression of seed 000: intermolecular clash score, intermolecular C–C g(r)
  L1 distance, per-molecule Lennard-Jones energy JSD (DBM Fig. 4), bond score, intra-frame velocity JSD.
* **Speed**: latency of backmapping one frame for boxes of about 300, 1200 and 3600 molecules (tiled), and CG vs
  AA simulated ns/day on this machine, side by side.

    python benchmarks/bench_liquids.py [--liquids benzene] [--sections cg,backmap,speed] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, save  # noqa: E402

import openmm  # noqa: E402
import openmm.app as app  # noqa: E402
from openmm import unit as u  # noqa: E402

from openmm_backmap import metrics, systems  # noqa: E402
from openmm_backmap.backmap import BackmapperTrainer, Relaxer, TemporalBackmapper  # noqa: E402
from openmm_backmap.data import AADataset, CGDataset  # noqa: E402
from openmm_backmap.mapping import CGMapping, map_dataset  # noqa: E402
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system  # noqa: E402
from openmm_backmap.reporters import CGRunGuard, SimulationBlowUp  # noqa: E402
from openmm_backmap._physics import BOLTZMANN_KJ_MOL_K  # noqa: E402

WORK = RESULTS / "work_liquids"
#: Per liquid: (map label, mapping preset, CG time step in fs, {energy weight: CG run length in ps}, network, priors).
#: Network sizes follow seed 004 (cutoff 8 Å for one bead per molecule, 6 Å for three) at a width that keeps a
#: step of the 300-molecule box near 10 ms (1-bead) on one core; the excluded-volume prior gets a cutoff so it is
#: neighbour-searched (linear in the box). The forces-only one-bead model runs shorter: it tests stability only.
SMALL_NET = {"hidden": 32, "n_interactions": 2, "n_rbf": 16}
#: Default excluded-volume wall (1 kT at the 0.1 % quantile of the pair distances). A wall at 3 kT at the 1 %
#: quantile was tried and is wrong for liquids: in a box the quantile runs over all pairs within the cutoff, so
#: it sits inside the first neighbour shell and the prior fights the data (force MSE 100x worse).
WALL: dict = {}
CASES = {
    "benzene": [("1-bead", "molecule", 8.0, {0.1: 1000.0, 0.0: 1000.0}, {**SMALL_NET, "cutoff_nm": 0.8},
                 {"cutoff_nm": 1.0, **WALL}),
                ("3-bead", "benzene-3bead", 4.0, {0.01: 50.0}, {**SMALL_NET, "cutoff_nm": 0.6},
                 {"cutoff_nm": 0.6, **WALL})],
    "hexane": [("3-bead", "hexane-3bead", 4.0, {0.0: 50.0, 0.01: 50.0}, {**SMALL_NET, "cutoff_nm": 0.6},
                {"cutoff_nm": 0.6, **WALL})],
    "cumene": [("3-bead", "cumene-3bead", 4.0, {0.01: 50.0}, {**SMALL_NET, "cutoff_nm": 0.6},
                {"cutoff_nm": 0.6, **WALL})],
}
#: L-BFGS iterations of the Relaxer per map (default: the Relaxer's 200). Minimising overshoots below the thermal
#: LJ energies when a molecule can rotate freely under its one bead: one-bead benzene, 60 held-out frames, LJ JSD
#: 0.035 / 0.020 / 0.093 after 25 / 50 / 100 iterations (median shift +1.3 / -1.0 / -2.1 kJ/mol). Hexane needs 200
#: (LJ JSD 0.099 / 0.056 / 0.032 after 50 / 100 / 200).
RELAX_ITERATIONS = {"1-bead": 50}
#: Row label of the models that draw z from seed 003's single latent mixture.
MIXTURE = "seed's single latent mixture"
#: Precision of the CG runs: float32, as a user would run the TorchForce, and 1.6-1.8x faster than float64 on one
#: core (900-bead benzene: 31-39 against 55-62 ms per step). Runs recorded before 2026-11-22 (one-bead benzene,
#: cumene, hexane up to 250 ps) used float64.
CG_DTYPE = torch.float32
TARGETS = {"com_rdf_l1_nm": 0.05, "bonded_jsd": 0.02, "clash": 0.001, "cc_rdf_l1_nm": 0.05, "lj_jsd": 0.05,
           "bond_score": 0.99, "velocity_ratio": 1 / 3, "latency_300_ms": 100.0}


# ----------------------------------------------------------------------------------------------- helpers
def r_max(box: np.ndarray) -> float:
    """g(r) range: 1.2 nm (the targets' range), or less than half the box in small (quick) boxes."""
    box = np.asarray(box).reshape(-1, 3, 3)
    return float(min(1.2, 0.49 * np.diagonal(box, axis1=1, axis2=2).min()))


def com_rdf(xyz_beads: np.ndarray, box: np.ndarray, units: np.ndarray, masses: np.ndarray, rmax: float = 1.2):
    """Centre-of-mass g(r) of molecules from bead coordinates (molecules made whole by the caller)."""
    w = masses[units] / masses[units].sum(axis=1, keepdims=True)
    com = (xyz_beads[:, units] * w[None, ..., None]).sum(axis=2)
    idx = np.arange(com.shape[1])
    return metrics.radial_distribution(com, box, idx, idx, r_max_nm=rmax, n_bins=int(round(rmax * 100)))


def bead_units(mapping) -> np.ndarray:
    from openmm_backmap._units import UnitLayout

    kinds = UnitLayout(mapping).kinds
    if len(kinds) != 1:
        raise ValueError("a neat liquid has one kind of molecule")
    return kinds[0].bead_index


def run_cg(mapping, potential, start_nm, box, *, n_steps, dt_fs, report_ps=1.0, seed=1, temperature_K=300.0,
           checkpoint=None, checkpoint_ps=20.0):
    """Langevin CG MD with the TorchForce on the Reference platform; frames, traces and blow-up info.

    With ``checkpoint`` (a path stem), the run saves its state (OpenMM state XML) and what it has recorded every
    ``checkpoint_ps`` and, started again with the same stem, model and settings, goes on from there: a 1 ns run
    of a 900-bead box takes longer than one working session. ``seconds`` counts only time spent stepping.
    """
    system = create_cg_system(mapping, potential, box_vectors_nm=box)
    integrator = openmm.LangevinMiddleIntegrator(temperature_K * u.kelvin, 1 / u.picosecond, dt_fs * u.femtosecond)
    integrator.setRandomNumberSeed(seed)
    top = app.Topology()
    chain = top.addChain()
    for units in bead_units(mapping):
        res = top.addResidue("CG", chain)
        for b in units:
            top.addAtom(mapping.bead_names[b], app.Element.getBySymbol("C"), res)
    top.setPeriodicBoxVectors(box * u.nanometer)
    sim = app.Simulation(top, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPeriodicBoxVectors(*box)
    sim.context.setPositions(start_nm)
    sim.context.setVelocitiesToTemperature(temperature_K * u.kelvin, seed)
    every = max(1, int(round(report_ps * 1000 / dt_fs)))
    dof = 3 * system.getNumParticles() - 3
    frames, temps, energies, blew, seconds = [], [], [], None, 0.0
    # What a checkpoint must match to be resumed: the model's parameters and the run's settings.
    signature = np.array([n_steps, dt_fs, every, seed, temperature_K, system.getNumParticles(),
                          float(sum(p.double().sum() for p in potential.state_dict().values()
                                    if p.is_floating_point()))])
    if checkpoint is not None:
        state_file, data_file = Path(f"{checkpoint}.state.xml"), Path(f"{checkpoint}.npz")
        if state_file.exists() and data_file.exists():
            saved = np.load(data_file)
            if saved["signature"].shape == signature.shape and np.allclose(saved["signature"], signature):
                sim.loadState(str(state_file))
                frames, temps, energies = list(saved["frames"]), list(saved["temps"]), list(saved["energies"])
                seconds = float(saved["seconds"])
                sim.currentStep = len(frames) * every
                print(f"resuming {checkpoint} at {sim.currentStep * dt_fs / 1000:g} ps", flush=True)
            else:
                print(f"{checkpoint}: checkpoint of another model or settings, starting afresh", flush=True)
    sim.reporters.append(CGRunGuard(every, max_temperature_K=3 * temperature_K, max_energy_rise_kj_mol=1e5))
    save_every = max(1, int(round(checkpoint_ps * 1000 / dt_fs)) // every)
    t0 = time.perf_counter()
    try:
        for i in range(len(frames), n_steps // every):
            sim.step(every)
            st = sim.context.getState(getPositions=True, getEnergy=True)
            frames.append(st.getPositions(asNumpy=True).value_in_unit(u.nanometer))
            temps.append(2 * st.getKineticEnergy().value_in_unit(u.kilojoule_per_mole) / (dof * BOLTZMANN_KJ_MOL_K))
            energies.append(st.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole))
            if checkpoint is not None and (i + 1) % save_every == 0:
                elapsed = seconds + time.perf_counter() - t0
                sim.saveState(f"{checkpoint}.state.xml.tmp")
                np.savez(f"{checkpoint}.tmp.npz", signature=signature, frames=np.array(frames, dtype=np.float32),
                         temps=np.array(temps), energies=np.array(energies), seconds=elapsed)
                Path(f"{checkpoint}.state.xml.tmp").replace(f"{checkpoint}.state.xml")
                Path(f"{checkpoint}.tmp.npz").replace(f"{checkpoint}.npz")
                print(f"{checkpoint}: {sim.currentStep * dt_fs / 1000:g} ps, {elapsed / 60:.1f} min, "
                      f"{temps[-1]:.1f} K", flush=True)
    except SimulationBlowUp as exc:
        blew = str(exc)
    seconds += time.perf_counter() - t0
    temps, energies = np.array(temps), np.array(energies)
    info = {"blow_up": blew, "steps_done": int(sim.currentStep), "ps": sim.currentStep * dt_fs / 1000,
            "seconds": seconds, "steps_per_s": sim.currentStep / seconds, "ns_per_day": sim.currentStep * dt_fs
            * 1e-6 / seconds * 86400, "temperature_trace_K": temps.round(2).tolist(),
            "energy_trace_kj_mol": energies.round(2).tolist()}
    if len(temps) >= 10:
        n = max(1, len(temps) // 10)
        info.update(temperature_mean_K=float(temps[len(temps) // 2:].mean()),
                    temperature_drift_K=float(temps[-n:].mean() - temps[:n].mean()),
                    energy_drift_sigma=float((energies[-n:].mean() - energies[:n].mean()) / (energies.std() + 1e-9)))
    return np.array(frames), info


def bonded_jsds(mapping, ref, xyz):
    """JSD of every intramolecular bond and angle type, pooled over the molecules of the box (worst type).

    A type is a bond or angle of the first molecule, in bead positions within the molecule; its samples are
    that bond or angle in every molecule and frame. (Per single bond, a 50-ps run gives too few samples for a
    100-bin histogram: the JSD of two samples of one distribution would be far above the target.)
    """
    units = bead_units(mapping)
    where = {int(b): (m, j) for m, row in enumerate(units) for j, b in enumerate(row)}
    bonds = np.array([[b[0].index, b[1].index] for b in mapping.cg_topology.bonds])
    if len(bonds) == 0:
        return {}
    from openmm_backmap.potential.priors import angles_from_bonds

    out, detail = {}, {}
    for term, idx, measure in (("bond", bonds, metrics.distances), ("angle", angles_from_bonds(bonds),
                                                                       metrics.angles)):
        first = [t for t in np.asarray(idx) if all(where[int(b)][0] == 0 for b in t)]
        if not first:
            continue
        for t in first:
            local = [where[int(b)][1] for b in t]
            a, b = measure(ref, units[:, local]).ravel(), measure(xyz, units[:, local]).ravel()
            detail[f"{term} {'-'.join(mapping.bead_names[int(x)] for x in t)}"] = {
                "jsd": float(metrics.histogram_jsd(a, b)), "reference_mean": float(a.mean()),
                "reference_std": float(a.std()), "cg_mean": float(b.mean()), "cg_std": float(b.std())}
        out[f"{term}_jsd_max"] = max(v["jsd"] for k, v in detail.items() if k.startswith(term))
    out["bonded_types"] = detail
    return out


def load_liquid(name: str):
    path = WORK / f"aa_{name}.h5"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run benchmarks/liquid_data.py first")
    ds = AADataset(path)
    return ds, path


# ------------------------------------------------------------------------------------------------ CG potential
def section_cg(name: str, args) -> dict:
    ds, path = load_liquid(name)
    top = ds.topology
    ds.close()
    results = {}
    for label, preset, dt_fs, weights, network, priors in CASES[name]:
        if args.maps and label not in args.maps.split(","):
            continue
        if args.weights:
            weights = {float(w): weights.get(float(w), max(weights.values())) for w in args.weights.split(",")}
        mapping = CGMapping.from_preset(top, preset)
        cg_path = WORK / f"cg_{name}_{label}.h5"
        if not cg_path.exists():  # mapped once (several processes may run cases of one map)
            map_dataset(path, mapping, cg_path, progress=False)
        with CGDataset(cg_path) as cg:
            ref = cg.positions[:].astype(np.float64)
            box = cg.box_vectors[0].astype(np.float64)
        units = bead_units(mapping)
        masses = np.asarray(mapping.bead_masses, dtype=np.float64)
        rmax = r_max(box)
        r, g_ref = com_rdf(ref, box, units, masses, rmax)
        for lam in weights:
            key = f"{label}, energy weight {lam:g}"
            model_path = WORK / f"potential_{name}_{label}_lambda{lam:g}.pt"
            if model_path.exists() and not args.retrain:
                pot = CGPotential.load(model_path, mapping=mapping)
                train_s = None
            else:
                t0 = time.perf_counter()
                pot = ForceMatchingTrainer(mapping, cg_path, network=network, priors=priors, energy_weight=lam,
                                           max_epochs=args.cg_epochs, patience=args.cg_patience,
                                           max_frames=None if label == "1-bead" else args.cg_frames_multibead,
                                           batch_size=8, learning_rate=1e-3,
                                           log=WORK / f"potential_{name}_{label}_lambda{lam:g}.csv", seed=0,
                                           progress=False).fit()
                train_s = time.perf_counter() - t0
                pot.save(model_path)
            steps = int((args.cg_ps or weights[lam]) * 1000 / dt_fs)
            frames, info = run_cg(mapping, pot.to(CG_DTYPE), ref[-1], box, n_steps=steps, dt_fs=dt_fs,
                                  checkpoint=WORK / f"cgrun_{name}_{label}_lambda{lam:g}_{steps}steps")
            row = {**info, "train_seconds": train_s, "val_force_mse": pot.metadata.get("val_force_mse"),
                   "priors_only_val_force_mse": pot.metadata.get("priors_only_val_force_mse"),
                   "epochs": pot.metadata.get("epochs")}
            if len(frames) > 20:
                xyz = frames[len(frames) // 5:]
                xyz = mapping_whole(mapping, xyz, box, units)
                _, g = com_rdf(xyz, box, units, masses, rmax)
                row["com_rdf_l1_nm"] = float(metrics.rdf_l1_nm(r, g_ref, g))
                row["com_rdf"] = {"r_nm": r.round(4).tolist(), "reference": g_ref.round(4).tolist(),
                                  "cg": g.round(4).tolist()}
                row.update(bonded_jsds(mapping, ref, xyz))
            results[key] = row
            print(name, key, {k: v for k, v in row.items() if not isinstance(v, (list, dict))}, flush=True)
            if (lam == max(weights) and args.transfer_ps > 0 or args.quick) and info["blow_up"] is None:
                stem = WORK / f"transfer_{name}_{label}_lambda{lam:g}_{int(args.transfer_ps * 1000 / dt_fs)}steps"
                results[key]["size_transfer"] = size_transfer(mapping, pot, ref[-1], box, dt_fs, args, r, g_ref,
                                                              top, preset, checkpoint=stem)
                print(name, key, "size transfer", {k: v for k, v in results[key]["size_transfer"].items()
                                                   if not isinstance(v, (list, dict))}, flush=True)
    return results


def mapping_whole(mapping, xyz, box, units):
    """Bead frames with every molecule's beads made whole (minimum image to its first bead)."""
    out = xyz.copy()
    L = np.diag(box)
    first = out[:, units[:, :1]]
    d = out[:, units] - first
    out[:, units] = first + d - np.round(d / L) * L
    return out


def size_transfer(mapping, pot, start, box, dt_fs, args, r, g_ref, top, preset, checkpoint=None) -> dict:
    big_top, _, big_box = systems.replicate(top, np.zeros((top.getNumAtoms(), 3)), box, (2, 2, 2))
    big_mapping = CGMapping.from_preset(big_top, preset)
    big = pot.transfer(big_mapping)
    shifts = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)]) @ box
    big_start = np.concatenate([start + s for s in shifts])
    steps = int(args.transfer_ps * 1000 / dt_fs)
    frames, info = run_cg(big_mapping, big.to(CG_DTYPE), big_start, big_box, n_steps=steps, dt_fs=dt_fs, seed=3,
                          checkpoint=checkpoint)
    units = bead_units(big_mapping)
    row = {**{k: v for k, v in info.items()}, "molecules": int(len(units))}
    if len(frames) > 10:
        xyz = mapping_whole(big_mapping, frames[len(frames) // 5:], big_box, units)
        _, g = com_rdf(xyz, big_box, units, np.asarray(big_mapping.bead_masses, dtype=np.float64), float(r[-1] + r[0]))
        row["com_rdf_l1_nm"] = float(metrics.rdf_l1_nm(r, g_ref, g))
        row["com_rdf"] = {"r_nm": r.round(4).tolist(), "cg": g.round(4).tolist()}
    return row


# ------------------------------------------------------------------------------------------------ backmapping
def backmap_metrics(xyz, ref_xyz, box, top, system, lag_ps, bonds, ref_len, lj_ref=None) -> dict:
    """Metrics of backmapped liquid frames against the reference frames (same CG trajectory)."""
    out = {"bond_score": float(metrics.bond_score(xyz, bonds, ref_len)),
           "clash_inter": float(metrics.clash_score(xyz, top, groups="residue", scope="inter",
                                                     box_vectors_nm=box))}
    rmax = r_max(box)
    n_bins = int(round(rmax * 100))
    r, g_ref = metrics.intermolecular_rdf(ref_xyz, box, top, element="C", r_max_nm=rmax, n_bins=n_bins)
    _, g = metrics.intermolecular_rdf(xyz, box, top, element="C", r_max_nm=rmax, n_bins=n_bins)
    out["cc_rdf_l1_nm"] = float(metrics.rdf_l1_nm(r, g_ref, g))
    lj = metrics.molecule_lj_energies(xyz, system, top, box_vectors_nm=box)
    if lj_ref is None:
        lj_ref = metrics.molecule_lj_energies(ref_xyz, system, top, box_vectors_nm=box)
    d = metrics.energy_distribution(lj_ref.ravel(), lj.ravel())
    out["lj_jsd"], out["lj_shift_kj_mol"] = float(d["jsd"]), float(d["mean_shift_kj_mol"])
    # the mean is dominated by rare overlapping atoms (hydrogens count in LJ, not in the clash score): report the
    # median shift and the fraction of molecules above the highest reference value as well
    out["lj_median_shift_kj_mol"] = float(np.median(lj) - np.median(lj_ref))
    out["lj_overlap_fraction"] = float((lj > lj_ref.max()).mean())
    if lag_ps:
        out["velocity_jsd"] = float(metrics.velocity_jsd(ref_xyz, xyz, lag_ps))
    out["rmsd_nm"] = float(np.sqrt(((xyz - ref_xyz) ** 2).sum(-1).mean()))
    return out, lj_ref, (r, g_ref, g)


def section_backmap(name: str, args) -> dict:
    from openmm_backmap.backmap import KNNRegressionBaseline

    ds, path = load_liquid(name)
    n_frames = ds.n_frames
    n_train = int(0.8 * n_frames)
    test = np.arange(n_train, n_frames)[: args.test_frames]
    ref_xyz = ds.positions[test].astype(np.float64)
    box_t = ds.box_vectors[test].astype(np.float64)
    top, system = ds.topology, ds.system
    spacing = float(np.median(np.diff(ds.time[:10])))
    ds.close()
    mdtop = __import__("mdtraj").Topology.from_openmm(top)
    bonds = np.array([[b[0].index, b[1].index] for b in mdtop.bonds])
    results = {}
    for label, preset, *_ in CASES[name]:
        if args.maps and label not in args.maps.split(","):
            continue
        mapping = CGMapping.from_preset(top, preset)
        ref_whole = mapping.make_molecules_whole(ref_xyz, box_t)
        ref_len = metrics.bond_reference_lengths(ref_whole, bonds)
        cg = mapping.map_positions(ref_whole)
        # The seed's recipe (one latent mixture) is trained first; the default models (conditional latent prior)
        # are the same networks with the prior fitted afterwards, which is what BackmapperTrainer.fit() gives.
        models = {}
        for kind, previous in (("temporal", True), ("frame-based", False)):
            model_path = WORK / f"backmapper_{name}_{label}_{kind}.pt"
            mixture = f"{kind}, {MIXTURE}"
            if model_path.exists() and not args.retrain:
                models[mixture] = TemporalBackmapper.load(model_path, mapping)
            else:
                t0 = time.perf_counter()
                trainer = BackmapperTrainer(
                    mapping, path, energy=None, stride=args.stride, lag_frames=1, max_frames=n_train // args.stride,
                    architecture={"hidden": 256, "latent_dim": 16, "condition_on_previous": previous,
                                  "environment_cutoff_nm": 0.6, "latent_prior": "mixture"},
                    batch_size=4, max_epochs=args.bm_epochs, patience=5,
                    rollout_steps=args.bm_rollout if previous else 0,
                    n_blocks=5, library_size=500, seed=0, log=WORK / f"backmapper_{name}_{label}_{kind}.csv",
                    progress=False)
                models[mixture] = trainer.fit()
                models[mixture].metadata["train_seconds"] = time.perf_counter() - t0
                models[mixture].save(model_path)
            model_path = WORK / f"backmapper_{name}_{label}_{kind}_conditional.pt"
            if model_path.exists() and not args.retrain:
                models[kind] = TemporalBackmapper.load(model_path, mapping)
                continue
            trainer = BackmapperTrainer(mapping, path, energy=None, stride=args.stride, lag_frames=1,
                                        max_frames=n_train // args.stride, n_blocks=5, seed=0, progress=False)
            models[kind] = trainer.fit_latent_prior(models[mixture])
            models[kind].save(model_path)
        lag_ps = spacing * args.stride
        sel = np.arange(0, len(test), args.stride)
        ref_s, box_s, cg_s = ref_whole[sel], box_t[sel], cg[sel]
        rows, lj_ref, rdfs = {}, None, {}
        # Every chain starts from the first reference frame, as a CG run started from an AA structure does (the
        # library pick would give one-bead molecules random orientations, i.e. clashes, that the chain inherits).
        first = ref_s[0][models["temporal"].atom_indices]
        outputs = {kind: model.backmap_trajectory(cg_s, box_s, seed=0, first_frame_nm=first)
                   for kind, model in models.items()}
        outputs["library"] = models["temporal"].backmap_trajectory(cg_s, box_s, seed=0, mode="library",
                                                                   first_frame_nm=first)
        # the temporal chain with every frame minimised with the AA force field, beads held (Relaxer defaults)
        relaxer = Relaxer(system, mapping, atoms=models["temporal"].atom_indices,
                          max_iterations=RELAX_ITERATIONS.get(label, 200))
        t0 = time.perf_counter()
        outputs["temporal + relax"] = models["temporal"].backmap_trajectory(cg_s, box_s, seed=0, first_frame_nm=first,
                                                                            relax=relaxer)
        relax_seconds = (time.perf_counter() - t0) / max(1, len(sel) - 1)
        knn = KNNRegressionBaseline(mapping).fit(path, frames=np.arange(0, n_train, max(1, n_train // 400)))
        outputs["kNN regression (seed 000)"] = knn.backmap(cg_s, box_s)
        for kind, xyz in outputs.items():
            rows[kind], lj_ref, rdfs[kind] = backmap_metrics(xyz, ref_s, box_s, mdtop, system, lag_ps, bonds,
                                                             ref_len, lj_ref)
            print(name, label, kind, rows[kind], flush=True)
        rows["velocity_ratio_temporal_vs_frame_based"] = rows["temporal"]["velocity_jsd"] / max(
            rows["frame-based"]["velocity_jsd"], 1e-12)
        rows["velocity_ratio_temporal_vs_library"] = rows["temporal"]["velocity_jsd"] / max(
            rows["library"]["velocity_jsd"], 1e-12)
        rows["velocity_ratio_relaxed_vs_frame_based"] = rows["temporal + relax"]["velocity_jsd"] / max(
            rows["frame-based"]["velocity_jsd"], 1e-12)
        rows["velocity_ratio_mixture_prior"] = rows[f"temporal, {MIXTURE}"]["velocity_jsd"] / max(
            rows[f"frame-based, {MIXTURE}"]["velocity_jsd"], 1e-12)
        rows["relax_seconds_per_frame"] = relax_seconds
        half = len(ref_s) // 2  # sampling noise of the velocity JSD: the reference's halves against each other
        rows["velocity_jsd_reference_halves"] = float(metrics.velocity_jsd(ref_s[:half], ref_s[half:], lag_ps))
        rows["relax_settings"] = {"max_iterations": relaxer.max_iterations,
                                  "tolerance_kj_mol_nm": relaxer.tolerance_kj_mol_nm,
                                  "restraint_kj_mol_nm2": relaxer.restraint_kj_mol_nm2,
                                  "bead_deviation_nm_max": float(np.linalg.norm(
                                      mapping.map_positions(outputs["temporal + relax"]) - cg_s, axis=-1).max())}
        rows["knn_cross_validation"] = knn_cv(mapping, path, n_train)
        rows["lag_ps"] = lag_ps
        rows["temporal_rollout_steps"] = int(models["temporal"].metadata.get("rollout_steps", 0))
        rows["test_frames"] = int(len(sel))
        rows["cc_rdf"] = {k: v[2].round(4).tolist() for k, v in rdfs.items()} | {
            "r_nm": rdfs["temporal"][0].round(4).tolist(), "reference": rdfs["temporal"][1].round(4).tolist()}
        results[label] = rows
    return results


def knn_cv(mapping, path, n_train) -> dict:
    from openmm_backmap.backmap import KNNRegressionBaseline

    try:
        return KNNRegressionBaseline(mapping).cross_validate(path, n_splits=5, seed=0)
    except Exception as exc:  # report, do not lose the rest of the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------ speed
def section_speed(name: str, args) -> dict:
    ds, path = load_liquid(name)
    top, system = ds.topology, ds.system
    xyz = ds.positions[-1].astype(np.float64)
    box = ds.box_vectors[-1].astype(np.float64)
    ds.close()
    out = {}
    for label, preset, dt_fs, weights, *_ in CASES[name][:1]:
        mapping = CGMapping.from_preset(top, preset)
        model_path = WORK / f"backmapper_{name}_{label}_temporal.pt"
        if not model_path.exists():
            continue
        bm = TemporalBackmapper.load(model_path, mapping)
        lat = {}
        for reps in ((1, 1, 1), (2, 2, 1), (3, 2, 2)):
            big_top, big_xyz, big_box = systems.replicate(top, xyz, box, reps)
            big_map = CGMapping.from_preset(big_top, preset)
            big_bm = TemporalBackmapper(big_map, **{k: v for k, v in bm.config.items()}, metadata=bm.metadata)
            big_bm.load_state_dict(_tile_state(bm, big_bm))
            big_bm.eval()
            cg = big_map.map_positions(big_map.make_molecules_whole(big_xyz[None], big_box[None]))[0]
            chain = big_bm.chain(seed=0)
            chain.previous = big_xyz
            chain.step(cg, big_box)  # warm-up
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                chain.step(cg, big_box)
                times.append(time.perf_counter() - t0)
            lat[int(len(bead_units(big_map)))] = {"ms_median": 1000 * float(np.median(times)),
                                                  "ms_min": 1000 * float(np.min(times))}
            print(name, label, "latency", reps, lat[int(len(bead_units(big_map)))], flush=True)
        out[f"{label} backmapping latency"] = lat
        # CG vs AA ns/day, side by side in this process
        pot_file = WORK / f"potential_{name}_{label}_lambda{max(weights):g}.pt"  # the one trained with the energy term
        if pot_file.exists():
            pot = CGPotential.load(pot_file, mapping=mapping)
            cgx = mapping.map_positions(mapping.make_molecules_whole(xyz[None], box[None]))[0]
            _, info = run_cg(mapping, pot.to(CG_DTYPE), cgx, box, n_steps=int(args.speed_steps), dt_fs=dt_fs,
                             report_ps=int(args.speed_steps) * dt_fs / 1000)  # one block: no reports in between
            aa = aa_speed(top, system, xyz, box, int(args.speed_steps) // 4)
            out[f"{label} CG vs AA"] = {"cg_ns_per_day": info["ns_per_day"], "aa_ns_per_day": aa,
                                        "ratio": info["ns_per_day"] / aa, "cg_dt_fs": dt_fs, "aa_dt_fs": 2.0}
            print(name, label, "speed", out[f"{label} CG vs AA"], flush=True)
    return out


def _tile_state(small: TemporalBackmapper, big: TemporalBackmapper) -> dict:
    """The small box's weights and buffers for a tiled box (kinds are the same; the library is per kind)."""
    for small_kind, big_kind in zip(small.kinds, big.kinds):
        big_kind.library_atoms = torch.zeros_like(small_kind.library_atoms)
        big_kind.library_beads = torch.zeros_like(small_kind.library_beads)
    return small.state_dict()


def aa_speed(top, system, xyz, box, n_steps) -> float:
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 2 * u.femtosecond)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(xyz)
    ctx.setVelocitiesToTemperature(300 * u.kelvin, 1)
    integrator.step(10)
    t0 = time.perf_counter()
    integrator.step(n_steps)
    seconds = time.perf_counter() - t0
    return n_steps * 2e-6 / seconds * 86400


# ------------------------------------------------------------------------------------------------ report
def markdown(all_results: dict) -> str:
    lines = ["AA data: `benchmarks/liquid_data.py` (CHARMM36/CGenFF, PME, NPT 300 K / 1 bar, then NVT with forces). "
             "Models train on the first 80 % of the frames; evaluation uses the last 20 %.", ""]
    for name, res in all_results.items():
        cg = res.get("cg", {})
        if cg:
            lines += [f"### {name}: CG potentials (TorchForce, Langevin 300 K)", "",
                      "| model | ps run | blow-up | ⟨T⟩ (K) | T drift (K) | energy drift (σ) | COM g(r) L1 (nm, ≤ 0.05) | "
                      "bond / angle JSD max (≤ 0.02) | ns/day | val. force MSE: model / priors only |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            # current recipe first, then the rows of earlier recipes (kept to show what changed and why)
            for key, row in sorted(cg.items(), key=lambda kv: ("network basis" in kv[0] or "earlier" in kv[0],
                                                              kv[0])):
                bj = (f"{row.get('bond_jsd_max', float('nan')):.3f} / {row.get('angle_jsd_max', float('nan')):.3f}"
                      if "bond_jsd_max" in row else "–")
                lines.append(f"| {key} | {row['ps']:.0f} | {_blow_up(row['blow_up'])} "
                             f"| {row.get('temperature_mean_K', float('nan')):.1f} | "
                             f"{row.get('temperature_drift_K', float('nan')):+.1f} | "
                             f"{row.get('energy_drift_sigma', float('nan')):+.1f} | "
                             f"{row.get('com_rdf_l1_nm', float('nan')):.3f} | {bj} | {row['ns_per_day']:.1f} | "
                             f"{row.get('val_force_mse') or float('nan'):.4g} / "
                             f"{row.get('priors_only_val_force_mse') or float('nan'):.4g} |")
                st = row.get("size_transfer")
                if st and "com_rdf" in st and "com_rdf" in row:
                    transfer_l1 = metrics.rdf_l1_nm(np.array(row["com_rdf"]["r_nm"]), np.array(row["com_rdf"]["cg"]),
                                                    np.array(st["com_rdf"]["cg"]))
                    st = {**st, "vs_small_box_l1_nm": transfer_l1}
                if st:
                    lines.append(f"| ↳ transferred to {st['molecules']} molecules (2×2×2) | {st['ps']:.0f} | "
                                 f"{_blow_up(st['blow_up'])} | "
                                 f"{st.get('temperature_mean_K', float('nan')):.1f} | "
                                 f"{st.get('temperature_drift_K', float('nan')):+.1f} | "
                                 f"{st.get('energy_drift_sigma', float('nan')):+.1f} | "
                                 f"{st.get('com_rdf_l1_nm', float('nan')):.3f} (vs the small box's CG g(r): "
                                 f"{st.get('vs_small_box_l1_nm', float('nan')):.3f}) | – | {st['ns_per_day']:.1f} | |")
            lines.append("\nRuns start from the last AA frame mapped to CG; the CG time step is 8 fs (1 bead) or 4 fs "
                         "(3 beads); g(r) and distributions use the frames after the first 20 % (before a blow-up, "
                         "if any). Energy drift: mean potential energy of the last 10 % of the run minus that of the "
                         "first 10 %, in standard deviations of the whole trace. Force MSE in (kJ/mol/nm)², on "
                         "held-out frames. Rows naming a network basis are earlier recipes (the default basis now "
                         "starts at the 0.1 % quantile of the training pair distances); so are rows with a flat "
                         "angle wall (the cosine angle prior's wall over never-seen angles now rises 20 kT/rad). The potential runs in "
                         "float32 since 2026-11-22 (hexane's 1 ns run and later ones; earlier runs were in "
                         "float64), with the network and the excluded volume sharing one pair search per step. "
                         "Plot: `liquids_cg.png`.\n")
        bm = res.get("backmap", {})
        for label, rows in bm.items():
            rollout = rows.get("temporal_rollout_steps", 0)
            lines += [f"### {name} {label}: backmapping held-out frames (lag {rows['lag_ps']:g} ps, "
                      f"{rows['test_frames']} frames; temporal model trained with "
                      f"{f'{rollout} rollout steps' if rollout else 'teacher forcing only'})", "",
                      "| method | bond score (≥ 0.99) | intermolecular clash (≤ 0.001) | C–C g(r) L1 nm (≤ 0.05) | "
                      "LJ/molecule JSD (≤ 0.05) | LJ mean shift kJ/mol (median; fraction above the reference maximum) | "
                      "velocity JSD | RMSD nm |",
                      "|---|---|---|---|---|---|---|---|"]
            for kind in ("temporal", "temporal + relax", "frame-based", f"temporal, {MIXTURE}",
                         f"frame-based, {MIXTURE}", "library", "kNN regression (seed 000)"):
                if kind not in rows:
                    continue
                m = rows[kind]
                lines.append(f"| {kind} | {m['bond_score']:.3f} | {m['clash_inter']:.4f} | {m['cc_rdf_l1_nm']:.3f} | "
                             f"{m['lj_jsd']:.3f} | {_lj_shift(m)} | {m.get('velocity_jsd', float('nan')):.2g} | "
                             f"{m['rmsd_nm']:.3f} |")
            lines.append(f"\nVelocity JSD ratio temporal / frame-based: "
                         f"{rows['velocity_ratio_temporal_vs_frame_based']:.2f} (target ≤ 0.33); temporal / library: "
                         f"{rows['velocity_ratio_temporal_vs_library']:.2f}. kNN regression, 5-fold CV over time blocks: "
                         f"{_cv(rows['knn_cross_validation'])}")
            if "velocity_ratio_mixture_prior" in rows:
                lines.append(f"\n`temporal`, `frame-based` and `temporal + relax` draw z from the conditional latent "
                             f"prior (the default); the `{MIXTURE}` rows are the same trained networks drawing z "
                             f"from seed 003's single Gaussian mixture instead: velocity JSD ratio temporal / "
                             f"frame-based {rows['velocity_ratio_mixture_prior']:.2f}.")
            if "velocity_jsd_reference_halves" in rows:
                lines.append(f"\nSampling noise of the velocity JSD: the first half of the reference frames against the "
                             f"second gives {rows['velocity_jsd_reference_halves']:.2g}.")
            if "relax_seconds_per_frame" in rows:
                rs = rows["relax_settings"]
                lines.append("")
                lines.append(f"Temporal + relax: every frame minimised with the AA System (`Relaxer`: at most "
                             f"{rs['max_iterations']} L-BFGS iterations, bead restraints "
                             f"{rs['restraint_kj_mol_nm2']:.0e} kJ/mol/nm², reaction field instead of PME, "
                             f"constraints as stiff bonds; largest bead deviation "
                             f"{rs['bead_deviation_nm_max']:.3f} nm), {rows['relax_seconds_per_frame']:.1f} s per "
                             f"frame on one core; its velocity JSD ratio to the (unrelaxed) frame-based model: "
                             f"{rows['velocity_ratio_relaxed_vs_frame_based']:.2f}.")
            lines.append("")
        sp = res.get("speed", {})
        for key, val in sp.items():
            if "latency" in key:
                lines.append(f"{name} {key} (one frame, CPU, 1 thread): " + ", ".join(
                    f"{n} molecules {v['ms_median']:.0f} ms ({v['ms_median'] / int(n):.3f} ms per molecule)"
                    for n, v in val.items()))
            else:
                lines.append(f"{name} {key}: CG {val['cg_ns_per_day']:.1f} ns/day ({val['cg_dt_fs']:g} fs) vs AA "
                             f"{val['aa_ns_per_day']:.2f} ns/day ({val['aa_dt_fs']:g} fs, CPU platform): "
                             f"{val['ratio']:.1f}×")
        lines.append("")
    return "\n".join(lines)


def _blow_up(text) -> str:
    if text is None:
        return "no"
    import re

    step = re.search(r"step (\d+)", text)
    return f"YES (step {step.group(1)})" if step else "YES"


def plot(all_results: dict, path: Path) -> None:
    """COM g(r) of every CG model against the mapped AA reference (one panel per liquid), and the potential-energy
    traces of the runs (a slow slide is a drift the temperature does not show)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, res in all_results.items() if res.get("cg")]
    if not names:
        return
    fig, axes = plt.subplots(3, len(names), figsize=(5.2 * len(names), 10.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2, 3]})
    for col, name in enumerate(names):
        ax, key_ax, tx = axes[0, col], axes[1, col], axes[2, col]
        rows = sorted(all_results[name]["cg"].items(), key=lambda kv: ("network basis" in kv[0], kv[0]))
        ref_drawn = False
        for key, row in rows:
            g = row.get("com_rdf")
            if g is None:
                continue
            r = np.asarray(g["r_nm"])
            if not ref_drawn:
                ax.plot(r, g["reference"], "k-", lw=2.2, label="AA reference (mapped)")
                ref_drawn = True
            style = "--" if "network basis" in key else "-"
            line, = ax.plot(r, g["cg"], style, lw=1.2, label=f"{key} (L1 {row['com_rdf_l1_nm']:.3f} nm)")
            st = row.get("size_transfer") or {}
            if "com_rdf" in st:
                ax.plot(r, st["com_rdf"]["cg"], ":", color=line.get_color(), lw=1.2,
                        label=f"  ↳ {st['molecules']} molecules (L1 {st['com_rdf_l1_nm']:.3f} nm)")
            e = np.asarray(row.get("energy_trace_kj_mol", []))
            if len(e):
                t_ps = np.linspace(row["ps"] / len(e), row["ps"], len(e))
                tx.plot(t_ps, e - e[0], style, color=line.get_color(), lw=1.0,
                        label=key + (" (blew up)" if row["blow_up"] else ""))
        ax.set(title=f"{name}: CG centre-of-mass g(r)", xlabel="r (nm)", ylabel="g(r)", xlim=(0.25, 1.2))
        key_ax.axis("off")  # the legend below the g(r) panel: the panel itself has no free corner
        key_ax.legend(*ax.get_legend_handles_labels(), fontsize=6.5, loc="center", frameon=False)
        tx.set(title=f"{name}: potential energy of the CG runs", xlabel="t (ps)", ylabel="U(t) − U(0) (kJ/mol)")
        tx.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _lj_shift(m: dict) -> str:
    text = f"{m['lj_shift_kj_mol']:+.3g}"
    if "lj_median_shift_kj_mol" in m:
        text += f" ({m['lj_median_shift_kj_mol']:+.2f}; {m['lj_overlap_fraction']:.4f})"
    return text


def _cv(cv: dict) -> str:
    if "r2_mean" not in cv:
        return str(cv.get("error", cv))
    return (f"R² {cv['r2_mean']:.3f} ± {cv['r2_std']:.3f}, RMSE {cv['rmse_nm_mean']:.4f} ± {cv['rmse_nm_std']:.4f} nm "
            f"({cv['n_frames']} frames)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--liquids", default="benzene")
    parser.add_argument("--sections", default="cg,backmap,speed")
    parser.add_argument("--cg-epochs", type=int, default=30)
    parser.add_argument("--cg-patience", type=int, default=10,
                        help="the network starts at the priors-only model and needs a few epochs to beat it")
    parser.add_argument("--cg-ps", type=float, help="length of every CG run (ps; default: the case's length)")
    parser.add_argument("--cg-frames-multibead", type=int, default=250,
                        help="frames (evenly strided) to train multi-bead potentials on (their steps cost more)")
    parser.add_argument("--transfer-ps", type=float, default=50.0)
    parser.add_argument("--bm-epochs", type=int, default=15)
    parser.add_argument("--bm-rollout", type=int, default=0,
                        help="rollout steps when training the temporal backmapper (its own output fed back)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--test-frames", type=int, default=200)
    parser.add_argument("--speed-steps", type=int, default=400)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--maps", help="only these maps, e.g. 1-bead (default: all of the liquid)")
    parser.add_argument("--weights", help="only these energy weights, e.g. 1,0 (default: the case's)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke test of the pipeline)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite liquids.md and liquids_cg.png from the recorded liquids.json")
    args = parser.parse_args()
    if args.report:
        recorded = json.loads((RESULTS / "liquids.json").read_text())
        save("liquids", {k: recorded[k] for k in ("settings", "results")}, markdown(recorded["results"]))
        plot(recorded["results"], RESULTS / "liquids_cg.png")
        return
    if args.quick:
        args.cg_epochs, args.cg_ps, args.transfer_ps, args.bm_epochs, args.test_frames = 2, 5.0, 2.0, 2, 20
        args.speed_steps = 40
    torch.set_num_threads(1)
    if args.quick:  # tiny AA data of its own (64 molecules, 4 ps), in the quick results folder
        from liquid_data import LIQUIDS, generate

        for name in args.liquids.split(","):
            resname = next(k for k, v in LIQUIDS.items() if v[0] == f"aa_{name}")
            if not (WORK / f"aa_{name}.h5").exists():
                generate(resname, 64, WORK / f"aa_{name}.h5", equilibration_ps=1.0, production_ps=4.0, frame_ps=0.1,
                         progress=False)
    out_json = RESULTS / "liquids.json"
    for name in args.liquids.split(","):
        for section in args.sections.split(","):
            t0 = time.perf_counter()
            result = {"cg": section_cg, "backmap": section_backmap, "speed": section_speed}[section](name, args)
            print(f"{name} {section}: {time.perf_counter() - t0:.0f} s", flush=True)
            # re-read before writing: sections may run in separate processes at the same time
            recorded = json.loads(out_json.read_text()) if out_json.exists() else {}
            all_results = recorded.get("results", {})
            # merge: cases of one section may also come from separate processes (--maps/--weights)
            all_results.setdefault(name, {}).setdefault(section, {}).update(result)
            settings = recorded.get("settings", {})
            settings[f"{name}/{section}"] = dict(vars(args))
            save("liquids", {"settings": settings, "results": all_results}, markdown(all_results))
            plot(all_results, RESULTS / "liquids_cg.png")


if __name__ == "__main__":
    main()
