"""The report's cost section: seconds per stage from ``timings.json``, and GPU-hours per 1M samples
(measured where the engine recorded GPU time, projected from assumed GPUs per worker otherwise)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vila2_curate.pipelines.report.markup import esc, figure, fmt, table
from vila2_curate.pipelines.report.plots import Plots, style
from vila2_curate.pipelines.report.scan import Root
from vila2_curate.pipelines.report.sections import STAGE_ORDER

# Assumed GPUs per worker for the throughput projection when the run records none (it records none today:
# resources live only in the config). Keys match a timings stage name or its prefix before "_".
DEFAULT_STAGE_GPUS: dict[str, float] = {
    "clipscore": 1.0,
    "deltaloss_score": 1.0,
    "recaption": 1.0,
    "grounding": 1.0,
}


def _prefix_match(name: str, keys: Iterable[str]) -> str | None:
    """``name``, else the longest key that ``name`` starts with plus ``_`` (recaption_r1, dedup_apply)."""
    keys = list(keys)
    if name in keys:
        return name
    hits = [k for k in keys if name.startswith(k + "_")]
    return max(hits, key=len) if hits else None


def _gpus_for(stage: str, gpus: Mapping[str, float]) -> float:
    k = _prefix_match(stage, gpus)
    return float(gpus[k]) if k is not None else 0.0


def _stage_rank(name: str) -> tuple[int, str]:
    k = _prefix_match(name, STAGE_ORDER)
    return (STAGE_ORDER.index(k) if k is not None else len(STAGE_ORDER), name)


def throughput(roots: list[Root], plots: Plots, gpus: Mapping[str, float]) -> str:
    out = []
    for r in roots:
        stages = r.timings.get("stages") or {}
        if not stages:
            continue
        names = sorted(stages, key=_stage_rank)
        rows = []
        for n in names:
            t = stages[n]
            rows_n = int(t.get("rows") or 0)
            sec = float(t.get("seconds") or 0.0)
            gsec = float(t.get("gpu_seconds") or 0.0)
            g = _gpus_for(n, gpus)
            if rows_n and gsec > 0:
                gh, how = gsec / rows_n * 1e6 / 3600, "measured"
            elif rows_n and g > 0:
                gh, how = sec / rows_n * 1e6 / 3600 * g, "projected"
            else:
                gh, how = (0.0 if rows_n else None), "CPU stage"
            rows.append(
                [
                    esc(n),
                    f"{rows_n:,}",
                    fmt(sec, 2),
                    fmt(float(t.get("cpu_seconds") or 0.0), 2),
                    fmt(1000 * sec / rows_n if rows_n else None, 2),
                    fmt(gsec, 2),
                    fmt(g, 2),
                    fmt(gh, 2) + f" <span class='muted'>{how}</span>",
                    fmt(sec / rows_n * 1e6 / 3600 if rows_n else None, 2),
                ]
            )
        fig = Plots.figure(6, 0.6 + 0.28 * len(names))
        ax = fig.subplots()
        vals = [
            1000 * float(stages[n].get("seconds") or 0) / max(int(stages[n].get("rows") or 0), 1)
            for n in names
        ]
        ax.barh(
            names[::-1],
            vals[::-1],
            color=["#f4a261" if _gpus_for(n, gpus) else "#8ab6d6" for n in names][::-1],
        )
        ax.set_xlabel("seconds per 1k rows (orange: GPU-model stage)", fontsize=8)
        style(ax)
        out.append(
            f"<h3>{esc(r.label)} · {esc(r.path)}</h3>"
            + figure(plots.svg(fig), f"Seconds per 1k rows per stage in {r.label}.")
            + table(
                [
                    "stage",
                    "rows",
                    "seconds",
                    "CPU-seconds",
                    "s / 1k rows",
                    "GPU-seconds",
                    "GPUs (assumed)",
                    "GPU-h / 1M samples",
                    "wall-h / 1M (1 worker)",
                ],
                rows,
                "num",
            )
        )
    if not out:
        return "<p class='muted'>No timings.json.</p>"
    assumed = ", ".join(f"{k}={v:g}" for k, v in sorted(gpus.items()))
    return (
        "<p class='formula'>GPU-hours per 1M samples = gpu_seconds / rows × 10⁶ / 3600 when the engine "
        "measured GPU time (gpu_seconds &gt; 0, GPU workers); otherwise, for a model stage, "
        "seconds / rows × 10⁶ / 3600 × GPUs — the wall time measured here, as if one worker holding that "
        "many GPUs ran at the same rate (a pessimistic bound when the stage ran on CPU). CPU stages count 0. "
        f"GPUs per stage are not recorded in the run's outputs, so they are assumed: {esc(assumed)} "
        "(pass <code>gpus=</code> to <code>write_report</code> to change them).</p>" + "".join(out)
    )
