"""The ``openmm-backmap`` command line.

Every subcommand takes its settings from flags or from a YAML file (``--config``; flags win), writes the
settings it used next to its outputs, shows progress on long work, and reports errors as one line with a
hint (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------

SYSTEM_CHOICES = ("alanine-dipeptide", "chignolin", "liquid")


def _build_system(cfg: dict[str, Any]):
    from . import systems

    name = cfg["system"]
    if name == "alanine-dipeptide":
        return systems.alanine_dipeptide(cfg["solvent"])
    if name == "chignolin":
        return systems.chignolin(cfg["solvent"])
    if name == "liquid":
        return systems.liquid(cfg["resname"], n_molecules=cfg["n_molecules"], seed=cfg["seed"])
    raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_CHOICES)}")


def _write_config(cfg: dict[str, Any], folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    record = {"command": cfg.get("_command"), "created": datetime.datetime.now().isoformat(timespec="seconds"),
              **{k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("config", "debug")}}
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------


def cmd_simulate(cfg: dict[str, Any]) -> Path:
    """AA reference data with forces."""
    from .data import simulate_reference

    out = Path(cfg["out"])
    if out.exists() and not cfg["append"] and not cfg["overwrite"]:
        raise FileExistsError(f"{out} exists; pass --append to continue it or --overwrite to replace it")
    test_system = _build_system(cfg)
    n_steps = int(round(cfg["ns"] * 1000 / cfg["timestep_fs"] * 1000))
    n_steps -= n_steps % cfg["interval"]
    simulate_reference(
        out, test_system.topology, test_system.system, test_system.positions,
        n_steps=n_steps, report_interval=cfg["interval"], temperature_K=cfg["temperature"],
        timestep_ps=cfg["timestep_fs"] / 1000, friction_per_ps=cfg["friction"],
        equilibration_steps=int(round(cfg["equilibrate_ps"] * 1000 / cfg["timestep_fs"])),
        pressure_bar=cfg.get("pressure_bar"),
        append=cfg["append"], seed=cfg["seed"], platform=cfg["platform"], dtype=cfg["dtype"],
        settings={"system": test_system.name, **test_system.metadata},
    )
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    return out


def cmd_map(cfg: dict[str, Any]) -> Path:
    """Map an AA dataset to CG."""
    from .data import AADataset
    from .mapping import CGMapping, map_dataset

    with AADataset(cfg["data"]) as aa:
        if cfg["mapping"]:
            mapping = CGMapping.load(cfg["mapping"], aa.topology)
        elif cfg["preset"]:
            mapping = CGMapping.from_preset(aa.topology, cfg["preset"])
        else:
            raise ValueError("give a mapping: --preset NAME or --mapping FILE.yaml")
        out = Path(cfg["out"])
        if out.exists() and not cfg["overwrite"]:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        if cfg.get("optimize_force_map") and not mapping.has_optimized_force_map:
            mapping = mapping.with_optimized_force_map(aa)
        map_dataset(aa, mapping, out, overwrite=cfg["overwrite"])
    mapping.save(out.with_suffix(".mapping.yaml"))
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    return out


def _set_threads(cfg: dict[str, Any]) -> int | None:
    """Set torch's intra-op threads for the command (``--threads``); returns the previous count.

    The default is 1: the models are small, and on a busy 2-core machine two threads spinning against other
    processes made force-matching epochs 4-10x slower than one thread (measured: 15-55 s vs 5-6 s per epoch).
    """
    threads = cfg.get("threads")
    if not threads:
        return None
    import torch

    if int(threads) < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    return previous


def _existing(path: Any, flag: str) -> Path:
    """``path`` as a Path, or a FileNotFoundError naming the flag that should give it."""
    if path is None:
        raise ValueError(f"{flag} is required")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    return path


def _refuse_overwrite(out: Path, cfg: dict[str, Any], *, resume_flag: str | None = None) -> None:
    if out.exists() and not cfg.get("overwrite") and not (resume_flag and cfg.get(resume_flag)):
        extra = f" or --{resume_flag.replace('_', '-')} to continue" if resume_flag else ""
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it{extra}")


def _sibling(out: Path, suffix: str) -> Path:
    """``potential.pt`` -> ``potential<suffix>`` in the same folder."""
    return out.with_name(out.stem + suffix)


def _aa_dataset_of(cg_path: Path, settings: dict[str, Any], aa_data: Any) -> Path:
    """The AA dataset a CG dataset was mapped from (``--aa-data`` wins over the path recorded by ``map``)."""
    if aa_data:
        return _existing(aa_data, "--aa-data")
    recorded = settings.get("mapped_from")
    if not recorded:
        raise ValueError(f"{cg_path} does not record the AA dataset it was mapped from; pass --aa-data AA.h5")
    for candidate in (Path(recorded), cg_path.parent / recorded, cg_path.parent / Path(recorded).name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"the AA dataset {recorded} that {cg_path} was mapped from is missing "
                            "(the mapping needs its AA topology); pass --aa-data AA.h5")


def _cg_mapping(cg_path: Path, cfg: dict[str, Any]):
    """The CGMapping of a CG dataset: ``--mapping`` file, ``--preset``, or the map stored in the CG file."""
    from .data import AADataset, CGDataset
    from .mapping import CGMapping

    with CGDataset(cg_path) as cg:
        settings = cg.settings
        try:
            stored = cg.text("mapping")
        except KeyError:
            stored = None
    with AADataset(_aa_dataset_of(cg_path, settings, cfg.get("aa_data"))) as aa:
        topology = aa.topology
    if cfg.get("mapping"):
        return CGMapping.load(_existing(cfg["mapping"], "--mapping"), topology)
    if cfg.get("preset"):
        return CGMapping.from_preset(topology, cfg["preset"])
    if stored is not None:
        return CGMapping.from_yaml(stored, topology, source=f"{cg_path}:mapping")
    beside = cg_path.with_suffix(".mapping.yaml")
    if beside.exists():
        return CGMapping.load(beside, topology)
    raise ValueError(f"{cg_path} stores no mapping; give one with --mapping FILE.yaml or --preset NAME")


def cmd_train_potential(cfg: dict[str, Any]) -> Path:
    """Force-match a CG potential (priors + SchNet) to a mapped CG dataset."""
    from .potential import ForceMatchingTrainer

    data = _existing(cfg["data"], "--data")
    out = Path(cfg["out"])
    _refuse_overwrite(out, cfg, resume_flag="resume")
    checkpoint, log = _sibling(out, ".checkpoint.pt"), _sibling(out, ".training.csv")
    if cfg["resume"] and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {checkpoint} to continue from")
    mapping = _cg_mapping(data, cfg)
    network = None if cfg["priors_only"] else {"hidden": int(cfg["hidden"]), "cutoff_nm": float(cfg["cutoff_nm"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = ForceMatchingTrainer(
        mapping, data, network=network, energy_weight=float(cfg["energy_weight"]), batch_size=int(cfg["batch_size"]),
        learning_rate=float(cfg["lr"]), max_epochs=int(cfg["epochs"]), patience=int(cfg["patience"]),
        max_frames=cfg["max_frames"], seed=int(cfg["seed"]), checkpoint=checkpoint, log=log,
        progress=cfg.get("_progress", True),
    )
    potential = trainer.fit(resume=bool(cfg["resume"]))
    potential.save(out)
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    meta = potential.metadata
    print(f"potential -> {out} ({meta['epochs']} epochs; validation force MSE {meta['val_force_mse']:.4g} "
          f"(kJ/mol/nm)^2, priors only {meta['priors_only_val_force_mse']:.4g}); log {log}")
    return out


def _frame_spacing_ps(aa: Any) -> float:
    times = np.asarray(aa.time[: min(aa.n_frames, 1001)], dtype=np.float64)
    if len(times) < 2:
        raise ValueError(f"{aa.path} holds {len(times)} frame(s); training needs a trajectory")
    return float(np.median(np.diff(times)))


def cmd_train_backmapper(cfg: dict[str, Any]) -> Path:
    """Train the temporally coherent backmapper (or the frame-based baseline) on an AA dataset."""
    from .backmap import BackmapperTrainer
    from .data import AADataset
    from .mapping import CGMapping

    data = _existing(cfg["data"], "--data")
    out = Path(cfg["out"])
    _refuse_overwrite(out, cfg, resume_flag="resume")
    checkpoint, log = _sibling(out, ".checkpoint.pt"), _sibling(out, ".training.csv")
    if cfg["resume"] and not checkpoint.exists():
        raise FileNotFoundError(f"--resume: no checkpoint {checkpoint} to continue from")
    with AADataset(data) as aa:
        if cfg["mapping"]:
            mapping = CGMapping.load(_existing(cfg["mapping"], "--mapping"), aa.topology)
        elif cfg["preset"]:
            mapping = CGMapping.from_preset(aa.topology, cfg["preset"])
        else:
            raise ValueError("give a mapping: --preset NAME or --mapping FILE.yaml")
        spacing = _frame_spacing_ps(aa)
    lag = float(cfg["lag_ps"])
    stride = int(round(lag / spacing))
    if stride < 1:
        raise ValueError(f"--lag-ps {lag:g} is shorter than the frame spacing of {data} ({spacing:g} ps); "
                         f"use --lag-ps {spacing:g} or more")
    if abs(stride * spacing - lag) > 0.01 * lag:
        print(f"note: frames are {spacing:g} ps apart; training on a lag of {stride * spacing:g} ps "
              f"(stride {stride}) instead of {lag:g} ps")
    frame_based = bool(cfg["frame_based"])
    architecture = {"hidden": int(cfg["hidden"]), "environment_cutoff_nm": float(cfg["environment_cutoff_nm"]),
                    "latent_prior": str(cfg["latent_prior"]), "units": str(cfg["units"])}
    if frame_based:
        architecture["condition_on_previous"] = False
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = BackmapperTrainer(
        mapping, data, energy=None if cfg["no_energy"] else "dataset", stride=stride, lag_frames=1,
        architecture=architecture, max_epochs=int(cfg["epochs"]),
        batch_size=int(cfg["batch_size"]), learning_rate=float(cfg["lr"]), patience=int(cfg["patience"]),
        max_frames=cfg["max_frames"], seed=int(cfg["seed"]), checkpoint=checkpoint, log=log,
        progress=cfg.get("_progress", True),
    )
    backmapper = trainer.fit(resume=bool(cfg["resume"]))
    backmapper.save(out)
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    kind = "frame-based baseline" if frame_based else "temporal backmapper"
    print(f"{kind} -> {out} (lag {backmapper.lag_ps:g} ps, {len(trainer.history) - 1} epochs); log {log}")
    return out


def _run_paths(out: Path) -> dict[str, Path]:
    names = {"cg_dcd": "cg.dcd", "cg_pdb": "cg.pdb", "log": "cg_log.csv", "checkpoint": "checkpoint.chk",
             "aa": "aa.dcd", "aa_pdb": "aa.pdb", "live": "current.pdb", "last_good": "last_good.pdb"}
    return {k: out / v for k, v in names.items()}


def _truncate_log(path: Path, step: int) -> None:
    """Drop the rows of a StateDataReporter CSV after ``step`` (an abandoned continuation)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        first = line.split(",", 1)[0].strip()
        if line.startswith("#") or not first.lstrip("-").isdigit() or int(first) <= step:
            kept.append(line)
    path.write_text("".join(kept))


