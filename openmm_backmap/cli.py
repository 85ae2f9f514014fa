"""The ``openmm-backmap`` command line.

Every subcommand takes its settings from flags or from a YAML file (``--config``; flags win), writes the
settings it used next to its outputs, shows progress on long work, and reports errors as one line with a
hint (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

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
        map_dataset(aa, mapping, out, overwrite=cfg["overwrite"])
    mapping.save(out.with_suffix(".mapping.yaml"))
    _write_config(cfg, out.parent, out.stem + ".config.yaml")
    return out


def cmd_demo(cfg: dict[str, Any]) -> Path:
    """The main job (for now): alanine-dipeptide reference data -> CG mapping -> summary."""
    from .summary import dataset_summary

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    aa_path = out / "aa_reference.h5"
    sim_cfg = {**DEFAULTS["simulate"], "system": "alanine-dipeptide", "solvent": "obc2", "ns": cfg["ns"],
               "out": str(aa_path), "append": aa_path.exists(), "overwrite": False, "seed": cfg["seed"],
               "_command": "simulate"}
    print(f"[1/3] AA reference MD of alanine dipeptide (amber14 + OBC2, {cfg['ns']} ns) -> {aa_path}")
    cmd_simulate(sim_cfg)
    cg_path = out / "cg_backbone-cb.h5"
    print(f"[2/3] mapping to the 6-bead backbone-cb CG model -> {cg_path}")
    cmd_map({**DEFAULTS["map"], "data": str(aa_path), "preset": "backbone-cb", "out": str(cg_path),
             "overwrite": True, "_command": "map"})
    print("[3/3] summary")
    summary = dataset_summary(aa_path, cg_path, out)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_config(cfg, out, "demo.config.yaml")
    print((out / "summary.md").read_text())
    print(f"outputs in {out.resolve()}")
    return out


# ----------------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, dict[str, Any]] = {
    "simulate": {"system": "alanine-dipeptide", "solvent": "obc2", "resname": "BENZ", "n_molecules": 300,
                 "ns": 1.0, "interval": 100, "timestep_fs": 2.0, "temperature": 300.0, "friction": 1.0,
                 "equilibrate_ps": 20.0, "seed": 0, "platform": None, "dtype": "float32", "out": "aa.h5",
                 "append": False, "overwrite": False},
    "map": {"data": None, "preset": None, "mapping": None, "out": "cg.h5", "overwrite": False},
    "demo": {"out": "output/demo", "ns": 1.0, "seed": 0},
}

EXAMPLES = {
    "simulate": """\
        examples:
          openmm-backmap simulate --system alanine-dipeptide --solvent obc2 --ns 2 --out ala2.h5
          openmm-backmap simulate --system liquid --resname BENZ --n-molecules 300 --ns 0.5 --out benzene.h5
          openmm-backmap simulate --out ala2.h5 --ns 4 --append     # extend the same run to 4 ns""",
    "map": """\
        examples:
          openmm-backmap map --data ala2.h5 --preset backbone-cb --out ala2_cg.h5
          openmm-backmap map --data benzene.h5 --preset benzene-3bead --out benzene_cg.h5""",
    "demo": """\
        example:
          openmm-backmap demo --out output/demo --ns 1""",
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
    p.add_argument("--equilibrate-ps", dest="equilibrate_ps", type=float, help="unstored equilibration (ps)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = add("demo", "Alanine dipeptide: AA reference data with forces -> backbone-cb CG data -> summary and plots.")
    p.add_argument("--out", help="output folder (default: output/demo)")
    p.add_argument("--ns", type=float, help="length of the AA reference run in ns (default: 1)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    return parser


COMMANDS: dict[str, Callable[[dict[str, Any]], Path]] = {
    "simulate": cmd_simulate,
    "map": cmd_map,
    "demo": cmd_demo,
}

_HINTS = {
    FileNotFoundError: "check the path",
    FileExistsError: "choose another --out, or pass the flag named above",
    ValueError: "check the inputs named above; --help shows the options",
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    flags = vars(args)
    command = flags["command"]
    cfg = dict(DEFAULTS[command])
    if flags.get("config"):
        loaded = yaml.safe_load(Path(flags["config"]).read_text()) or {}
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
        COMMANDS[args.command](_settings(args))
    except KeyboardInterrupt:
        print("interrupted; files written so far are kept", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line unless --debug
        if debug:
            raise
        hint = next((h for t, h in _HINTS.items() if isinstance(exc, t)), "rerun with --debug for the traceback")
        print(f"openmm-backmap {args.command}: error: {exc}\n  hint: {hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
