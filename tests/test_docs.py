"""The documentation builds with warnings as errors (what `make docs` runs), into a temporary folder.

Sphinx and myst-parser are an optional extra (``pip install -e ".[docs]"``); without them the test is skipped.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="Sphinx is not installed (optional extra: pip install -e '.[docs]')")
    pytest.importorskip("myst_parser", reason="myst-parser is not installed (optional extra: pip install -e '.[docs]')")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    for page in ("index", "installation", "tutorial", "theory", "benchmarks", "api/index", "api/backmap"):
        assert (out / f"{page}.html").is_file(), page
    # autodoc really imported the package (an import failure would leave the API pages empty)
    assert "openmm_backmap.reporters.BackmapReporter" in (out / "api" / "reporters.html").read_text()
