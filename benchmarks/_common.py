"""Shared helpers for benchmark scripts: machine description and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

#: Where results go. Smoke runs (``--quick``, whether from ``run_all.py --quick`` or a script run by hand) go to
#: ``results/quick`` so that they never overwrite recorded results; ``OPENMM_BACKMAP_BENCH_RESULTS`` overrides both.
_DEFAULT_RESULTS = Path(__file__).parent / "results"
RESULTS = Path(os.environ.get("OPENMM_BACKMAP_BENCH_RESULTS",
                              _DEFAULT_RESULTS / "quick" if "--quick" in sys.argv[1:] else _DEFAULT_RESULTS))


def machine() -> dict:
    """Where a benchmark ran: CPU model, core count, memory and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for dist in ("openmm", "torch", "openmmtorch", "numpy", "h5py"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_GiB": mem_gb, "python": platform.python_version(),
            "os": platform.platform(), **versions}


def save(name: str, result: dict, markdown: str) -> Path:
    """Write ``results/NAME.json`` (with date and machine) and ``results/NAME.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "date": datetime.date.today().isoformat(), "machine": machine(), **result}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2))
    m = record["machine"]
    header = f"_{record['date']}, {m['cpu']}, {m['cores']} cores, OpenMM {m.get('openmm')}, torch {m.get('torch')}_\n\n"
    (RESULTS / f"{name}.md").write_text(header + markdown)
    return RESULTS / f"{name}.json"
