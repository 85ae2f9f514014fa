"""One static HTML page for an evaluation: header, metric table with targets, figures with captions.

The page opens from disk without a network connection or JavaScript: the CSS is inline, figures are linked by
relative paths (PNG files next to the page) or, with ``embed=True``, inlined as base64 data URIs. Every figure
carries a note naming its file, so a page copied without its PNGs still says what is missing.

``sections`` is a list of dicts; each may hold (all optional except ``title``):

``title``
    Heading of the section.
``text``
    Plain text (escaped); blank lines separate paragraphs.
``metrics``
    Metric rows (dicts with ``name``, ``value``, optional ``subject``, ``unit``, ``target``, ``passed``,
    ``note``), rendered as a table with a ✓ (target met), ✗ (missed) or – (no target) marker.
``table``
    A plain table: ``{"columns": [...], "rows": [[...], ...]}``.
``figures``
    ``[{"path": ..., "caption": ...}, ...]``; PNG files, best in the folder of the page.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

__all__ = ["write_report", "format_value", "machine_info", "report_versions", "HOW_TO_READ", "MARKERS"]

#: Marker per ``passed`` value: target met, missed, no target (or not computable).
MARKERS = {True: "✓", False: "✗", None: "–"}

#: Default "how to read this" paragraph.
HOW_TO_READ = (
    "Every row of the metric table is one number computed from the files named under Inputs. Where the "
    "project defines a target (DESIGN.md, issue targets) the row shows it and a marker: ✓ the target is met, "
    "✗ it is missed, – there is no target for this number (it is there for context). Distribution distances "
    "are Jensen–Shannon divergences in nats (0 = identical histograms, ln 2 ≈ 0.693 = disjoint). The figures "
    "show the distributions behind the numbers; a difference that the numbers hide (a shifted tail, a missing "
    "basin) is usually visible there."
)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em 2em 3em; color: #1d2328; line-height: 1.45; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #d5dbe0; padding-bottom: 0.2em; }
.meta { color: #57606a; font-size: 0.9em; }
.meta td { padding: 0.05em 1em 0.05em 0; vertical-align: top; }
table.data { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
table.data th, table.data td { border: 1px solid #d5dbe0; padding: 0.3em 0.7em; text-align: left; }
table.data th { background: #f3f5f7; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mark { text-align: center; font-weight: bold; }
td.pass { color: #1a7f37; } td.fail { color: #cf222e; } td.none { color: #8c959f; }
tr.fail td { background: #fff5f5; }
.summary { font-weight: 600; }
.summary .pass { color: #1a7f37; } .summary .fail { color: #cf222e; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { font-size: 0.9em; color: #444c56; margin-top: 0.3em; }
.file { font-size: 0.82em; color: #8c959f; }
.missing { color: #cf222e; }
.note { font-size: 0.85em; color: #57606a; }
"""


