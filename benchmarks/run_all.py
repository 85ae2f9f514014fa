"""Run the benchmark suite and regenerate docs/benchmarks.md from benchmarks/results/*.md.

    python benchmarks/run_all.py                 # run every bench_*.py, then regenerate the page
    python benchmarks/run_all.py --only data_writer
    python benchmarks/run_all.py --collect       # only regenerate the page from recorded results
    python benchmarks/run_all.py --quick         # reduced settings, results in results/quick/ (page untouched)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "benchmarks.md"

#: Section titles and order on the benchmarks page (results/NAME.md).
SECTIONS = {
    "data_writer": "AA data writer overhead (issue 2)",
    "liquid_density": "Liquid densities under NPT vs experiment (issue 2)",
    "energy": "AAEnergy vs OpenMM (issue 3)",
    "cg_alanine": "Force-matched CG alanine dipeptide: quality (issue 4)",
    "cg_alanine_reseed": "Force-matched CG alanine dipeptide: spread between CG runs (issue 4)",
    "cg_chignolin": "Force-matched CG chignolin: stability and distances (issue 4)",
    "cg_speed": "CG alanine dipeptide in OpenMM: speed (issue 4)",
    "backmap_alanine": "Backmapping alanine dipeptide (issue 5)",
    "backmap_chignolin": "Backmapping chignolin (issue 5)",
    "backmap_chignolin_h512": "Backmapping chignolin with 512-wide networks (issue 5, `--hidden 512`)",
    "reporter_overhead": "BackmapReporter on a running CG simulation: wall-time overhead (issue 5)",
    "liquids": "Molecular liquids: CG potentials, size transfer, backmapping, speed (issue 6)",
}

INTRO = """# Benchmarks

Speed and quality targets are measured by the scripts in `benchmarks/`, not by timed tests. Each
script writes `benchmarks/results/NAME.json` (raw numbers, date, machine) and `NAME.md` (the table
below). Ratios are measured side by side in one run, because these machines are noisy.
Regenerate everything with `make bench` (or `python benchmarks/run_all.py`); this page is rebuilt from
the recorded results by `python benchmarks/run_all.py --collect`.
"""


def collect() -> None:
    parts = [INTRO]
    results = HERE / "results"
    names = list(SECTIONS) + sorted(p.stem for p in results.glob("*.md") if p.stem not in SECTIONS)
    for name in names:
        md = results / f"{name}.md"
        if not md.exists():
            parts.append(f"## {SECTIONS.get(name, name)}\n\n_Not yet recorded: run `python benchmarks/bench_{name}.py`._\n")
            continue
        parts.append(f"## {SECTIONS.get(name, name)}\n\n{md.read_text().strip()}\n")
    DOC.write_text("\n".join(parts))
    print(f"wrote {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
    parser.add_argument("--collect", action="store_true", help="only regenerate docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true",
                        help="run the scripts that have a --quick mode with it; results go to results/quick/ and the "
                             "recorded results and docs/benchmarks.md are left alone")
    args = parser.parse_args()
    if not args.collect:
        scripts = sorted(HERE.glob("bench_*.py"))
        if args.only:
            scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
        env = dict(os.environ)
        if args.quick:
            env["OPENMM_BACKMAP_BENCH_RESULTS"] = str(HERE / "results" / "quick")
        for script in scripts:
            command = [sys.executable, str(script)]
            if args.quick:
                if '"--quick"' not in script.read_text():
                    print(f"== {script.name}: skipped (no --quick mode)", flush=True)
                    continue
                command.append("--quick")
            print(f"== {script.name}", flush=True)
            subprocess.run(command, check=True, env=env)
    if not args.quick:
        collect()


if __name__ == "__main__":
    main()
