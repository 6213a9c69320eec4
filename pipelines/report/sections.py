"""The report's sections, each an HTML fragment from the scanned roots (round 0 first, then later rounds).

Figures are drawn through one shared :class:`~vila2_curate.pipelines.report.plots.Plots`, so the order in
which the page calls these fixes each figure's id salt; every string from the data goes through ``esc``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from vila2_curate.pipelines.report.markup import esc, figure, fmt, table
from vila2_curate.pipelines.report.plots import Plots, style
from vila2_curate.pipelines.report.scan import Acc, Item, Root, clip_hists_from_work

# Stage order for the funnel; stages not listed follow in order of first appearance.
STAGE_ORDER = (
    "read",
    "normalize",
    "dedup",
    "clipscore",
    "clip_filter",
    "deltaloss",
    "recaption",
    "ocr",
    "grounding",
    "spatial",
    "document",
    "write",
)
DEDUP_EXAMPLE_GROUPS = 8
DEDUP_EXAMPLE_MEMBERS = 6


def _clip_text(text: Any, n: int = 240) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[:n] + "…"


def _stage_of(reason_key: str) -> tuple[str, str]:
    stage, _, reason = reason_key.partition(":")
    return (stage, reason) if reason else ("other", stage)


def _ordered_stages(stages: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(stages))
    known = [s for s in STAGE_ORDER if s in seen]
    return known + [s for s in seen if s not in STAGE_ORDER]


def funnel(root: Root, plots: Plots) -> str:
    sources: dict[str, Any] = root.stats.get("sources") or {}
    if not sources:
        return "<p class='muted'>No stats.json in the curated root.</p>"
    stages = _ordered_stages(_stage_of(k)[0] for s in sources.values() for k in (s.get("reasons") or {}))
    steps: dict[str, list[tuple[str, int]]] = {}
    rows = []
    for name, s in sources.items():
        left = int(s.get("rows_in", 0))
        seq = [("rows in", left)]
        by_stage: Counter = Counter()
        for k, v in (s.get("reasons") or {}).items():
            by_stage[_stage_of(k)[0]] += int(v)
        for st in stages:
            left -= by_stage.get(st, 0)
            seq.append((f"after {st}", left))
        seq.append(("kept", int(s.get("kept", 0))))
        steps[name] = seq
        ok = left == int(s.get("kept", 0))
        rows.append(
            [esc(name)]
            + [f"{n:,}" for _, n in seq[:-1]]
            + [
                f"<b>{seq[-1][1]:,}</b>" + ("" if ok else " <span class='bad'>≠</span>"),
                f"{int(s.get('quarantined', 0)):,}",
            ]
        )
    head = ["source", "rows in"] + [f"after {esc(s)}" for s in stages] + ["kept", "of which quarantined⁺"]
    html_rows = table(head, rows, "num")

    fig = Plots.figure(7.5, 0.5 + 0.32 * (len(stages) + 2) * len(steps))
    axes = fig.subplots(len(steps), 1, squeeze=False, sharex=True, gridspec_kw={"hspace": 0.45})[:, 0]
    for ax, (name, seq) in zip(axes, steps.items(), strict=True):
        labels = [lab for lab, _ in seq][::-1]
        vals = [n for _, n in seq][::-1]
        colors = [
            "#2a9d8f" if lab == "kept" else "#8ab6d6" if lab == "rows in" else "#c9d6df" for lab in labels
        ]
        ax.barh(labels, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:,}", va="center", fontsize=7)
        ax.set_title(name, fontsize=9, loc="left")
        style(ax)
    axes[-1].set_xlabel("rows", fontsize=8)
    svg = figure(
        plots.svg(fig), "Rows left after each stage, per source (stage = prefix of the stats reason)."
    )

    reasons = sorted(
        {k for s in sources.values() for k in (s.get("reasons") or {})},
        key=lambda k: (stages.index(_stage_of(k)[0]) if _stage_of(k)[0] in stages else 99, k),
    )
    names = list(sources)
    rrows = [
        [esc(_stage_of(k)[0]), esc(_stage_of(k)[1])]
        + [str((sources[n].get("reasons") or {}).get(k, "")) for n in names]
        for k in reasons
    ]
    reason_tbl = table(["stage", "reason"] + [esc(n) for n in names], rrows, "num")
    img_rows = [
        [
            esc(n),
            f"{int(s.get('images_in', 0)):,}",
            f"{int(s.get('images_kept', 0)):,}",
            esc(", ".join(f"{k} {v}" for k, v in sorted((s.get("image_reasons") or {}).items()))),
        ]
        for n, s in sources.items()
        if s.get("images_in")
    ]
    img_tbl = (
        (
            "<h3>Images inside documents (MMC4)</h3>"
            + table(["source", "images in", "images kept", "image drop reasons"], img_rows)
        )
        if img_rows
        else ""
    )
    shards = root.stats.get("shards") or []
    srows = [
        [
            esc(s.get("source")),
            esc(s.get("shard")),
            f"{s.get('rows_in', 0):,}",
            f"{s.get('kept', 0):,}",
            f"{s.get('dropped', 0):,}",
            f"{s.get('quarantined', 0):,}",
            "✓"
            if s.get("rows_in", 0) == s.get("kept", 0) + s.get("dropped", 0) + s.get("quarantined", 0)
            else "<span class='bad'>✗</span>",
        ]
        for s in shards
    ]
    shard_tbl = table(
        ["source", "input shard", "rows in", "kept", "dropped", "quarantined", "balanced"], srows, "num"
    )
    return (
        f"{svg}{html_rows}<p class='muted'>⁺ quarantined rows are counted in their stage's reasons too "
        f"(rows in = kept + dropped + quarantined; balanced: {esc(root.stats.get('balanced'))}).</p>"
        f"<h3>Drop reasons</h3>{reason_tbl}{img_tbl}"
        f"<details><summary>Per input shard ({len(shards)})</summary>{shard_tbl}</details>"
    )


def clip(root: Root, plots: Plots) -> str:
    hists = clip_hists_from_work(root)
    origin = "all rows the clip filter saw (from _work clip_filter signatures)"
    if not hists:
        hists = root.scan.clip
        origin = "kept rows only (published clip_score; _work is gone, so dropped rows are missing)"
    if not hists:
        return "<p class='muted'>No CLIP scores in this run (no clipscore stage).</p>"
    groups = (root.summaries.get("clip_filter") or {}).get("groups") or {}
    out = []
    for name in sorted(hists):
        h = hists[name]
        if not h.n:
            continue
        counts, edges = h.rebinned()
        g = groups.get(name) or {}
        cut = g.get("top_percent_cut", g.get("threshold", g.get("min_score")))
        fig = Plots.figure(4.2, 2.4)
        ax = fig.subplots()
        ax.bar(
            edges[:-1],
            counts,
            width=np.diff(edges),
            align="edge",
            color="#8ab6d6",
            edgecolor="white",
            linewidth=0.4,
        )
        if isinstance(cut, int | float):
            ax.axvline(float(cut), color="#d62828", linewidth=1.5, linestyle="--")
            ax.text(
                float(cut), ax.get_ylim()[1] * 0.95, f" cut {cut:.3f}", color="#d62828", fontsize=7, va="top"
            )
        ax.set_title(f"{name}  (n={h.n:,})", fontsize=9, loc="left")
        ax.set_xlabel("CLIP score", fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
        style(ax)
        kept = (
            f"kept {g.get('kept')} / {g.get('rows')}, dropped {g.get('dropped')}"
            if g
            else "no filter summary"
        )
        out.append(figure(plots.svg(fig), f"{name}: {kept}; cut {fmt(cut, 4) if cut is not None else '–'}"))
    return (
        f"<p class='muted'>Scores: {esc(origin)}. Dashed line: the clip_filter cut from summaries.json.</p>"
        f"<div class='grid'>{''.join(out)}</div>"
    )


def words(roots: list[Root], plots: Plots) -> str:
    cells: dict[tuple[str, int], tuple[Acc, Counter]] = {}
    for r in roots:  # the first root that holds a (source, round) provides it
        for k, acc in r.scan.words.items():
            if k not in cells and acc.n:
                cells[k] = (acc, r.scan.flags.get(k, Counter()))
    if not cells:
        return "<p class='muted'>No published samples with captions (MMC4 documents are not recaptioned).</p>"
    sources = sorted({s for s, _ in cells})
    rounds = sorted({r for _, r in cells})
    head = ["source"] + ["original (alt-text)" if r == 0 else f"round {r}" for r in rounds]
    rows = []
    for s in sources:
        row = [esc(s)]
        for r in rounds:
            acc, flags = cells.get((s, r), (Acc(), Counter()))
            bad = sum(flags.get(f, 0) for f in ("truncated", "refusal", "empty"))
            note = f" <span class='muted'>({bad} flagged)</span>" if bad else ""
            row.append(
                f"{fmt(acc.mean, 1)} ± {fmt(acc.std, 1)} <span class='muted'>n={acc.n}</span>{note}"
                if acc.n
                else "–"
            )
        rows.append(row)
    fig = Plots.figure(7, 2.6)
    ax = fig.subplots()
    width = 0.8 / len(rounds)
    for j, r in enumerate(rounds):
        means = [(cells.get((s, r), (Acc(),))[0].mean or 0.0) for s in sources]
        stds = [(cells.get((s, r), (Acc(),))[0].std or 0.0) for s in sources]
        ax.bar(
            np.arange(len(sources)) + j * width,
            means,
            width,
            yerr=stds,
            capsize=2,
            label="original" if r == 0 else f"round {r}",
        )
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, sources, fontsize=8)
    ax.set_ylabel("words per caption", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    style(ax)
    return table(head, rows, "num") + figure(
        plots.svg(fig),
        "Mean ± std words per caption, per source and round "
        "(original = round-0 alt-text; flagged = truncated/refusal/empty captions).",
    ) + saturation(roots)


def saturation(roots: list[Root]) -> str:
    """Round saturation from the latest root's summaries.json["rounds"] (recaption.saturation): does round
    k still change the captions, and does CLIP agree more with them? VILA² stopped gaining at round 4."""
    rounds = next((r.summaries.get("rounds") for r in reversed(roots) if r.summaries.get("rounds")), None)
    if not rounds:
        return ""
    has_clip = any("clip_n" in v for v in rounds.values())
    head = ["round", "captions", "words (mean ± std)", "changed from k−1", "Jaccard k−1→k", "difflib k−1→k"]
    head += ["CLIP cosine (mean ± std)", "CLIP-S"] if has_clip else []
    rows = []
    for k in sorted(rounds, key=int):
        v = rounds[k]
        row = ["original (alt-text)" if k == "0" else f"round {esc(k)}", f"{v.get('captions', 0):,}",
               f"{fmt(v.get('words_mean'), 1)} ± {fmt(v.get('words_std'), 1)}"]
        if k == "0":
            row += ["–", "–", "–"]
        else:
            share = v.get("changed_share")
            row += [("–" if share is None else f"{100 * share:.1f}%")
                    + f" <span class='muted'>of {v.get('compared_with_previous', 0):,}</span>",
                    fmt(v.get("jaccard_mean"), 3), fmt(v.get("difflib_ratio_mean"), 3)]
        if has_clip:
            row += ([f"{fmt(v.get('clip_cosine_mean'), 3)} ± {fmt(v.get('clip_cosine_std'), 3)}",
                     fmt(v.get("clip_score_mean"), 3)] if "clip_n" in v else ["–", "–"])
        rows.append(row)
    note = ("CLIP: each round's caption scored against its image by the clipscore stage of the latest run."
            if has_clip else "No clipscore stage ran after the recaption: CLIP agreement per round omitted.")
    return ("<h3>Round saturation</h3>" + table(head, rows, "num")
            + f"<p class='muted'>summaries.json rounds, over the published pairs. A round that changes few "
              f"captions and leaves similarity near 1 adds little (VILA² stopped gaining at round 4). {note}</p>")


def dedup(root: Root, plots: Plots, thumbs: Mapping[str, str]) -> str:
    d = root.summaries.get("dedup") or {}
    hist = {int(k): int(v) for k, v in (d.get("group_size_histogram") or {}).items()}
    if not hist:
        return "<p class='muted'>No dedup summary (no dedup stage, or no duplicates).</p>"
    fig = Plots.figure(5, 2.2)
    ax = fig.subplots()
    sizes = sorted(hist)
    ax.bar([str(s) for s in sizes], [hist[s] for s in sizes], color="#e9c46a")
    ax.set_xlabel("group size (rows per duplicate group)", fontsize=8)
    ax.set_ylabel("groups", fontsize=8)
    style(ax)
    per_source = d.get("per_source") or {}
    kinds = sorted({k for v in per_source.values() for k in v})
    ps = table(
        ["source"] + [esc(k) for k in kinds],
        [[esc(s)] + [str(v.get(k, "")) for k in kinds] for s, v in sorted(per_source.items())],
        "num",
    )
    ex = []
    for g in (d.get("examples") or [])[:DEDUP_EXAMPLE_GROUPS]:
        members = g.get("members") or []
        cards = []
        for m in members[:DEDUP_EXAMPLE_MEMBERS]:
            ident = str(m.get("id", ""))
            t = thumbs.get(ident)
            img = f'<img class="dedup-thumb" src="{t}" alt="">' if t else "<div class='noimg'>no image</div>"
            status = m.get("drop_reason") or ("flag: " + m["flag"] if m.get("flag") else "keeper")
            cls = "dropped" if m.get("drop_reason") else "keeper"
            cards.append(
                f"<div class='card {cls}'>{img}<div class='id'>{esc(ident)}</div>"
                f"<div class='cap'>{esc(_clip_text(m.get('text')))}</div>"
                f"<div class='muted small'>{esc(status)}</div></div>"
            )
        more = (
            f"<div class='muted'>+{len(members) - DEDUP_EXAMPLE_MEMBERS} more</div>"
            if len(members) > DEDUP_EXAMPLE_MEMBERS
            else ""
        )
        ex.append(
            f"<div class='group'><div class='gtitle'>{esc(g.get('group'))} · size {esc(g.get('size'))}"
            f"</div><div class='row'>{''.join(cards)}{more}</div></div>"
        )
    return (
        f"<p>{esc(d.get('groups'))} duplicate groups over {esc(d.get('signatures'))} signatures; "
        f"{esc(d.get('decisions'))} decisions.</p>"
        + figure(plots.svg(fig), "Duplicate group sizes (summaries.json dedup.group_size_histogram).")
        + ps
        + "<h3>Example groups</h3>"
        + "".join(ex)
    )


def specialists(roots: list[Root], plots: Plots) -> str:
    out = []
    for r in roots:
        if not r.scan.has_specialists:
            continue
        spec = r.scan.spec
        names = sorted(spec)
        rows = []
        for n in names:
            s = spec[n]
            d = max(s.n, 1)
            rows.append(
                [
                    esc(n),
                    f"{s.n:,}",
                    f"{100 * s.with_ocr / d:.1f}%",
                    f"{s.ocr_lines / d:.2f}",
                    f"{100 * s.with_box / d:.1f}%",
                    f"{s.boxes / d:.2f}",
                    f"{100 * s.with_spatial / d:.1f}%",
                    f"{s.spatial / d:.2f}",
                ]
            )
        fig = Plots.figure(7.5, 2.2)
        axes = fig.subplots(1, 3, sharey=True, gridspec_kw={"wspace": 0.35})
        metrics = [
            ("share with OCR text", [spec[n].with_ocr / max(spec[n].n, 1) for n in names]),
            ("boxes per image", [spec[n].boxes / max(spec[n].n, 1) for n in names]),
            ("spatial sentences per image", [spec[n].spatial / max(spec[n].n, 1) for n in names]),
        ]
        for ax, (title, vals) in zip(axes, metrics, strict=True):
            ax.barh(names, vals, color="#9b5de5")
            ax.set_title(title, fontsize=8)
            style(ax)
        out.append(
            f"<h3>{esc(r.label)} · {esc(r.path)}</h3>"
            + figure(plots.svg(fig), f"Specialist coverage in {r.label}.")
            + table(
                [
                    "source",
                    "samples",
                    "with OCR text",
                    "OCR lines / img",
                    "with ≥1 box",
                    "boxes / img",
                    "with spatial",
                    "spatial sentences / img",
                ],
                rows,
                "num",
            )
        )
    return "".join(out) or "<p class='muted'>No specialist outputs in these roots.</p>"


def gallery(roots: list[Root], n: int) -> str:
    last = roots[-1]
    per_source = [list(v) for _, v in sorted(last.scan.gallery.items())]
    picked: list[Item] = []
    while len(picked) < n and any(per_source):  # round-robin across sources
        for items in per_source:
            if items and len(picked) < n:
                picked.append(items.pop(0))
    if not picked:
        return "<p class='muted'>No published image samples.</p>"
    rounds = sorted({int(c.get("round") or 0) for it in picked for c in it.captions})
    head = "".join(f"<th>round {r}</th>" for r in rounds)
    body = []
    for it in picked:
        img = (
            f'<img class="gallery-thumb" src="{it.thumb}" alt="{esc(it.key)}">'
            if it.thumb
            else "<div class='noimg'>no image</div>"
        )
        by_round = {int(c.get("round") or 0): c for c in it.captions}
        cells = []
        for r in rounds:
            c = by_round.get(r)
            if c is None:
                cells.append("<td class='muted'>–</td>")
                continue
            flags = ", ".join(str(f) for f in c.get("flags") or [])
            cells.append(
                f"<td><div class='cap'>{esc(c.get('text'))}</div><div class='lineage muted small'>"
                f"{esc(c.get('model'))} · {esc(c.get('prompt_id'))}{' · ' + esc(flags) if flags else ''}"
                "</div></td>"
            )
        spatial = "".join(f"<li>{esc(s)}</li>" for s in it.spatial[:8])
        more = f"<li class='muted'>+{len(it.spatial) - 8} more</li>" if len(it.spatial) > 8 else ""
        spec = (
            f"<div class='ocr'><b>OCR:</b> {esc(it.ocr) or '<span class=muted>none</span>'}</div>"
            f"<div class='small'><b>boxes:</b> {it.boxes}</div>"
            f"<ul class='spatial'>{spatial}{more}</ul>"
        )
        scores = f"CLIP {fmt(it.clip_score, 3)} · ΔL {fmt(it.delta_loss, 3)}"
        body.append(
            f"<tr class='gallery-entry'><td>{img}<div class='id'>{esc(it.source)}/{esc(it.key)}</div>"
            f"<div class='muted small'>{scores}</div></td>"
            f"<td class='original'><div class='cap'>{esc(it.original)}</div></td>{''.join(cells)}"
            f"<td class='spec'>{spec}</td></tr>"
        )
    return (
        f"<p class='muted'>{len(picked)} samples from {esc(last.path)}, round-robin over sources; every "
        "caption round from its lineage.</p>"
        f"<table class='gallery'><thead><tr><th>image</th><th>original alt-text</th>{head}"
        f"<th>specialists</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