def format_value(value: Any, unit: str = "") -> str:
    """A number for a table: 4 significant digits (integers as they are), ``nan``/``inf`` spelled out."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            text = "∞" if value > 0 else "−∞"
        elif value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            text = f"{value:.3e}"
        else:
            text = f"{value:.4g}"
    else:
        try:
            return format_value(float(value), unit)
        except (TypeError, ValueError):
            text = str(value)
    return f"{text} {unit}".strip() if unit else text


def machine_info() -> dict[str, str]:
    """Host, OS, CPU and core count of the machine writing the report."""
    info = {"host": platform.node() or "?", "os": platform.platform(), "cpu": platform.processor()
            or platform.machine(), "cores": str(os.cpu_count())}
    try:
        import torch

        info["torch threads"] = str(torch.get_num_threads())
    except Exception:  # pragma: no cover - torch is a dependency
        pass
    return info


def report_versions() -> dict[str, str]:
    """Versions of the packages behind the numbers (:func:`openmm_backmap.data.package_versions` plus plotting)."""
    from importlib import metadata

    from .data import package_versions

    out = package_versions()
    for dist in ("scipy", "matplotlib", "deeptime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _paragraphs(text: str) -> str:
    return "\n".join(f"<p>{_esc(p.strip())}</p>" for p in str(text).split("\n\n") if p.strip())


def _metric_table(rows: Sequence[Mapping[str, Any]]) -> str:
    with_subject = any(r.get("subject") for r in rows)
    head = ["Metric"] + (["Trajectory"] if with_subject else []) + ["Value", "Target", "Pass", "Note"]
    out = ['<table class="data metrics">', "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        passed = r.get("passed")
        passed = None if passed is None else bool(passed)
        cls = {True: "pass", False: "fail", None: "none"}[passed]
        cells = [f"<td>{_esc(r.get('name', r.get('key', '?')))}</td>"]
        if with_subject:
            cells.append(f"<td>{_esc(r.get('subject') or '')}</td>")
        cells.append(f'<td class="num">{_esc(format_value(r.get("value"), r.get("unit") or ""))}</td>')
        cells.append(f"<td>{_esc(r.get('target') or '–')}</td>")
        label = {True: "target met", False: "target missed", None: "no target"}[passed]
        cells.append(f'<td class="mark {cls}" title="{label}">{MARKERS[passed]}</td>')
        cells.append(f'<td class="note">{_esc(r.get("note") or "")}</td>')
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    out.append("</table>")
    judged = [r.get("passed") for r in rows if r.get("passed") is not None]
    if judged:
        n_ok = sum(bool(p) for p in judged)
        cls = "pass" if n_ok == len(judged) else "fail"
        out.insert(0, f'<p class="summary"><span class="{cls}">{n_ok} of {len(judged)}</span> targets met.</p>')
    return "\n".join(out)


def _plain_table(table: Mapping[str, Any]) -> str:
    columns = list(table.get("columns", []))
    out = ['<table class="data">']
    if columns:
        out.append("<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr>")
    for row in table.get("rows", []):
        out.append("<tr>" + "".join(f"<td>{_esc(format_value(c) if isinstance(c, float) else c)}</td>"
                                    for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(fig: Mapping[str, Any], page_dir: Path, embed: bool) -> str:
    path = Path(fig["path"])
    if not path.is_absolute() and not path.exists():
        path = page_dir / path  # relative to the page
    caption = _esc(fig.get("caption", ""))
    try:
        rel = Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()
    except ValueError:  # other drive (Windows)
        rel = path.resolve().as_uri()
    if not path.exists():
        return (f'<figure><p class="missing">Figure missing: {_esc(rel)} was not written.</p>'
                f"<figcaption>{caption}</figcaption></figure>")
    if embed:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        note = f"embedded copy of {_esc(rel)}"
    else:
        src = _esc(rel)
        note = f"file: {_esc(rel)}"
    alt = _esc(fig.get("alt") or str(fig.get("caption", "")).split(". ")[0] or rel)
    return (f'<figure><img src="{src}" alt="{alt}">'
            f'<figcaption>{caption} <span class="file">[{note}]</span></figcaption></figure>')


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    sections: Sequence[Mapping[str, Any]],
    how_to_read: Optional[str] = HOW_TO_READ,
    versions: Optional[Mapping[str, str]] = None,
    machine: Optional[Mapping[str, str]] = None,
    embed: bool = False,
) -> Path:
    """Write one static HTML page and return its path.

    Parameters
    ----------
    path
        The ``.html`` file (its folder is created).
    title
        Page title.
    sections
        Sections in order (see the module docstring): ``title`` and any of ``text``, ``metrics``, ``table``,
        ``figures``.
    how_to_read
        The "How to read this" paragraph after the header (``None`` leaves it out).
    versions, machine
        Shown in the header; default :func:`report_versions` and :func:`machine_info`.
    embed
        Inline the figures as base64 data URIs (one self-contained file) instead of linking the PNG files.

    Returns
    -------
    pathlib.Path
        The page.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page_dir = path.parent
    versions = dict(report_versions() if versions is None else versions)
    machine = dict(machine_info() if machine is None else machine)
    created = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        '<table class="meta">',
        f"<tr><td>Created</td><td>{_esc(created)}</td></tr>",
        "<tr><td>Machine</td><td>" + _esc(", ".join(f"{k}: {v}" for k, v in machine.items())) + "</td></tr>",
        "<tr><td>Versions</td><td>" + _esc(", ".join(f"{k} {v}" for k, v in versions.items())) + "</td></tr>",
        "</table>",
    ]
    if how_to_read:
        parts += ["<h2>How to read this</h2>", _paragraphs(how_to_read)]
    for section in sections:
        parts.append(f"<h2>{_esc(section.get('title', ''))}</h2>")
        if section.get("text"):
            parts.append(_paragraphs(section["text"]))
        if section.get("metrics"):
            parts.append(_metric_table(section["metrics"]))
        if section.get("table"):
            parts.append(_plain_table(section["table"]))
        for fig in section.get("figures") or ():
            parts.append(_figure(fig, page_dir, embed))
    if not embed and any(section.get("figures") for section in sections):
        parts.append('<p class="note">The figures are PNG files linked relative to this page: keep them in the same '
                     "folder when moving or sending the report (a figure that does not show names its file below "
                     "it).</p>")
    parts.append("</body></html>")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
