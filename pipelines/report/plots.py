"""Matplotlib figures as inline SVG: text kept as text, deterministic bytes (an id salt per figure, no
metadata), so a report renders the same twice."""

from __future__ import annotations

import io
from typing import Any

_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no RDF block, no URLs


class Plots:
    """Figures rendered as inline SVG with text kept as text and per-figure id salts (no id clashes)."""

    def __init__(self) -> None:
        self.count = 0

    def svg(self, fig: Any) -> str:
        import matplotlib

        self.count += 1
        buf = io.StringIO()
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"vila2-report-{self.count}"}):
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata=_NO_METADATA)
        text = buf.getvalue()
        return text[text.index("<svg") :]

    @staticmethod
    def figure(w: float, h: float) -> Any:
        from matplotlib.figure import Figure

        return Figure(figsize=(w, h), dpi=96)  # no layout engine: bbox_inches="tight" trims, at half the cost


def style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.25)
