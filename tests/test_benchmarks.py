"""Every benchmark script has a ``--quick`` mode (issue 7: ``openmm-backmap bench --quick`` runs them all).

``benchmarks/run_all.py --quick`` silently skips scripts without one, so a new benchmark without ``--quick`` would
drop out of the smoke run unnoticed; these tests fail instead. Nothing is run beyond argument parsing: each script
is executed as ``__main__`` with ``--help``, which exits before any work.
"""
from __future__ import annotations

import ast
import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))


def test_the_benchmarks_are_there():
    assert BENCHMARKS.is_dir() and len(SCRIPTS) >= 9


def _quick_argument(tree: ast.AST) -> ast.Call | None:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--quick"):
            return node
    return None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_declares_a_quick_flag_that_it_uses(script):
    source = script.read_text()
    assert '"--quick"' in source  # what run_all.py looks for
    call = _quick_argument(ast.parse(source))
    assert call is not None, f"{script.name}: no parser.add_argument(\"--quick\", ...)"
    keywords = {k.arg: k.value for k in call.keywords}
    assert isinstance(keywords.get("action"), ast.Constant) and keywords["action"].value == "store_true"
    assert "help" in keywords, f"{script.name}: --quick needs a help text saying what it shrinks"
    assert "args.quick" in source, f"{script.name}: --quick is declared but never used"
    # quick runs write under OPENMM_BACKMAP_BENCH_RESULTS (results/quick/), never into the recorded results
    assert 'Path(__file__).parent / "results"' not in source, f"{script.name}: use _common.RESULTS"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_accepts_quick(script, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENMM_BACKMAP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts put benchmarks/ first
    for name in [m for m in sys.modules if m == "_common" or m.startswith("bench_") or m == "liquid_data"]:
        monkeypatch.delitem(sys.modules, name)  # _common reads the environment variable on import
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code in (0, None)
    assert "--quick" in out.getvalue()


@pytest.mark.parametrize("argv,env,expected", [
    (["bench_x.py", "--quick"], None, "results/quick"),
    (["bench_x.py"], None, "results"),
    (["bench_x.py", "--quick"], "ENV", "ENV"),
])
def test_quick_runs_by_hand_never_write_into_the_recorded_results(argv, env, expected, monkeypatch, tmp_path):
    """A script started with --quick by hand (not through run_all.py) writes to results/quick, not results/."""
    bench_dir = Path(__file__).resolve().parent.parent / "benchmarks"
    if env is None:
        monkeypatch.delenv("OPENMM_BACKMAP_BENCH_RESULTS", raising=False)
    else:
        monkeypatch.setenv("OPENMM_BACKMAP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", argv)
    namespace = runpy.run_path(str(bench_dir / "_common.py"))
    want = tmp_path if env else bench_dir / expected
    assert Path(namespace["RESULTS"]) == want
