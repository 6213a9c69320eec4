"""The page: ``render_report`` assembles the sections into one self-contained HTML file; ``write_report`` and
``main`` write it.

Why a single file: reviewers open it from an object store, a CI artifact or an e-mail, often offline, so
everything is inline: the CSS and a tiny JS check (``report.css`` and ``report.js``, package data next to this
module), plots as inline SVG, thumbnails as base64 JPEG data URLs.
"""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Mapping
from importlib.resources import files

import fsspec

import vila2_curate.pipelines.report.costs as costs
import vila2_curate.pipelines.report.sections as sections
from vila2_curate.pipelines.io.writers.atomic import write_bytes_atomic
from vila2_curate.pipelines.report.markup import esc
from vila2_curate.pipelines.report.plots import Plots
from vila2_curate.pipelines.report.scan import Root, dedup_thumbs_from_work, join, open_root, scan_root


def _asset(name: str) -> str:
    """A text file shipped next to this module (package data: pyproject lists ``*.css`` and ``*.js``)."""
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


# Inlined into <style> and <script> (the page loads nothing). report.js is the proof of rendering for headless
# checks: it counts drawn plots and decoded gallery images into the DOM.
_CSS = _asset("report.css")
_JS = _asset("report.js")

SECTIONS = (
    ("funnel", "1 · Funnel: rows per stage and drop reason"),
    ("clip", "2 · CLIPScore per source"),
    ("words", "3 · Words per caption by round"),
    ("dedup", "4 · Duplicate groups"),
    ("specialists", "5 · Specialist coverage"),
    ("throughput", "6 · Throughput and cost per stage"),
    ("gallery", "7 · Gallery: captions by round"),
)


def render_report(out_dirs: list[str], gallery: int = 12, gpus: Mapping[str, float] | None = None) -> str:
    """The report's HTML text (``write_report`` writes it)."""
    if not out_dirs:
        raise ValueError("write_report needs at least one dataset root")
    roots = [open_root(p) for p in out_dirs]
    first = roots[0]
    groups, members = sections.DEDUP_EXAMPLE_GROUPS, sections.DEDUP_EXAMPLE_MEMBERS
    examples = ((first.summaries.get("dedup") or {}).get("examples") or [])[:groups]
    wanted = {str(m.get("id")) for g in examples for m in (g.get("members") or [])[:members]}
    for i, r in enumerate(roots):
        r.scan = scan_root(
            r, gallery=gallery if i == len(roots) - 1 else 0, want_thumbs=wanted if i == 0 else set()
        )
    thumbs = dict(first.scan.thumbs)
    thumbs.update(dedup_thumbs_from_work(first, wanted - thumbs.keys()))
    plots = Plots()
    gpu_map = dict(costs.DEFAULT_STAGE_GPUS if gpus is None else gpus)
    body = {
        "funnel": sections.funnel(first, plots),
        "clip": sections.clip(first, plots),
        "words": sections.words(roots, plots),
        "dedup": sections.dedup(first, plots, thumbs),
        "specialists": sections.specialists(roots, plots),
        "throughput": costs.throughput(roots, plots, gpu_map),
        "gallery": sections.gallery(roots, gallery),
    }
    nav = "".join(f'<a href="#{sid}">{esc(title.split(" · ")[1])}</a>' for sid, title in SECTIONS)
    secs = "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{body[sid]}</section>' for sid, title in SECTIONS
    )
    name = first.meta.get("name") or posixpath.basename(first.base.rstrip("/")) or "dataset"
    roots_txt = " → ".join(f"{r.label}: {r.path} ({r.scan.samples:,} published samples)" for r in roots)
    total = first.stats.get("total") or {}
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
        f"<title>vila2-curate report · {esc(name)}</title><style>\n{_CSS}</style></head>"
        f"<body data-plots='0' data-images='0' data-expected-plots='{plots.count}'>"
        f"<header><h1>vila2-curate report · {esc(name)}</h1><div class='muted'>{esc(roots_txt)}</div>"
        f"<div class='muted'>round 0: {total.get('rows_in', 0):,} rows in → {total.get('kept', 0):,} kept, "
        f"{total.get('dropped', 0):,} dropped, {total.get('quarantined', 0):,} quarantined</div>"
        f"{_health_warnings(first)}<nav>{nav}</nav></header><main>{secs}</main>"
        f"<script>\n{_JS}</script></body></html>"
    )


def _health_warnings(root: Root) -> str:
    """Sources whose image references mostly failed (stats.json ``health``, pipelines/engine/health.py)."""
    from vila2_curate.pipelines.engine.health import warning_lines

    lines = warning_lines(root.stats)
    if not lines:
        return ""
    items = "".join(f"<li>{esc(line.removeprefix('warning: '))}</li>" for line in lines)
    return f"<div id='source-health' class='bad'><b>Source warnings</b><ul>{items}</ul></div>"


def write_report(
    out_dirs: list[str], dest: str | None = None, gallery: int = 12, gpus: Mapping[str, float] | None = None
) -> str:
    """Write the self-contained report for ``out_dirs`` (round 0 first, then later rounds); return its path.

    ``dest`` defaults to ``<first root>/report.html``; the file is written to a temporary name and renamed.
    ``gpus`` maps a timings stage name (or its prefix) to GPUs per worker for the cost projection;
    default :data:`DEFAULT_STAGE_GPUS`.
    """
    text = render_report(list(out_dirs), gallery=gallery, gpus=gpus)
    dest = dest or join(str(out_dirs[0]), "report.html")
    fs, path = fsspec.core.url_to_fs(dest)
    write_bytes_atomic(fs, path, text.encode("utf-8"))
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write report.html for a curated dataset and its rounds.")
    p.add_argument("out_dirs", nargs="+", help="dataset roots: round 0 first, then later rounds")
    p.add_argument("--dest", default=None, help="default: <first root>/report.html")
    p.add_argument("--gallery", type=int, default=12, help="gallery samples")
    a = p.parse_args(argv)
    print(write_report(a.out_dirs, a.dest, a.gallery))

