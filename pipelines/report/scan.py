"""Reading one output folder (dataset root) for the report: JSON files, the manifest, the tars, ``_work/``.

Memory stays bounded: tars are streamed member by member (only the JSON members are parsed; an image is
held only while it may become a thumbnail), CLIP scores are binned into a fixed fine histogram while they
stream from the clip stage's signature parquet, and per-source word counts are running sums.
"""

from __future__ import annotations

import base64
import io
import json
import math
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from vila2_curate.pipelines.io.parquet_read import open_parquet, read_parquet
from vila2_curate.schemas.images import IMAGE_EXTENSIONS, VILA_IMAGE_FORMATS, decode_rgb

THUMB_SIDE = 160
IMAGE_EXTS = tuple(e for e, fmt in IMAGE_EXTENSIONS.items() if fmt in VILA_IMAGE_FORMATS)  # .jpeg too
_CLIP_LO, _CLIP_HI, _CLIP_FINE = -1.0, 2.5, 3500  # fixed fine bins (width 0.001) cover cosine and CLIP-S


def join(root: str, rel: str) -> str:
    """``root/rel`` with one slash: fsspec paths and URLs, where os.path does not apply."""
    return f"{root.rstrip('/')}/{rel.lstrip('/')}"


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    try:
        with fs.open(path, "rb") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
class Acc:
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
class Hist:
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
class Spec:
    """Specialist counts of one source (OCR, grounding boxes, spatial sentences), for coverage shares."""

    n: int = 0
    with_ocr: int = 0
    ocr_lines: int = 0
    boxes: int = 0
    with_box: int = 0
    spatial: int = 0
    with_spatial: int = 0


@dataclass
class Item:
    """One gallery sample: its thumbnail, original alt-text, every caption round and specialist output."""

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
class Scan:
    """What one streaming pass over a dataset root's tars yields."""

    samples: int = 0
    max_round: int = 0
    words: dict[tuple[str, int], Acc] = field(default_factory=dict)
    flags: dict[tuple[str, int], Counter] = field(default_factory=dict)
    clip: dict[str, Hist] = field(default_factory=dict)
    spec: dict[str, Spec] = field(default_factory=dict)
    has_specialists: bool = False
    gallery: dict[str, list[Item]] = field(default_factory=dict)
    thumbs: dict[str, str] = field(default_factory=dict)


@dataclass
class Root:
    """One output folder: its JSON files and manifest versions, read at once; ``scan`` filled later."""

    path: str
    fs: fsspec.AbstractFileSystem
    base: str
    stats: dict[str, Any]
    summaries: dict[str, Any]
    timings: dict[str, Any]
    stage_versions: dict[str, str]
    meta: dict[str, Any]
    scan: Scan = field(default_factory=Scan)

    @property
    def label(self) -> str:
        return f"round {self.scan.max_round}" if self.scan.max_round else "round 0 (curated)"


# ---------------------------------------------------------------- reading


def open_root(path: str) -> Root:
    """The small files of the output folder at ``path`` (local or fsspec URL); missing ones read as {}."""
    fs, base = fsspec.core.url_to_fs(path)
    base = base.rstrip("/")
    versions: dict[str, str] = {}
    try:
        col = read_parquet(fs, join(base, "manifest.parquet"), ["stage_versions"]).column("stage_versions").to_pylist()
        for v in col[:1]:
            versions = json.loads(v or "{}")
    except (FileNotFoundError, OSError, ValueError, KeyError):
        versions = {}
    return Root(
        path=path,
        fs=fs,
        base=base,
        stats=_read_json(fs, join(base, "stats.json")) or {},
        summaries=_read_json(fs, join(base, "summaries.json")) or {},
        timings=_read_json(fs, join(base, "timings.json")) or {},
        stage_versions=versions,
        meta=_read_json(fs, join(base, "wids-meta.json")) or {},
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


def scan_root(root: Root, *, gallery: int, want_thumbs: set[str]) -> Scan:
    """Stream every tar of ``root`` once: word counts, specialists, CLIP scores, gallery items, thumbnails."""
    scan = Scan()
    for entry in root.meta.get("shardlist", []):
        url = entry["url"]
        tar_source = url.split("/", 1)[0]
        pending: dict[str, bytes] = {}  # at most one sample's image: the image precedes its json
        for key, ext, tf, m in _tar_members(root.fs, posixpath.normpath(join(root.base, url))):
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
    scan: Scan,
    rec: dict[str, Any],
    tar_source: str,
    key: str,
    image: bytes | None,
    gallery: int,
    want_thumbs: set[str],
) -> None:
    source = str(rec.get("source") or tar_source)
    scan.samples += 1
    scan.words.setdefault((source, 0), Acc()).add(len(str(rec.get("text") or "").split()))
    caps = rec.get("captions") or []
    for c in caps:
        r = int(c.get("round") or 0)
        scan.max_round = max(scan.max_round, r)
        scan.words.setdefault((source, r), Acc()).add(len(str(c.get("text") or "").split()))
        scan.flags.setdefault((source, r), Counter()).update(c.get("flags") or [])
    if isinstance(rec.get("clip_score"), int | float):
        scan.clip.setdefault(source, Hist()).add(np.asarray([rec["clip_score"]], dtype=np.float64))
    spec = rec.get("specialists") or {}
    if spec:
        scan.has_specialists = True
        sp = scan.spec.setdefault(source, Spec())
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
            Item(
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


def _work_segment(root: Root, stage: str) -> str | None:
    """The ``_work/seg*`` folder whose summary names ``stage`` (two-pass stages keep their parquet there)."""
    work = join(root.base, "_work")
    try:
        segs = sorted(p for p in root.fs.ls(work, detail=False) if posixpath.basename(p).startswith("seg"))
    except (FileNotFoundError, OSError):
        return None
    for seg in segs:
        summary = _read_json(root.fs, join(seg, "summary.json")) or {}
        if summary.get("stage") == stage:
            return seg
    return None


def _parquet_files(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    try:
        return sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
    except (FileNotFoundError, OSError):
        return []


def clip_hists_from_work(root: Root) -> dict[str, Hist]:
    """CLIP scores of every row the clip filter saw (kept and dropped), streamed per record batch."""

    seg = _work_segment(root, "clip_filter")
    hists: dict[str, Hist] = {}
    if seg is None:
        return hists
    for path in _parquet_files(root.fs, join(seg, "signatures")):
        with open_parquet(root.fs, path) as pf:
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
                    hists.setdefault(str(g), Hist()).add(arr)
    return hists


def dedup_thumbs_from_work(root: Root, wanted: set[str]) -> dict[str, str]:
    """Thumbnails of dedup example members that were dropped (not in the tars), from the dedup rows parquet.

    Reads the key column of each row group first and the image column only of row groups holding a wanted
    key, so a large dataset costs a key scan, not an image scan.
    """

    out: dict[str, str] = {}
    seg = _work_segment(root, "dedup")
    if seg is None or not wanted:
        return out
    by_source: dict[str, dict[str, set[int]]] = {}
    for ident in wanted:
        src, key, idx = _split_ident(ident)
        by_source.setdefault(src, {}).setdefault(key, set()).add(idx)
    for src, keys in by_source.items():
        for path in _parquet_files(root.fs, join(seg, f"rows/{src}")):
            with open_parquet(root.fs, path) as pf:
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
