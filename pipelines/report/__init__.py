"""One self-contained ``report.html`` for a curated dataset (round 0) and its recaption rounds.

Why a single file: reviewers open it from an object store, a CI artifact or an e-mail, often offline, so
everything is inline: CSS, a tiny JS check, plots as inline SVG (matplotlib's SVG backend, text kept as
text), thumbnails as base64 JPEG data URLs. Every string that came from the data (alt-text, VLM captions,
OCR lines, keys, reasons) is HTML-escaped: captions are untrusted text.

Memory stays bounded: tars are streamed member by member (only the JSON members are parsed; an image is
held only while it may become a thumbnail), CLIP scores are binned into a fixed fine histogram while they
stream from the clip stage's signature parquet, and per-source word counts are running sums.

Inputs per dataset root (all written by the engine): ``stats.json``, ``summaries.json``, ``timings.json``,
``manifest.parquet``, ``wids-meta.json`` + the tars, and, when still present, ``_work/seg*/`` (signature and
row parquet of the two-pass stages).

Usage: ``python -m vila2_curate.pipelines.report out/quickstart/r0 out/quickstart/r1 [--dest report.html]``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from vila2_curate.pipelines.io.writers.atomic import read_parquet, write_bytes_atomic
from vila2_curate.schemas.images import IMAGE_EXTENSIONS, VILA_IMAGE_FORMATS, decode_rgb

THUMB_SIDE = 160
IMAGE_EXTS = tuple(e for e, fmt in IMAGE_EXTENSIONS.items() if fmt in VILA_IMAGE_FORMATS)  # .jpeg too
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
# Assumed GPUs per worker for the throughput projection when the run records none (it records none today:
# resources live only in the config). Keys match a timings stage name or its prefix before "_".
DEFAULT_STAGE_GPUS: dict[str, float] = {
    "clipscore": 1.0,
    "deltaloss_score": 1.0,
    "recaption": 1.0,
    "grounding": 1.0,
}
DEDUP_EXAMPLE_GROUPS = 8
DEDUP_EXAMPLE_MEMBERS = 6
_CLIP_LO, _CLIP_HI, _CLIP_FINE = -1.0, 2.5, 3500  # fixed fine bins (width 0.001) cover cosine and CLIP-S
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# ---------------------------------------------------------------- small helpers


def esc(text: Any) -> str:
    """HTML-escape untrusted text; C0 controls (VLM noise) become visible control pictures."""
    s = "" if text is None else str(text)
    s = _CTRL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 32 else "\u2421", s)
    return html.escape(s, quote=True)


def _clip_text(text: Any, n: int = 240) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[:n] + "…"


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:,.{digits}f}"


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _stage_of(reason_key: str) -> tuple[str, str]:
    stage, _, reason = reason_key.partition(":")
    return (stage, reason) if reason else ("other", stage)


def _ordered_stages(stages: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(stages))
    known = [s for s in STAGE_ORDER if s in seen]
    return known + [s for s in seen if s not in STAGE_ORDER]


def _thumb_data_url(data: bytes) -> str | None:
    """~160 px JPEG data URL; None for bytes PIL cannot decode (the report must never fail on one image)."""
    try:
        img = decode_rgb(data, (THUMB_SIDE * 2, THUMB_SIDE * 2))
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - any decode problem just means "no thumbnail"
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class _Acc:
    """Running mean/std of word counts (sums only: constant memory per source and round)."""

    n: int = 0
    s: float = 0.0
    ss: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.s += x
        self.ss += x * x

    @property
    def mean(self) -> float | None:
        return self.s / self.n if self.n else None

    @property
    def std(self) -> float | None:
        if not self.n:
            return None
        m = self.s / self.n
        return math.sqrt(max(self.ss / self.n - m * m, 0.0))


@dataclass
class _Hist:
    """Fixed fine histogram: exact enough for plotting, O(1) memory whatever the dataset size."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(_CLIP_FINE, dtype=np.int64))
    n: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        v = values[np.isfinite(values)]
        if not v.size:
            return
        self.n += int(v.size)
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        idx = np.clip(
            ((v - _CLIP_LO) / (_CLIP_HI - _CLIP_LO) * _CLIP_FINE).astype(np.int64), 0, _CLIP_FINE - 1
        )
        np.add.at(self.counts, idx, 1)

    def rebinned(self, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.lo, self.hi if self.hi > self.lo else self.lo + 1e-3
        edges = np.linspace(lo, hi, bins + 1)
        centers = _CLIP_LO + (np.arange(_CLIP_FINE) + 0.5) * (_CLIP_HI - _CLIP_LO) / _CLIP_FINE
        which = np.clip(np.searchsorted(edges, centers, side="right") - 1, 0, bins - 1)
        out = np.zeros(bins, dtype=np.int64)
        np.add.at(out, which, self.counts)
        return out, edges


@dataclass
class _Spec:
    n: int = 0
    with_ocr: int = 0
    ocr_lines: int = 0
    boxes: int = 0
    with_box: int = 0
    spatial: int = 0
    with_spatial: int = 0


@dataclass
class _Item:
    source: str
    key: str
    thumb: str | None
    original: str
    captions: list[dict[str, Any]]
    ocr: str
    spatial: list[str]
    boxes: int
    clip_score: float | None
    delta_loss: float | None


@dataclass
class _Scan:
    """What one streaming pass over a dataset root's tars yields."""

    samples: int = 0
    max_round: int = 0
    words: dict[tuple[str, int], _Acc] = field(default_factory=dict)
    flags: dict[tuple[str, int], Counter] = field(default_factory=dict)
    clip: dict[str, _Hist] = field(default_factory=dict)
    spec: dict[str, _Spec] = field(default_factory=dict)
    has_specialists: bool = False
    gallery: dict[str, list[_Item]] = field(default_factory=dict)
    thumbs: dict[str, str] = field(default_factory=dict)


@dataclass
class _Root:
    path: str
    fs: fsspec.AbstractFileSystem
    base: str
    stats: dict[str, Any]
    summaries: dict[str, Any]
    timings: dict[str, Any]
    stage_versions: dict[str, str]
    meta: dict[str, Any]
    scan: _Scan = field(default_factory=_Scan)

    @property
    def label(self) -> str:
        return f"round {self.scan.max_round}" if self.scan.max_round else "round 0 (curated)"


# ---------------------------------------------------------------- reading


def _open_root(path: str) -> _Root:
    fs, base = fsspec.core.url_to_fs(path)
    base = base.rstrip("/")
    versions: dict[str, str] = {}
    try:
        col = read_parquet(fs, _join(base, "manifest.parquet"), ["stage_versions"]).column("stage_versions").to_pylist()
        for v in col[:1]:
            versions = json.loads(v or "{}")
    except (FileNotFoundError, OSError, ValueError, KeyError):
        versions = {}
    return _Root(
        path=path,
        fs=fs,
        base=base,
        stats=_read_json(fs, _join(base, "stats.json")) or {},
        summaries=_read_json(fs, _join(base, "summaries.json")) or {},
        timings=_read_json(fs, _join(base, "timings.json")) or {},
        stage_versions=versions,
        meta=_read_json(fs, _join(base, "wids-meta.json")) or {},
    )


def _tar_members(
    fs: fsspec.AbstractFileSystem, path: str
) -> Iterator[tuple[str, str, tarfile.TarFile, tarfile.TarInfo]]:
    """(key, ext, tar, member) in stream order; the caller reads a member only if it wants it."""
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile() or "." not in posixpath.basename(m.name):
                continue
            key, ext = posixpath.splitext(m.name)
            yield key, ext[1:].lower(), tf, m


def _scan_root(root: _Root, *, gallery: int, want_thumbs: set[str]) -> _Scan:
    """Stream every tar of ``root`` once: word counts, specialists, CLIP scores, gallery items, thumbnails."""
    scan = _Scan()
    for entry in root.meta.get("shardlist", []):
        url = entry["url"]
        tar_source = url.split("/", 1)[0]
        pending: dict[str, bytes] = {}  # at most one sample's image: the image precedes its json
        for key, ext, tf, m in _tar_members(root.fs, posixpath.normpath(_join(root.base, url))):
            if ext in IMAGE_EXTS:
                pending.clear()
                need = (
                    len(scan.gallery.get(tar_source, [])) < gallery or f"{tar_source}/{key}/-1" in want_thumbs
                )
                if need and (fh := tf.extractfile(m)) is not None:
                    pending[key] = fh.read()
                continue
            if ext != "json" or (fh := tf.extractfile(m)) is None:
                continue
            try:
                rec = json.loads(fh.read())
            except json.JSONDecodeError:
                continue
            _account(scan, rec, tar_source, key, pending.pop(key, None), gallery, want_thumbs)
    return scan


def _account(
    scan: _Scan,
    rec: dict[str, Any],
    tar_source: str,
    key: str,
    image: bytes | None,
    gallery: int,
    want_thumbs: set[str],
) -> None:
    source = str(rec.get("source") or tar_source)
    scan.samples += 1
    scan.words.setdefault((source, 0), _Acc()).add(len(str(rec.get("text") or "").split()))
    caps = rec.get("captions") or []
    for c in caps:
        r = int(c.get("round") or 0)
        scan.max_round = max(scan.max_round, r)
        scan.words.setdefault((source, r), _Acc()).add(len(str(c.get("text") or "").split()))
        scan.flags.setdefault((source, r), Counter()).update(c.get("flags") or [])
    if isinstance(rec.get("clip_score"), int | float):
        scan.clip.setdefault(source, _Hist()).add(np.asarray([rec["clip_score"]], dtype=np.float64))
    spec = rec.get("specialists") or {}
    if spec:
        scan.has_specialists = True
        sp = scan.spec.setdefault(source, _Spec())
        sp.n += 1
        ocr = [o for o in spec.get("ocr") or [] if str(o.get("text", "")).strip()]
        sp.with_ocr += bool(ocr or str(spec.get("ocr_text") or "").strip())
        sp.ocr_lines += len(ocr)
        boxes = len(spec.get("grounding") or [])
        sp.boxes += boxes
        sp.with_box += boxes > 0
        sent = len(spec.get("spatial") or [])
        sp.spatial += sent
        sp.with_spatial += sent > 0
    thumb = None
    ident = f"{source}/{key}/-1"
    items = scan.gallery.setdefault(source, [])
    if image is not None and (len(items) < gallery or ident in want_thumbs):
        thumb = _thumb_data_url(image)
        if ident in want_thumbs and thumb:
            scan.thumbs[ident] = thumb
    if len(items) < gallery:
        items.append(
            _Item(
                source=source,
                key=key,
                thumb=thumb,
                original=str(rec.get("text") or ""),
                captions=sorted(caps, key=lambda c: int(c.get("round") or 0)),
                ocr=str(spec.get("ocr_text") or ""),
                spatial=[str(s) for s in spec.get("spatial") or []],
                boxes=len(spec.get("grounding") or []),
                clip_score=rec.get("clip_score"),
                delta_loss=rec.get("delta_loss"),
            )
        )


def _work_segment(root: _Root, stage: str) -> str | None:
    """The ``_work/seg*`` folder whose summary names ``stage`` (two-pass stages keep their parquet there)."""
    work = _join(root.base, "_work")
    try:
        segs = sorted(p for p in root.fs.ls(work, detail=False) if posixpath.basename(p).startswith("seg"))
    except (FileNotFoundError, OSError):
        return None
    for seg in segs:
        summary = _read_json(root.fs, _join(seg, "summary.json")) or {}
        if summary.get("stage") == stage:
            return seg
    return None


def _parquet_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    try:
        return sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    except (FileNotFoundError, OSError):
        return []


def _clip_hists_from_work(root: _Root) -> dict[str, _Hist]:
    """CLIP scores of every row the clip filter saw (kept and dropped), streamed per record batch."""
    import pyarrow.parquet as pq

    seg = _work_segment(root, "clip_filter")
    hists: dict[str, _Hist] = {}
    if seg is None:
        return hists
    for path in _parquet_files(root.fs, _join(seg, "signatures")):
        with root.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if "clip_score" not in names:
                continue
            cols = [
                c for c in ("group", "source", "rule", "clip_score", "clip_similarity_vitb32") if c in names
            ]
            for batch in pf.iter_batches(batch_size=8192, columns=cols):
                d = batch.to_pydict()
                groups = d.get("group") or d.get("source") or ["all"] * batch.num_rows
                rules = d.get("rule") or ["clip_score"] * batch.num_rows
                for g in set(groups):
                    vals = [
                        d[r][i] if r in d else d["clip_score"][i]
                        for i, (gg, r) in enumerate(zip(groups, rules, strict=True))
                        if gg == g
                    ]
                    arr = np.asarray([np.nan if v is None else v for v in vals], dtype=np.float64)
                    hists.setdefault(str(g), _Hist()).add(arr)
    return hists


def _dedup_thumbs_from_work(root: _Root, wanted: set[str]) -> dict[str, str]:
    """Thumbnails of dedup example members that were dropped (not in the tars), from the dedup rows parquet.

    Reads the key column of each row group first and the image column only of row groups holding a wanted
    key, so a large dataset costs a key scan, not an image scan.
    """
    import pyarrow.parquet as pq

    out: dict[str, str] = {}
    seg = _work_segment(root, "dedup")
    if seg is None or not wanted:
        return out
    by_source: dict[str, dict[str, set[int]]] = {}
    for ident in wanted:
        src, key, idx = _split_ident(ident)
        by_source.setdefault(src, {}).setdefault(key, set()).add(idx)
    for src, keys in by_source.items():
        for path in _parquet_files(root.fs, _join(seg, f"rows/{src}")):
            with root.fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                img_col = "image" if "image" in names else "image_info" if "image_info" in names else None
                if img_col is None or "key" not in names:
                    continue
                for rg in range(pf.num_row_groups):
                    ks = pf.read_row_group(rg, columns=["key"]).column("key").to_pylist()
                    if not keys.keys() & set(ks):
                        continue
                    t = pf.read_row_group(rg, columns=["key", img_col]).to_pydict()
                    for k, img in zip(t["key"], t[img_col], strict=True):
                        for idx in keys.get(k, ()):
                            # a document's id has image_index -1: show its first image
                            data = img if img_col == "image" else _doc_image(img, max(idx, 0))
                            if isinstance(data, bytes) and (thumb := _thumb_data_url(data)):
                                out[f"{src}/{k}/{idx}"] = thumb
    return out


def _doc_image(info: Any, idx: int) -> bytes | None:
    if isinstance(info, list) and 0 <= idx < len(info) and isinstance(info[idx], dict):
        return info[idx].get("image")
    return None


def _split_ident(ident: str) -> tuple[str, str, int]:
    """``source/key/image_index`` as the dedup summary names its members."""
    src, _, rest = ident.partition("/")
    key, _, idx = rest.rpartition("/")
    try:
        return src, key, int(idx)
    except ValueError:
        return src, rest, -1


# ---------------------------------------------------------------- plots


_NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}  # no RDF block, no URLs


