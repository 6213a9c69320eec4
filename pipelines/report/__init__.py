"""One self-contained ``report.html`` for a curated dataset (round 0) and its recaption rounds.

Modules: ``scan`` reads an output folder (``stats.json``, ``summaries.json``, ``timings.json``,
``manifest.parquet``, ``wids-meta.json`` + the tars, and, when still present, ``_work/seg*/``: signature and
row parquet of the two-pass stages); ``sections`` renders each section (funnel, CLIP, words per round, dedup,
specialists, gallery) and ``costs`` the throughput and GPU cost with ``plots`` (matplotlib SVG) and ``markup`` (escaping,
tables); ``page`` assembles the page with ``report.css`` and ``report.js`` inlined and writes it.

Usage: ``python -m vila2_curate.pipelines.report out/quickstart/r0 out/quickstart/r1 [--dest report.html]``.
"""

from vila2_curate.pipelines.report.costs import DEFAULT_STAGE_GPUS
from vila2_curate.pipelines.report.markup import esc
from vila2_curate.pipelines.report.page import SECTIONS, main, render_report, write_report
from vila2_curate.pipelines.report.scan import IMAGE_EXTS, THUMB_SIDE
from vila2_curate.pipelines.report.sections import (
    DEDUP_EXAMPLE_GROUPS,
    DEDUP_EXAMPLE_MEMBERS,
    STAGE_ORDER,
)

__all__ = [
    "DEDUP_EXAMPLE_GROUPS",
    "DEDUP_EXAMPLE_MEMBERS",
    "DEFAULT_STAGE_GPUS",
    "IMAGE_EXTS",
    "SECTIONS",
    "STAGE_ORDER",
    "THUMB_SIDE",
    "esc",
    "main",
    "render_report",
    "write_report",
]