def cmd_run(cfg: dict[str, Any]) -> Path:
    """CG MD with the trained potential, backmapped on the fly to an AA trajectory."""
    import openmm
    import openmm.app as app
    import openmm.unit as u
    from tqdm.auto import tqdm

    from ._physics import openmm_seed
    from .backmap import TemporalBackmapper
    from .data import AADataset
    from .formats import truncate_after
    from .platforms import choose_platform
    from .potential import CGPotential, create_cg_system
    from .reporters import BackmapReporter, CGRunGuard

    backmapper = TemporalBackmapper.load(_existing(cfg["backmapper"], "--backmapper"))
    potential = CGPotential.load(_existing(cfg["potential"], "--potential"))
    data = _existing(cfg["data"], "--data")
    mapping = backmapper.mapping
    out = Path(cfg["out"])
    paths = _run_paths(out)
    append = bool(cfg["append"])
    if append and not paths["checkpoint"].exists():
        raise FileNotFoundError(f"--append: no checkpoint {paths['checkpoint']} to continue from; run without --append")
    if not append:
        existing = [p for k, p in paths.items() if k in ("aa", "cg_dcd", "checkpoint") and p.exists()]
        if existing and not cfg["overwrite"]:
            raise FileExistsError(f"{out} already holds a run ({existing[0].name}); pass --append to continue it "
                                  "or --overwrite to replace it")
    timestep_ps = float(cfg["timestep_fs"]) / 1000.0
    if not timestep_ps > 0:
        raise ValueError(f"--timestep-fs must be > 0, got {cfg['timestep_fs']}")
    interval = cfg["interval"]
    if interval is None:
        interval = max(1, int(round(backmapper.lag_ps / timestep_ps))) if backmapper.lag_ps > 0 else 250
    interval = int(interval)
    if interval < 1:
        raise ValueError(f"--interval must be >= 1, got {interval}")
    n_steps = int(round(float(cfg["ns"]) * 1000.0 / timestep_ps))
    n_steps -= n_steps % interval
    if n_steps < interval:
        raise ValueError(f"--ns {cfg['ns']} is shorter than one report interval ({interval} steps of "
                         f"{cfg['timestep_fs']} fs)")

    # The starting structure: one frame of the AA dataset, mapped to CG.
    with AADataset(data) as aa:
        if aa.topology_fingerprint != mapping.topology_fingerprint or aa.n_atoms != mapping.n_atoms:
            raise ValueError(f"{data} does not hold the AA system the backmapper was trained for "
                             f"({aa.n_atoms} atoms vs {mapping.n_atoms})")
        index = int(cfg["start_frame"])
        if not -aa.n_frames <= index < aa.n_frames:
            raise ValueError(f"--start-frame {index} is outside {data} ({aa.n_frames} frames)")
        index %= aa.n_frames
        xyz = aa.positions[index].astype(np.float64)
        box = aa.box_vectors[index].astype(np.float64) if aa.periodic else None
        relax = _relaxer(cfg, aa.system, backmapper, float(cfg["temperature"]))
    if box is not None:
        xyz = mapping.make_molecules_whole(xyz[None], box[None])[0]
    beads = mapping.map_positions(xyz)
    first_aa = xyz[backmapper.atom_indices]

    system = create_cg_system(mapping, potential, backend=cfg["backend"], box_vectors_nm=box)
    topology = mapping.to_openmm_topology()
    temperature = float(cfg["temperature"]) * u.kelvin
    integrator = openmm.LangevinMiddleIntegrator(temperature, float(cfg["friction"]) / u.picosecond,
                                                 timestep_ps * u.picosecond)
    integrator.setRandomNumberSeed(openmm_seed(int(cfg["seed"])))
    platform = choose_platform(system, cfg["platform"])
    simulation = app.Simulation(topology, system, integrator, platform)
    out.mkdir(parents=True, exist_ok=True)
    if not append:  # --overwrite: the inputs are checked, now the old run goes
        for p in paths.values():
            p.unlink(missing_ok=True)
    if append:
        simulation.loadCheckpoint(str(paths["checkpoint"]))
        restart = simulation.currentStep
        if paths["cg_dcd"].exists():
            truncate_after(paths["cg_dcd"], topology, restart)
        _truncate_log(paths["log"], restart)
    else:
        simulation.context.setPositions(beads)
        if box is not None:
            simulation.context.setPeriodicBoxVectors(*box)
        simulation.context.setVelocitiesToTemperature(temperature, openmm_seed(int(cfg["seed"])))
        with open(paths["cg_pdb"], "w") as handle:
            app.PDBFile.writeFile(topology, beads * 10.0 * u.angstrom, handle)
    _write_config(cfg, out, "run.config.yaml")
    start = simulation.currentStep
    if start >= n_steps:
        print(f"{out} already holds {start} steps (>= --ns {cfg['ns']}); pass a larger --ns with --append to extend it")
        return out

    chunk = interval * max(1, int(round(n_steps / interval / 100)))
    dcd = app.DCDReporter(str(paths["cg_dcd"]), interval, append=append and paths["cg_dcd"].exists())
    log = app.StateDataReporter(str(paths["log"]), interval, step=True, time=True, potentialEnergy=True,
                                temperature=True, speed=True, separator=",",
                                append=append and paths["log"].exists())
    checkpoints = app.CheckpointReporter(str(paths["checkpoint"]), chunk)
    guard = CGRunGuard(interval, max_temperature_K=float(cfg["max_temperature"]), last_good_file=paths["last_good"])
    backmap_reporter = BackmapReporter(paths["aa"], interval, backmapper, append=append, seed=int(cfg["seed"]),
                                       first_frame=first_aa, live_pdb=paths["live"], mode=cfg["mode"], relax=relax,
                                       candidates=cfg["candidates"])
    simulation.reporters.extend([dcd, log, checkpoints, guard, backmap_reporter])
    print(f"CG run: {n_steps - start} steps of {cfg['timestep_fs']:g} fs ({(n_steps - start) * timestep_ps / 1000:g} "
          f"ns) on {platform.getName()}, {cfg['backend']} backend; backmapping every {interval} steps "
          f"({interval * timestep_ps:g} ps; trained lag {backmapper.lag_ps:g} ps) -> {paths['aa']}")
    t0 = time.perf_counter()
    try:
        with tqdm(total=n_steps, initial=start, unit="step", desc="CG MD + backmapping",
                  disable=not cfg.get("_progress", True)) as bar:
            while simulation.currentStep < n_steps:
                before = simulation.currentStep
                target = min(n_steps, (before // chunk + 1) * chunk)
                simulation.step(target - before)
                bar.update(simulation.currentStep - before)
        simulation.saveCheckpoint(str(paths["checkpoint"]))
    finally:
        backmap_reporter.close()
        for reporter in (dcd, log):
            handle = getattr(reporter, "_out", None)
            if handle is not None and hasattr(handle, "close"):
                handle.close()
        simulation.reporters.clear()
    seconds = time.perf_counter() - t0
    frames = (n_steps - start) // interval
    print(f"{n_steps - start} steps in {seconds:.1f} s ({(n_steps - start) / max(seconds, 1e-9):.0f} steps/s); "
          f"{frames} AA frames -> {paths['aa']} (topology {paths['aa_pdb']})")
    print(f"outputs in {out.resolve()}")
    return out


def _relaxer(cfg: dict[str, Any], system: Any, backmapper: Any, temperature_K: Optional[float]) -> Any:
    """The Relaxer of ``--relax ITERATIONS`` and ``--relax-md STEPS`` at ``temperature_K`` (``None`` when off)."""
    from .backmap import Relaxer

    iterations, md_steps = int(cfg.get("relax") or 0), int(cfg.get("relax_md") or 0)
    if iterations < 0:
        raise ValueError(f"--relax must be >= 0 iterations, got {iterations}")
    if md_steps < 0:
        raise ValueError(f"--relax-md must be >= 0 steps, got {md_steps}")
    if iterations == 0:
        if md_steps:
            raise ValueError("--relax-md runs after the minimisation: give --relax ITERATIONS too")
        return None
    if md_steps and temperature_K is None:
        raise ValueError("--relax-md needs a temperature: pass --temperature K (the AA dataset records none)")
    return Relaxer(system, backmapper.mapping, atoms=backmapper.atom_indices, max_iterations=iterations,
                   md_steps=md_steps, temperature_K=temperature_K, seed=int(cfg.get("seed") or 0))


def cmd_backmap(cfg: dict[str, Any]) -> Path:
    """Backmap a CG trajectory file offline."""
    from .backmap import TemporalBackmapper, backmap

    cg = _existing(cfg["cg"], "--cg")
    backmapper = TemporalBackmapper.load(_existing(cfg["backmapper"], "--backmapper"))
    topology = cfg["topology"]
    if topology is not None:
        topology = _existing(topology, "--topology")
    elif cg.suffix.lower() in (".dcd", ".xtc", ".trr", ".nc"):
        beside = cg.with_suffix(".pdb")
        if not beside.exists():
            raise ValueError(f"{cg} carries no topology: pass --topology CG.pdb")
        topology = beside
    relax = None
    if int(cfg["relax"] or 0) > 0 or int(cfg["relax_md"] or 0) > 0:
        from .data import AADataset

        if cfg["data"] is None:
            raise ValueError("--relax needs --data: the AA dataset whose System minimises the frames")
        with AADataset(_existing(cfg["data"], "--data")) as aa:
            temperature = cfg["temperature"] if cfg["temperature"] is not None else aa.settings.get("temperature_K")
            relax = _relaxer(cfg, aa.system, backmapper, None if temperature is None else float(temperature))
    out = Path(cfg["out"])
    _refuse_overwrite(out, cfg)
    if out.exists():
        out.unlink()
    backmap(cg, backmapper, out, topology=topology, seed=int(cfg["seed"]), mode=cfg["mode"],
            stride=int(cfg["stride"]), relax=relax, candidates=cfg["candidates"],
            progress=cfg.get("_progress", True))
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    print(f"backmapped {cg} -> {out}")
    return out


def _print_metrics(rows: list[dict[str, Any]]) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return "n/a" if value is None else str(value)
        if isinstance(value, int):
            return str(value)
        try:
            return f"{float(value):.4g}"
        except (TypeError, ValueError):
            return str(value)

    marks = {True: "ok", False: "MISS", None: ""}
    table = [("subject", "metric", "value", "unit", "target", "")]
    for row in rows:
        table.append((str(row.get("subject", "") or ""), str(row.get("name", "")), fmt(row.get("value")),
                      str(row.get("unit", "") or ""), str(row.get("target", "") or ""),
                      marks.get(row.get("passed"), "")))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_evaluate(cfg: dict[str, Any]) -> Path:
    """Compare a backmapped (and CG) run against the AA reference; metrics table and HTML report."""
    from .evaluation import evaluate_run

    reference = _existing(cfg["reference"], "--reference")
    backmapped = _existing(cfg["backmapped"], "--backmapped")
    optional = {}
    for key, flag in (("baseline", "--baseline"), ("cg", "--cg"), ("cg_topology", "--cg-topology"),
                      ("cg_log", "--cg-log"), ("backmapped_topology", "--backmapped-topology")):
        optional[key] = _existing(cfg[key], flag) if cfg[key] else None
    mapping = lag_ps = None
    if cfg["backmapper"]:
        from .backmap import TemporalBackmapper

        backmapper = TemporalBackmapper.load(_existing(cfg["backmapper"], "--backmapper"))
        mapping = backmapper.mapping
        lag_ps = backmapper.lag_ps or None
    if cfg["lag_ps"] is not None:
        lag_ps = float(cfg["lag_ps"])
    if optional["cg"] is not None and optional["cg_topology"] is None:
        beside = optional["cg"].with_suffix(".pdb")
        if optional["cg"].suffix.lower() in (".dcd", ".xtc") and beside.exists():
            optional["cg_topology"] = beside
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate_run(
        out, reference=reference, backmapped=backmapped, backmapped_topology=optional["backmapped_topology"],
        baseline=optional["baseline"], cg_trajectory=optional["cg"], cg_topology=optional["cg_topology"],
        cg_log=optional["cg_log"], mapping=mapping, lag_ps=lag_ps, temperature_K=cfg["temperature"],
        title=cfg["title"],
    )
    _write_config(cfg, out, "evaluate.config.yaml")
    _print_metrics(result["metrics"])
    print(f"report: {Path(result['html']).resolve()}")
    return out


def cmd_bench(cfg: dict[str, Any]) -> Path:
    """Run the benchmark suite of a source checkout."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"
    if not script.exists():
        raise FileNotFoundError(f"{script.parent} is not there: the benchmarks live in the source checkout, not in "
                                "an installed wheel; clone the repository and run 'openmm-backmap bench' from it")
    argv = [sys.executable, str(script)]
    if cfg["quick"]:
        if "--quick" not in script.read_text():
            raise ValueError(f"{script} has no --quick option; run without --quick, or pick benchmarks with --only")
        argv.append("--quick")
    if cfg["only"]:
        argv += ["--only", *cfg["only"]]
    if cfg["collect"]:
        argv.append("--collect")
    print("running " + " ".join(argv[1:]), flush=True)
    proc = subprocess.run(argv)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed with exit code {proc.returncode} (its output is above)")
    return script.parent


def _fresh(output: Path, *inputs: Path) -> bool:
    """``output`` exists and is not older than any existing input (make-style reuse)."""
    if not output.exists():
        return False
    mtime = output.stat().st_mtime
    return all(mtime >= p.stat().st_mtime for p in inputs if p.exists())


def cmd_demo(cfg: dict[str, Any]) -> Path:
    """The whole pipeline on alanine dipeptide, with quick defaults; reruns reuse finished steps."""
    from .summary import dataset_summary

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seed = int(cfg["seed"])
    n = 8
    timings: dict[str, float] = {}

    def step(k: int, text: str) -> float:
        print(f"[{k}/{n}] {text}", flush=True)
        return time.perf_counter()

    def done(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    def reused(path: Path, why: str = "up to date") -> None:
        print(f"      {path.name} is {why}: reused (delete it to redo this step)", flush=True)

    def train_settings(model: Path, source: Path) -> dict[str, Any]:
        """Resume an interrupted training of ``model`` on the same data; otherwise start anew."""
        checkpoint = _sibling(model, ".checkpoint.pt")
        resume = _fresh(checkpoint, source)
        return {"resume": resume, "overwrite": not resume}

    # 1. AA reference MD
    aa_path = out / "aa_reference.h5"
    t = step(1, f"AA reference MD of alanine dipeptide (amber14 + OBC2, {cfg['ns']:g} ns, a frame every 0.2 ps) "
                f"-> {aa_path.name}")
    sim_cfg = {**DEFAULTS["simulate"], "system": "alanine-dipeptide", "solvent": "obc2", "ns": cfg["ns"],
               "interval": 100, "timestep_fs": 2.0, "out": str(aa_path), "append": aa_path.exists(),
               "overwrite": False, "seed": seed, "_command": "simulate"}
    wanted = int(round(float(cfg["ns"]) * 1e6 / sim_cfg["timestep_fs"])) // sim_cfg["interval"]
    if aa_path.exists() and _n_frames(aa_path, "aa") >= wanted:
        reused(aa_path)
    else:  # simulate --append finishes an interrupted run or extends a shorter one
        cmd_simulate(sim_cfg)
    done("aa_md", t)

    # 2. CG mapping + dataset summary
    cg_path = out / "cg_backbone-cb.h5"
    t = step(2, f"mapping to the 6-bead backbone-cb CG model -> {cg_path.name}")
    if _fresh(cg_path, aa_path) and _n_frames(cg_path, "cg") == _n_frames(aa_path, "aa"):
        reused(cg_path)
    else:
        cmd_map({**DEFAULTS["map"], "data": str(aa_path), "preset": "backbone-cb", "out": str(cg_path),
                 "overwrite": True, "_command": "map"})
    summary = dataset_summary(aa_path, cg_path, out)
    done("map", t)

    # 3. force-matched CG potential
    potential = out / "potential.pt"
    t = step(3, f"force matching the CG potential (priors + SchNet, <= {cfg['epochs_potential']} epochs) "
                f"-> {potential.name}")
    if _fresh(potential, cg_path):
        reused(potential)
    else:
        cmd_train_potential({**DEFAULTS["train-potential"], "data": str(cg_path), "aa_data": str(aa_path),
                             "out": str(potential), "epochs": cfg["epochs_potential"],
                             "max_frames": cfg["max_frames_potential"], "seed": seed,
                             **train_settings(potential, cg_path), "_command": "train-potential"})
    done("train_potential", t)

    # 4./5. backmappers: temporal and the frame-based baseline
    backmapper = out / "backmapper.pt"
    t = step(4, f"training the temporally coherent backmapper (lag {cfg['lag_ps']:g} ps, "
                f"<= {cfg['epochs_backmapper']} epochs) -> {backmapper.name}")
    if _fresh(backmapper, aa_path):
        reused(backmapper)
    else:
        cmd_train_backmapper({**DEFAULTS["train-backmapper"], "data": str(aa_path), "preset": "backbone-cb",
                              "out": str(backmapper), "lag_ps": cfg["lag_ps"], "epochs": cfg["epochs_backmapper"],
                              "seed": seed, **train_settings(backmapper, aa_path), "_command": "train-backmapper"})
    done("train_backmapper", t)
    baseline = out / "backmapper_frame_based.pt"
    t = step(5, f"training the frame-based baseline (no previous frame, <= {cfg['epochs_baseline']} epochs) "
                f"-> {baseline.name}")
    if _fresh(baseline, aa_path):
        reused(baseline)
    else:
        cmd_train_backmapper({**DEFAULTS["train-backmapper"], "data": str(aa_path), "preset": "backbone-cb",
                              "out": str(baseline), "lag_ps": cfg["lag_ps"], "epochs": cfg["epochs_baseline"],
                              "frame_based": True, "seed": seed, **train_settings(baseline, aa_path),
                              "_command": "train-backmapper"})
    done("train_baseline", t)

    # 6. CG MD with on-the-fly backmapping (continued, not redone, when interrupted; cg.pdb marks its start)
    paths = _run_paths(out)
    t = step(6, f"CG MD with the trained potential ({cfg['cg_ns']:g} ns at 4 fs), backmapped every "
                f"{cfg['lag_ps']:g} ps -> {paths['aa'].name}, {paths['aa_pdb'].name}")
    same_run = (paths["checkpoint"].exists() and paths["aa"].exists()
                and _fresh(paths["cg_pdb"], potential, backmapper, aa_path))
    cmd_run({**DEFAULTS["run"], "potential": str(potential), "backmapper": str(backmapper), "data": str(aa_path),
             "out": str(out), "ns": cfg["cg_ns"], "timestep_fs": 4.0, "seed": seed, "append": same_run,
             "overwrite": not same_run, "_command": "run"})
    done("cg_run", t)

    # 7. offline backmapping of the same CG trajectory with the baseline
    frame_based = out / "aa_frame_based.dcd"
    t = step(7, f"backmapping the same CG trajectory offline with the frame-based baseline -> {frame_based.name}")
    if _fresh(frame_based, paths["cg_dcd"], baseline):
        reused(frame_based)
    else:
        cmd_backmap({**DEFAULTS["backmap"], "cg": str(paths["cg_dcd"]), "topology": str(paths["cg_pdb"]),
                     "backmapper": str(baseline), "out": str(frame_based), "seed": seed, "overwrite": True,
                     "_command": "backmap"})
    done("offline_backmap", t)

    # 8. evaluation report
    t = step(8, "evaluating against the AA reference -> report.html")
    report = None
    try:
        import importlib

        importlib.import_module(f"{__package__}.evaluation")
        have_evaluation = True
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.evaluation":
            raise
        have_evaluation = False
    if have_evaluation:
        cmd_evaluate({**DEFAULTS["evaluate"], "reference": str(aa_path), "backmapped": str(paths["aa"]),
                      "baseline": str(frame_based), "cg": str(paths["cg_dcd"]), "cg_topology": str(paths["cg_pdb"]),
                      "cg_log": str(paths["log"]), "backmapper": str(backmapper), "out": str(out),
                      "title": "openmm-backmap demo: alanine dipeptide", "_command": "evaluate"})
        report = out / "report.html"
    else:
        print("      (the evaluation module is not available in this version: skipped)")
    done("evaluate", t)

    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["step_seconds"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_config(cfg, out, "demo.config.yaml")
    print(f"done in {summary['wall_time_s']:.0f} s: the backmapped AA trajectory is {paths['aa'].name} "
          f"(topology {paths['aa_pdb'].name})" + (f", the evaluation {report.name}" if report else ""))
    print(f"outputs in {out.resolve()}")
    return out


def _n_frames(path: Path, kind: str) -> int:
    from .data import AADataset, CGDataset

    with (AADataset if kind == "aa" else CGDataset)(path) as ds:
        return ds.n_frames


# ----------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, dict[str, Any]] = {
    "simulate": {"system": "alanine-dipeptide", "solvent": "obc2", "resname": "BENZ", "n_molecules": 300,
                 "ns": 1.0, "interval": 100, "timestep_fs": 2.0, "temperature": 300.0, "friction": 1.0,
                 "equilibrate_ps": 20.0, "pressure_bar": None, "seed": 0, "platform": None, "dtype": "float32", "out": "aa.h5",
                 "append": False, "overwrite": False},
    "map": {"data": None, "preset": None, "mapping": None, "out": "cg.h5", "optimize_force_map": False,
            "overwrite": False},
    # hidden/cutoff_nm: openmm_backmap.potential.trainer.DEFAULT_NETWORK (checked by the tests)
    "train-potential": {"data": None, "mapping": None, "aa_data": None, "preset": None, "out": "potential.pt",
                        "epochs": 30, "batch_size": 128, "lr": 1e-3, "patience": 10, "max_frames": None,
                        "energy_weight": 0.0, "priors_only": False, "hidden": 64, "cutoff_nm": 0.8, "seed": 0,
                        "resume": False, "overwrite": False, "threads": 1},
    # hidden: openmm_backmap.backmap.model.DEFAULT_ARCHITECTURE (checked by the tests)
    "train-backmapper": {"data": None, "preset": None, "mapping": None, "out": "backmapper.pt", "lag_ps": 1.0,
                         "epochs": 50, "batch_size": 128, "lr": 1e-3, "patience": 10, "max_frames": None,
                         "frame_based": False, "no_energy": False, "hidden": 256, "environment_cutoff_nm": 0.0,
                         "latent_prior": "conditional", "units": "molecule", "seed": 0, "resume": False,
                         "overwrite": False, "threads": 1},
    "run": {"potential": None, "backmapper": None, "data": None, "start_frame": 0, "out": "cg_run", "ns": 0.1,
            "timestep_fs": 4.0, "temperature": 300.0, "friction": 1.0, "interval": None, "backend": "torch",
            "platform": None, "seed": 0, "mode": "model", "max_temperature": 2000.0, "relax": 0, "relax_md": 0,
            "candidates": None,
            "append": False,
            "overwrite": False, "threads": 1},
    "backmap": {"cg": None, "topology": None, "backmapper": None, "out": "aa.dcd", "stride": 1, "seed": 0,
                "mode": "model", "relax": 0, "relax_md": 0, "temperature": None, "candidates": None, "data": None,
                "overwrite": False, "threads": 1},
    "evaluate": {"reference": None, "backmapped": None, "backmapped_topology": None, "baseline": None, "cg": None,
                 "cg_topology": None, "cg_log": None, "backmapper": None, "lag_ps": None, "temperature": None,
                 "title": "openmm-backmap evaluation", "out": "evaluation", "threads": 1},
    "bench": {"quick": False, "only": None, "collect": False},
    "demo": {"out": "output/demo", "ns": 8.0, "cg_ns": 0.5, "epochs_potential": 20, "max_frames_potential": 20000,
             "epochs_backmapper": 50, "epochs_baseline": 20, "lag_ps": 1.0, "seed": 0, "threads": 1},
}

EXAMPLES = {
    "simulate": """\
        examples:
          openmm-backmap simulate --system alanine-dipeptide --solvent obc2 --ns 2 --out ala2.h5
          openmm-backmap simulate --system liquid --resname BENZ --n-molecules 300 --ns 0.5 --out benzene.h5
          openmm-backmap simulate --system liquid --resname HEXA --equilibrate-ps 40 --pressure-bar 1 --out hexane.h5
          openmm-backmap simulate --out ala2.h5 --ns 4 --append     # extend the same run to 4 ns""",
    "map": """\
        examples:
          openmm-backmap map --data ala2.h5 --preset backbone-cb --out ala2_cg.h5
          openmm-backmap map --data benzene.h5 --preset benzene-3bead --out benzene_cg.h5
          openmm-backmap map --data ala2.h5 --preset backbone-cb --optimize-force-map --out ala2_cg.h5""",
    "train-potential": """\
        The mapping comes from --mapping, or --preset, or the map stored in the CG file by 'map'; its AA topology
        from --aa-data or the AA dataset the CG file was mapped from. Writes OUT, OUT-stem.training.csv (one row
        per epoch), OUT-stem.checkpoint.pt (for --resume) and OUT-stem.config.yaml.

        examples:
          openmm-backmap train-potential --data ala2_cg.h5 --out potential.pt
          openmm-backmap train-potential --data ala2_cg.h5 --aa-data ala2.h5 --preset backbone-cb --epochs 50 \\
              --max-frames 50000 --out potential.pt
          openmm-backmap train-potential --data ala2_cg.h5 --priors-only --out priors.pt
          openmm-backmap train-potential --data ala2_cg.h5 --out potential.pt --epochs 80 --resume""",
    "train-backmapper": """\
        --lag-ps is converted to a stride over the dataset's frames (frames every 0.2 ps and --lag-ps 1 use every
        5th frame); run the CG simulation with the same spacing between backmapped frames. Writes OUT,
        OUT-stem.training.csv, OUT-stem.checkpoint.pt (for --resume) and OUT-stem.config.yaml.

        examples:
          openmm-backmap train-backmapper --data ala2.h5 --preset backbone-cb --lag-ps 1 --out backmapper.pt
          openmm-backmap train-backmapper --data ala2.h5 --preset backbone-cb --frame-based --out baseline.pt
          openmm-backmap train-backmapper --data ala2.h5 --mapping map.yaml --epochs 80 --out backmapper.pt --resume
          openmm-backmap train-backmapper --data benzene.h5 --preset benzene-3bead --lag-ps 0.1 --no-energy \\
              --environment-cutoff 0.6 --batch-size 4 --out benzene_backmapper.pt""",
    "run": """\
        Writes into OUT: cg.dcd + cg.pdb (CG trajectory), cg_log.csv (energies, temperature, speed), checkpoint.chk,
        aa.dcd + aa.pdb (the backmapped AA trajectory), current.pdb (the latest AA frame, for a viewer), and
        run.config.yaml. --append continues from checkpoint.chk up to --ns in total.

        examples:
          openmm-backmap run --potential potential.pt --backmapper backmapper.pt --data ala2.h5 --ns 1 --out cg_run
          openmm-backmap run --potential potential.pt --backmapper backmapper.pt --data ala2.h5 --ns 2 --out cg_run \\
              --append                                  # extend the same run to 2 ns""",
    "backmap": """\
        examples:
          openmm-backmap backmap --cg cg_run/cg.dcd --topology cg_run/cg.pdb --backmapper backmapper.pt --out aa.dcd
          openmm-backmap backmap --cg ala2_cg.h5 --backmapper backmapper.pt --stride 5 --out aa.xtc
          openmm-backmap backmap --cg cg_run/cg.dcd --backmapper backmapper.pt --mode library --out library.dcd
          openmm-backmap backmap --cg cg_run/cg.dcd --backmapper backmapper.pt --relax 200 --data benzene.h5 \\
              --out relaxed.dcd                         # frames minimised with the AA System, beads held""",
    "evaluate": """\
        Writes OUT/report.html, OUT/metrics.json and the figures, and prints the metric table.

        examples:
          openmm-backmap evaluate --reference ala2.h5 --backmapped cg_run/aa.dcd --out evaluation
          openmm-backmap evaluate --reference ala2.h5 --backmapped cg_run/aa.dcd --baseline baseline.dcd \\
              --cg cg_run/cg.dcd --cg-log cg_run/cg_log.csv --backmapper backmapper.pt --out cg_run""",
    "bench": """\
        Runs benchmarks/run_all.py of a source checkout (results in benchmarks/results/, page docs/benchmarks.md).

        examples:
          openmm-backmap bench --only energy data_writer
          openmm-backmap bench --collect            # only regenerate docs/benchmarks.md""",
    "demo": """\
        Steps: AA reference MD -> backbone-cb mapping -> force-matched CG potential -> temporal backmapper and
        frame-based baseline -> CG MD with on-the-fly backmapping (aa.dcd + aa.pdb) -> offline backmapping with the
        baseline -> evaluation (report.html). Rerunning with the same --out reuses finished steps. With the
        defaults (8 ns of AA data) it took 8 minutes on a busy 2-core machine.

        examples:
          openmm-backmap demo --out output/demo
          openmm-backmap demo --out /tmp/tiny --ns 0.1 --epochs-potential 2 --epochs-backmapper 2 \\
              --epochs-baseline 1 --cg-ns 0.004            # a smoke run of a few seconds""",
}


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="openmm-backmap",
        description="CG potentials, on-the-fly backmapping and AA energies for OpenMM.",
        epilog="Run 'openmm-backmap COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"openmm-backmap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=textwrap.dedent(EXAMPLES[name]),
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS)
        p.add_argument("--config", type=Path, help="YAML file with settings (flags override it)")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        if "threads" in DEFAULTS[name]:
            p.add_argument("--threads", type=int, help="torch threads (default: 1; small models run best on one)")
        return p

    p = add("simulate", "Run AA reference MD and store positions, forces, energies (HDF5).")
    p.add_argument("--system", choices=SYSTEM_CHOICES, help="test system (default: alanine-dipeptide)")
    p.add_argument("--solvent", choices=("vacuum", "obc2", "gbn2", "tip3p"), help="peptide solvent (default: obc2)")
    p.add_argument("--resname", help="CGenFF residue for --system liquid (BENZ, CUME, HEXA, ...)")
    p.add_argument("--n-molecules", dest="n_molecules", type=int, help="molecules in a liquid box")
    p.add_argument("--ns", type=float, help="production length in ns (default: 1)")
    p.add_argument("--interval", type=int, help="steps between stored frames (default: 100)")
    p.add_argument("--timestep-fs", dest="timestep_fs", type=float, help="time step in fs (default: 2)")
    p.add_argument("--temperature", type=float, help="temperature in K (default: 300)")
    p.add_argument("--friction", type=float, help="Langevin friction in 1/ps (default: 1)")
    p.add_argument("--equilibrate-ps", dest="equilibrate_ps", type=float,
                   help="unstored equilibration before production, in ps (default: 20)")
    p.add_argument("--pressure-bar", dest="pressure_bar", type=float,
                   help="equilibrate NPT at this pressure (bar; periodic systems), then produce NVT in the mean box")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--platform", help="OpenMM platform (default: chosen by system size)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="storage precision (default: float32)")
    p.add_argument("--out", help="output HDF5 file")
    p.add_argument("--append", action="store_true", help="continue an existing file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = add("map", "Map an AA dataset to a CG dataset (positions and constraint-aware forces).")
    p.add_argument("--data", help="AA dataset (HDF5) from 'simulate'")
    p.add_argument("--preset", help="mapping preset: ca, backbone-cb, residue, molecule, benzene-3bead, ...")
    p.add_argument("--mapping", help="mapping YAML file (instead of --preset)")
    p.add_argument("--out", help="output CG HDF5 file")
    p.add_argument("--optimize-force-map", action="store_true",
                   help="aggregate forces with the least-noise consistent force map, fitted on the dataset's forces "
                        "(statistically optimal force aggregation); written into OUT-stem.mapping.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = add("train-potential", "Train a CG potential (priors + SchNet) by force matching on a CG dataset.")
    p.add_argument("--data", help="CG dataset (HDF5) from 'map'")
    p.add_argument("--mapping", help="mapping YAML file (default: the map stored in the CG dataset)")
    p.add_argument("--preset", help="mapping preset instead of --mapping")
    p.add_argument("--aa-data", dest="aa_data",
                   help="AA dataset for the AA topology (default: the one the CG data was mapped from)")
    p.add_argument("--out", help="output potential file (default: potential.pt)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs (default: 30)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="frames per batch (default: 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without improvement (default: 10)")
    p.add_argument("--max-frames", dest="max_frames", type=int, help="use at most this many frames (default: all)")
    p.add_argument("--energy-weight", dest="energy_weight", type=float,
                   help="weight of the energy-matching term (default: 0, forces only)")
    p.add_argument("--priors-only", dest="priors_only", action="store_true",
                   help="fit the physical priors only (no network)")
    p.add_argument("--hidden", type=int, help="SchNet feature size (default: 64)")
    p.add_argument("--cutoff-nm", dest="cutoff_nm", type=float, help="SchNet cutoff in nm (default: 0.8)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT-stem.checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add("train-backmapper", "Train the temporally coherent backmapper (CG -> AA) on an AA dataset.")
    p.add_argument("--data", help="AA dataset (HDF5) from 'simulate'")
    p.add_argument("--preset", help="mapping preset: ca, backbone-cb, residue, ...")
    p.add_argument("--mapping", help="mapping YAML file (instead of --preset)")
    p.add_argument("--out", help="output backmapper file (default: backmapper.pt)")
    p.add_argument("--lag-ps", dest="lag_ps", type=float,
                   help="time between consecutive backmapped frames in ps (default: 1)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs (default: 50)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="training pairs per batch (default: 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--patience", type=int, help="stop after this many epochs without improvement (default: 10)")
    p.add_argument("--max-frames", dest="max_frames", type=int,
                   help="use at most this many (strided) frames (default: all)")
    p.add_argument("--frame-based", dest="frame_based", action="store_true",
                   help="train the frame-based baseline (not conditioned on the previous frame)")
    p.add_argument("--no-energy", dest="no_energy", action="store_true",
                   help="train without the AA energy term (faster)")
    p.add_argument("--hidden", type=int, help="width of the hidden layers (default: 256)")
    p.add_argument("--environment-cutoff", dest="environment_cutoff_nm", type=float,
                   help="liquids: condition every molecule on the beads and previous atoms of its neighbours "
                        "within this distance in nm, e.g. 0.6 (default: 0, off)")
    p.add_argument("--latent-prior", dest="latent_prior", choices=("mixture", "conditional"),
                   help="where z comes from at inference: one Gaussian mixture for all molecules (seed 003), or "
                        "a mixture conditioned on the beads, previous frame and environment (default: conditional)")
    p.add_argument("--units", choices=("molecule", "residue"),
                   help="backmap molecule by molecule, or residue by residue, each residue in the frame of its "
                        "own and its bonded residues' beads (proteins; default: molecule)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from OUT-stem.checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add("run", "Run CG MD with a trained potential and backmap it to an AA trajectory on the fly.")
    p.add_argument("--potential", help="CG potential from 'train-potential'")
    p.add_argument("--backmapper", help="backmapper from 'train-backmapper' (it also gives the mapping)")
    p.add_argument("--data", help="AA dataset with the starting structure")
    p.add_argument("--start-frame", dest="start_frame", type=int,
                   help="frame of --data to start from (default: 0; -1 is the last)")
    p.add_argument("--out", help="output folder (default: cg_run)")
    p.add_argument("--ns", type=float, help="length of the run in ns (default: 0.1)")
    p.add_argument("--timestep-fs", dest="timestep_fs", type=float, help="time step in fs (default: 4)")
    p.add_argument("--temperature", type=float, help="temperature in K (default: 300)")
    p.add_argument("--friction", type=float, help="Langevin friction in 1/ps (default: 1)")
    p.add_argument("--interval", type=int,
                   help="steps between saved/backmapped frames (default: the backmapper's lag / the time step)")
    p.add_argument("--backend", choices=("torch", "python"),
                   help="how OpenMM calls the potential: TorchForce or PythonForce (default: torch)")
    p.add_argument("--platform", help="OpenMM platform (default: chosen by system size)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--mode", choices=("model", "library"), help="backmapping mode (default: model)")
    p.add_argument("--max-temperature", dest="max_temperature", type=float,
                   help="stop with an error above this kinetic temperature in K (default: 2000)")
    p.add_argument("--relax", type=int, metavar="ITERATIONS",
                   help="minimise every backmapped frame with the AA System of --data, beads held, for at most "
                        "this many iterations (default: 0, off; 200 removes liquids' hydrogen overlaps)")
    p.add_argument("--relax-md", dest="relax_md", type=int, metavar="STEPS",
                   help="after --relax, this many restrained Langevin steps at --temperature (constraints kept), "
                        "which put back the thermal energy minimisation removes (default: 0)")
    p.add_argument("--candidates", type=int, metavar="M",
                   help="residue units: decode every residue from M latent draws and keep one, drawn along the chain "
                        "by the bonds to the residues placed before it (default: 8 for residue units, else 1)")
    p.add_argument("--append", action="store_true", help="continue the run in OUT from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run in OUT")

    p = add("backmap", "Backmap a CG trajectory file to an AA trajectory offline.")
    p.add_argument("--cg", help="CG trajectory: .dcd/.xtc (with --topology) or a CG dataset .h5")
    p.add_argument("--topology", help="CG topology (PDB) for .dcd/.xtc (default: the .pdb next to --cg)")
    p.add_argument("--backmapper", help="backmapper from 'train-backmapper'")
    p.add_argument("--out", help="AA trajectory: .dcd, .xtc, .h5 or .pdb (default: aa.dcd)")
    p.add_argument("--stride", type=int, help="backmap every n-th CG frame (default: 1)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--mode", choices=("model", "library"), help="backmapping mode (default: model)")
    p.add_argument("--relax", type=int, metavar="ITERATIONS",
                   help="minimise every frame with the AA System of --data, beads held, for at most this many "
                        "iterations (default: 0, off)")
    p.add_argument("--relax-md", dest="relax_md", type=int, metavar="STEPS",
                   help="after --relax, this many restrained Langevin steps (constraints kept), which put back the "
                        "thermal energy minimisation removes (default: 0)")
    p.add_argument("--temperature", type=float,
                   help="K, for --relax-md (default: the temperature recorded in --data)")
    p.add_argument("--candidates", type=int, metavar="M",
                   help="residue units: decode every residue from M latent draws and keep one, drawn along the chain "
                        "by the bonds to the residues placed before it (default: 8 for residue units, else 1)")
    p.add_argument("--data", help="AA dataset whose System --relax uses")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = add("evaluate", "Compare backmapped (and CG) trajectories with the AA reference; HTML report.")
    p.add_argument("--reference", help="AA reference dataset (HDF5)")
    p.add_argument("--backmapped", help="backmapped AA trajectory (e.g. aa.dcd from 'run')")
    p.add_argument("--backmapped-topology", dest="backmapped_topology",
                   help="topology of --backmapped (default: the .pdb next to it)")
    p.add_argument("--baseline", help="a second backmapped trajectory to compare (e.g. the frame-based baseline)")
    p.add_argument("--cg", help="CG trajectory of the run (e.g. cg.dcd)")
    p.add_argument("--cg-topology", dest="cg_topology", help="topology of --cg (default: the .pdb next to it)")
    p.add_argument("--cg-log", dest="cg_log", help="cg_log.csv of the run")
    p.add_argument("--backmapper", help="backmapper file, for the mapping and the lag")
    p.add_argument("--lag-ps", dest="lag_ps", type=float, help="time between backmapped frames (default: inferred)")
    p.add_argument("--temperature", type=float, help="temperature in K (default: from the reference)")
    p.add_argument("--title", help="title of the report")
    p.add_argument("--out", help="output folder (default: evaluation)")

    p = add("bench", "Run the benchmark suite (source checkout only).")
    p.add_argument("--quick", action="store_true", help="small settings, if the suite supports them")
    p.add_argument("--only", nargs="+", help="benchmark names to run (e.g. energy data_writer)")
    p.add_argument("--collect", action="store_true", help="only regenerate docs/benchmarks.md")

    p = add("demo", "Alanine dipeptide end to end: AA data -> CG potential + backmappers -> CG MD with on-the-fly "
                    "backmapping -> evaluation report.")
    p.add_argument("--out", help="output folder (default: output/demo)")
    p.add_argument("--ns", type=float, help="length of the AA reference run in ns (default: 8)")
    p.add_argument("--cg-ns", dest="cg_ns", type=float, help="length of the CG run in ns (default: 0.5)")
    p.add_argument("--epochs-potential", dest="epochs_potential", type=int,
                   help="maximum epochs of force matching (default: 20)")
    p.add_argument("--max-frames-potential", dest="max_frames_potential", type=int,
                   help="frames used for force matching (default: 20000)")
    p.add_argument("--epochs-backmapper", dest="epochs_backmapper", type=int,
                   help="maximum epochs of the temporal backmapper (default: 50)")
    p.add_argument("--epochs-baseline", dest="epochs_baseline", type=int,
                   help="maximum epochs of the frame-based baseline (default: 20)")
    p.add_argument("--lag-ps", dest="lag_ps", type=float, help="backmapping lag in ps (default: 1)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    return parser


COMMANDS: dict[str, Callable[[dict[str, Any]], Path]] = {
    "simulate": cmd_simulate,
    "map": cmd_map,
    "train-potential": cmd_train_potential,
    "train-backmapper": cmd_train_backmapper,
    "run": cmd_run,
    "backmap": cmd_backmap,
    "evaluate": cmd_evaluate,
    "bench": cmd_bench,
    "demo": cmd_demo,
}

_HINTS: list[tuple[type, str]] = [
    (FileNotFoundError, "check the path"),
    (FileExistsError, "choose another --out, or pass the flag named above"),
    (ValueError, "check the inputs named above; --help shows the options"),
]


def _blow_up_hint(exc: BaseException) -> str | None:
    from .reporters import SimulationBlowUp

    if isinstance(exc, SimulationBlowUp):
        return "try a smaller --timestep-fs, another --start-frame or --seed, or a better trained potential"
    return None


class _DropSimtkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "importing 'simtk.openmm' is deprecated" not in str(record.msg)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    flags = vars(args)
    command = flags["command"]
    cfg = dict(DEFAULTS[command])
    if flags.get("config"):
        config = Path(flags["config"])
        if not config.exists():
            raise FileNotFoundError(f"--config {config}: no such file")
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{flags['config']} must hold a YAML mapping of settings")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items() if k not in ("command", "created")}
        unknown = set(loaded) - set(cfg)
        if unknown:
            raise ValueError(f"{flags['config']}: unknown settings {sorted(unknown)} for '{command}'")
        cfg.update(loaded)
    cfg.update({k: v for k, v in flags.items() if k in cfg})
    cfg["_command"] = command
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        cfg = _settings(args)
        # openmmtorch imports the old simtk namespace, which logs a deprecation warning: noise for a CLI user
        quiet = _DropSimtkWarning()
        logging.getLogger().addFilter(quiet)
        threads = None
        try:
            threads = _set_threads(cfg)
            COMMANDS[args.command](cfg)
        finally:
            logging.getLogger().removeFilter(quiet)
            if threads is not None:  # leave an in-process caller's torch as it was
                import torch

                torch.set_num_threads(threads)
    except KeyboardInterrupt:
        print("interrupted; files written so far are kept", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if debug:
            raise
        hint = _blow_up_hint(exc) or next((h for t, h in _HINTS if isinstance(exc, t)),
                                          "rerun with --debug for the traceback")
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"openmm-backmap {args.command}: error: {message}\n  hint: {hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