class _Plots:
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


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.25)


# ---------------------------------------------------------------- sections


def _figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption>{esc(caption)}</figcaption></figure>'


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _funnel(root: _Root, plots: _Plots) -> str:
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
    html_rows = _table(head, rows, "num")

    fig = _Plots.figure(7.5, 0.5 + 0.32 * (len(stages) + 2) * len(steps))
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
        _style(ax)
    axes[-1].set_xlabel("rows", fontsize=8)
    svg = _figure(
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
    reason_tbl = _table(["stage", "reason"] + [esc(n) for n in names], rrows, "num")
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
            + _table(["source", "images in", "images kept", "image drop reasons"], img_rows)
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
    shard_tbl = _table(
        ["source", "input shard", "rows in", "kept", "dropped", "quarantined", "balanced"], srows, "num"
    )
    return (
        f"{svg}{html_rows}<p class='muted'>⁺ quarantined rows are counted in their stage's reasons too "
        f"(rows in = kept + dropped + quarantined; balanced: {esc(root.stats.get('balanced'))}).</p>"
        f"<h3>Drop reasons</h3>{reason_tbl}{img_tbl}"
        f"<details><summary>Per input shard ({len(shards)})</summary>{shard_tbl}</details>"
    )


def _clip(root: _Root, plots: _Plots) -> str:
    hists = _clip_hists_from_work(root)
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
        fig = _Plots.figure(4.2, 2.4)
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
        _style(ax)
        kept = (
            f"kept {g.get('kept')} / {g.get('rows')}, dropped {g.get('dropped')}"
            if g
            else "no filter summary"
        )
        out.append(_figure(plots.svg(fig), f"{name}: {kept}; cut {_fmt(cut, 4) if cut is not None else '–'}"))
    return (
        f"<p class='muted'>Scores: {esc(origin)}. Dashed line: the clip_filter cut from summaries.json.</p>"
        f"<div class='grid'>{''.join(out)}</div>"
    )


def _words(roots: list[_Root], plots: _Plots) -> str:
    cells: dict[tuple[str, int], tuple[_Acc, Counter]] = {}
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
            acc, flags = cells.get((s, r), (_Acc(), Counter()))
            bad = sum(flags.get(f, 0) for f in ("truncated", "refusal", "empty"))
            note = f" <span class='muted'>({bad} flagged)</span>" if bad else ""
            row.append(
                f"{_fmt(acc.mean, 1)} ± {_fmt(acc.std, 1)} <span class='muted'>n={acc.n}</span>{note}"
                if acc.n
                else "–"
            )
        rows.append(row)
    fig = _Plots.figure(7, 2.6)
    ax = fig.subplots()
    width = 0.8 / len(rounds)
    for j, r in enumerate(rounds):
        means = [(cells.get((s, r), (_Acc(),))[0].mean or 0.0) for s in sources]
        stds = [(cells.get((s, r), (_Acc(),))[0].std or 0.0) for s in sources]
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
    _style(ax)
    return _table(head, rows, "num") + _figure(
        plots.svg(fig),
        "Mean ± std words per caption, per source and round "
        "(original = round-0 alt-text; flagged = truncated/refusal/empty captions).",
    ) + _saturation(roots)


def _saturation(roots: list[_Root]) -> str:
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
               f"{_fmt(v.get('words_mean'), 1)} ± {_fmt(v.get('words_std'), 1)}"]
        if k == "0":
            row += ["–", "–", "–"]
        else:
            share = v.get("changed_share")
            row += [("–" if share is None else f"{100 * share:.1f}%")
                    + f" <span class='muted'>of {v.get('compared_with_previous', 0):,}</span>",
                    _fmt(v.get("jaccard_mean"), 3), _fmt(v.get("difflib_ratio_mean"), 3)]
        if has_clip:
            row += ([f"{_fmt(v.get('clip_cosine_mean'), 3)} ± {_fmt(v.get('clip_cosine_std'), 3)}",
                     _fmt(v.get("clip_score_mean"), 3)] if "clip_n" in v else ["–", "–"])
        rows.append(row)
    note = ("CLIP: each round's caption scored against its image by the clipscore stage of the latest run."
            if has_clip else "No clipscore stage ran after the recaption: CLIP agreement per round omitted.")
    return ("<h3>Round saturation</h3>" + _table(head, rows, "num")
            + f"<p class='muted'>summaries.json rounds, over the published pairs. A round that changes few "
              f"captions and leaves similarity near 1 adds little (VILA² stopped gaining at round 4). {note}</p>")


