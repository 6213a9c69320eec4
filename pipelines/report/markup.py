"""HTML building blocks every section shares: escaping of untrusted text, number formatting, figure and table.

Captions, alt-text, OCR lines, keys and reasons come from the data, so everything interpolated into the page
goes through :func:`esc` unless it is markup built here.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(text: Any) -> str:
    """HTML-escape untrusted text; C0 controls (VLM noise) become visible control pictures."""
    s = "" if text is None else str(text)
    s = _CTRL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 32 else "\u2421", s)
    return html.escape(s, quote=True)


def fmt(v: float | None, digits: int = 2) -> str:
    """Thousands-separated number; "–" for a value that is missing or not finite."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:,.{digits}f}"


def figure(svg: str, caption: str) -> str:
    """A plot (inline SVG from :class:`~vila2_curate.pipelines.report.plots.Plots`) with its caption."""
    return f'<figure class="plot">{svg}<figcaption>{esc(caption)}</figcaption></figure>'


def table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'