def _dedup(root: _Root, plots: _Plots, thumbs: Mapping[str, str]) -> str:
    d = root.summaries.get("dedup") or {}
    hist = {int(k): int(v) for k, v in (d.get("group_size_histogram") or {}).items()}
    if not hist:
        return "<p class='muted'>No dedup summary (no dedup stage, or no duplicates).</p>"
    fig = _Plots.figure(5, 2.2)
    ax = fig.subplots()
    sizes = sorted(hist)
    ax.bar([str(s) for s in sizes], [hist[s] for s in sizes], color="#e9c46a")
    ax.set_xlabel("group size (rows per duplicate group)", fontsize=8)
    ax.set_ylabel("groups", fontsize=8)
    _style(ax)
    per_source = d.get("per_source") or {}
    kinds = sorted({k for v in per_source.values() for k in v})
    ps = _table(
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
        + _figure(plots.svg(fig), "Duplicate group sizes (summaries.json dedup.group_size_histogram).")
        + ps
        + "<h3>Example groups</h3>"
        + "".join(ex)
    )


def _specialists(roots: list[_Root], plots: _Plots) -> str:
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
        fig = _Plots.figure(7.5, 2.2)
        axes = fig.subplots(1, 3, sharey=True, gridspec_kw={"wspace": 0.35})
        metrics = [
            ("share with OCR text", [spec[n].with_ocr / max(spec[n].n, 1) for n in names]),
            ("boxes per image", [spec[n].boxes / max(spec[n].n, 1) for n in names]),
            ("spatial sentences per image", [spec[n].spatial / max(spec[n].n, 1) for n in names]),
        ]
        for ax, (title, vals) in zip(axes, metrics, strict=True):
            ax.barh(names, vals, color="#9b5de5")
            ax.set_title(title, fontsize=8)
            _style(ax)
        out.append(
            f"<h3>{esc(r.label)} · {esc(r.path)}</h3>"
            + _figure(plots.svg(fig), f"Specialist coverage in {r.label}.")
            + _table(
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


def _throughput(roots: list[_Root], plots: _Plots, gpus: Mapping[str, float]) -> str:
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
                    _fmt(sec, 2),
                    _fmt(1000 * sec / rows_n if rows_n else None, 2),
                    _fmt(gsec, 2),
                    _fmt(g, 2),
                    _fmt(gh, 2) + f" <span class='muted'>{how}</span>",
                    _fmt(sec / rows_n * 1e6 / 3600 if rows_n else None, 2),
                ]
            )
        fig = _Plots.figure(6, 0.6 + 0.28 * len(names))
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
        _style(ax)
        out.append(
            f"<h3>{esc(r.label)} · {esc(r.path)}</h3>"
            + _figure(plots.svg(fig), f"Seconds per 1k rows per stage in {r.label}.")
            + _table(
                [
                    "stage",
                    "rows",
                    "seconds",
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


def _gallery(roots: list[_Root], n: int) -> str:
    last = roots[-1]
    per_source = [list(v) for _, v in sorted(last.scan.gallery.items())]
    picked: list[_Item] = []
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
        scores = f"CLIP {_fmt(it.clip_score, 3)} · ΔL {_fmt(it.delta_loss, 3)}"
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


# ---------------------------------------------------------------- page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2733;
background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}
header .muted{color:#c8d3e0}main{padding:8px 28px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px}th,td{border-bottom:1px solid #eceff3;
padding:4px 8px;text-align:left;vertical-align:top}th{background:#f1f4f8;font-weight:600}
table.num td{font-variant-numeric:tabular-nums}.muted{color:#6b7785}.small{font-size:11.5px}
.bad{color:#d62828}
figure.plot{margin:8px 0;display:inline-block}figure.plot svg{max-width:100%;height:auto}
figcaption{font-size:12px;color:#6b7785}.grid{display:flex;flex-wrap:wrap;gap:8px}
.group{margin:10px 0}.gtitle{font-size:12px;font-weight:600;margin-bottom:4px}.row{display:flex;gap:8px;
flex-wrap:wrap}.card{width:170px;border:1px solid #e3e6ea;border-radius:6px;padding:5px;font-size:12px}
.card .small{word-break:break-all}.card.keeper{border-color:#2a9d8f}
.card.dropped{opacity:.85;border-style:dashed}
.id{font-family:ui-monospace,monospace;font-size:11px;color:#44505c;word-break:break-all}
.noimg{width:160px;height:90px;background:#eceff3;color:#6b7785;display:flex;align-items:center;
justify-content:center;font-size:11px}
img.gallery-thumb,img.dedup-thumb{max-width:160px;max-height:160px;display:block;border-radius:4px}
table.gallery td{max-width:320px}.cap{white-space:pre-wrap;word-break:break-word}
ul.spatial{margin:4px 0 0 16px;padding:0;font-size:12px}
.formula{background:#f1f4f8;padding:8px;border-radius:6px}
nav a{color:#fff;margin-right:14px;font-size:13px}code{font-size:12px}
"""

# Proof of rendering for headless checks: count drawn plots and decoded gallery images into the DOM.
_JS = """
window.addEventListener('load', function () {
  var svgs = Array.prototype.slice.call(document.querySelectorAll('figure.plot svg'));
  var plots = svgs.filter(function (s) {
    var r = s.getBoundingClientRect();
    return s.childElementCount > 0 && r.width > 0 && r.height > 0;
  }).length;
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img.gallery-thumb'));
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var dedup = Array.prototype.slice.call(document.querySelectorAll('img.dedup-thumb')).filter(
    function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-plots', String(plots));
  document.body.setAttribute('data-images', String(loaded));
  document.body.setAttribute('data-dedup-images', String(dedup));
  document.body.setAttribute('data-rendered', 'true');
});
"""

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
    roots = [_open_root(p) for p in out_dirs]
    first = roots[0]
    examples = ((first.summaries.get("dedup") or {}).get("examples") or [])[:DEDUP_EXAMPLE_GROUPS]
    wanted = {str(m.get("id")) for g in examples for m in (g.get("members") or [])[:DEDUP_EXAMPLE_MEMBERS]}
    for i, r in enumerate(roots):
        r.scan = _scan_root(
            r, gallery=gallery if i == len(roots) - 1 else 0, want_thumbs=wanted if i == 0 else set()
        )
    thumbs = dict(first.scan.thumbs)
    thumbs.update(_dedup_thumbs_from_work(first, wanted - thumbs.keys()))
    plots = _Plots()
    gpu_map = dict(DEFAULT_STAGE_GPUS if gpus is None else gpus)
    body = {
        "funnel": _funnel(first, plots),
        "clip": _clip(first, plots),
        "words": _words(roots, plots),
        "dedup": _dedup(first, plots, thumbs),
        "specialists": _specialists(roots, plots),
        "throughput": _throughput(roots, plots, gpu_map),
        "gallery": _gallery(roots, gallery),
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
        f"<title>vila2-curate report · {esc(name)}</title><style>{_CSS}</style></head>"
        f"<body data-plots='0' data-images='0' data-expected-plots='{plots.count}'>"
        f"<header><h1>vila2-curate report · {esc(name)}</h1><div class='muted'>{esc(roots_txt)}</div>"
        f"<div class='muted'>round 0: {total.get('rows_in', 0):,} rows in → {total.get('kept', 0):,} kept, "
        f"{total.get('dropped', 0):,} dropped, {total.get('quarantined', 0):,} quarantined</div>"
        f"{_health_warnings(first)}<nav>{nav}</nav></header><main>{secs}</main><script>{_JS}</script></body></html>"
    )


def _health_warnings(root: _Root) -> str:
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
    dest = dest or _join(str(out_dirs[0]), "report.html")
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


if __name__ == "__main__":
    main()
