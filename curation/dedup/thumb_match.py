"""How two thumbnails (``thumbnails.thumbnail``) are compared: the confirmation of a candidate pair.

:func:`confirm_pairs` accepts a pair only when every signal agrees (thresholds in DedupConfig, and the
module constants below): mean grey difference, the largest local grey and colour differences (each cell
compared with the other's 3x3 neighbourhood, so a crop or a resize that shifts the grid by under a cell
does not count), the difference of mean colours, the content-box shift, the detail grid, and:

* crop geometry: the least crop per side that maps one picture's content box onto the other's (a crop
  of up to 6% per side on each copy needs <= ~0.07; the same shape moved or resized on its page needs
  more, however alike the content grids are);
* the background colour, within delta E 5 when the content is small (the background is then most of the
  picture, and JPEG q35 moves a flat colour by up to ~2.2 per copy) and within the mean-colour threshold
  otherwise;
* for a line (of text), grids compared along the line only (the line's few pixels of height move with a
  pixel of box error).

The cheap signals go first; the shift-tolerant grid comparisons run only on the candidates that pass.
Measured on the generated evaluation set (pipelines/demo/dedup_eval.py, benchmarks/bench_dedup_recall.py):
JPEG q35-65, WebP<->JPEG, resize x0.5-0.8 and 2-6% crops per side stay inside the thresholds; recoloured,
re-backgrounded, tinted, moved, enlarged and re-worded look-alikes fall outside.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vila2_curate.curation.dedup.thumbnails import (
    BG_AT,
    BOX_AT,
    DETAIL_AT,
    DETAIL_SIDE,
    GREY_N,
    GREY_SIDE,
    L_SCALE,
    RGB_SIDE,
    THUMB_BYTES,
)
from vila2_curate.schemas.config import DedupConfig

# confirmation constants beyond DedupConfig's thresholds (measured on pipelines/demo/dedup_eval.py)
_CROP_MAX = 0.075  # relative crop per side of two copies each cropped by up to 6% per side (0.06 / 0.88 = 0.068)
_EDGE_ERR = 3.0 / 255  # a content-box edge found a pixel or two apart at the 256-pixel work size, plus rounding
_AT_EDGE = 1.5 / 255  # a box edge this close to the picture's border may have been cut by a crop
_SMALL_CONTENT = 0.5  # content boxes under this share of the picture leave a background measured on most of it
_SMALL_CONTENT_DELTA_E = 5.0  # their backgrounds' delta E: JPEG q35 moves a flat colour by up to ~2.2 per copy
_LINE = 0.35  # a content box whose short side is under this share of its long side is a line (of text)


def _lab(x: np.ndarray) -> np.ndarray:
    """Stored Lab bytes (..., 3) -> float L*, a*, b*."""
    out = x.astype(np.float32)
    out[..., 0] /= L_SCALE
    out[..., 1:] -= 128.0
    return out


def _local_max(a: np.ndarray, b: np.ndarray, interpolate: bool = False) -> np.ndarray:
    """Per pair, the largest over inner cells of the distance from a cell to the other grid's 3x3
    neighbourhood (both directions): local changes count, shifts under a cell do not, and the outer
    ring, where a crop cuts, is left out.

    ``interpolate``: the distance to the segments from the other grid's cell to each neighbour (a cell
    moved by half a cell looks like the mix of two cells), not to the cells alone; for colour grids,
    whose neighbouring cells of a photo differ a lot. ``a``, ``b``: (m, side, side, channels) float32.
    Hand-written (9 shifted array views) because no library offers a shift-tolerant cell distance over
    many small grids at once.
    """
    side = a.shape[1]

    def one_way(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        padded = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        best = np.full(x.shape[:3], np.inf, dtype=np.float32)
        for dy in range(3):
            for dx in range(3):
                n = padded[:, dy:dy + side, dx:dx + side]
                if interpolate:  # closest point of the segment y -> n
                    seg = n - y
                    t = np.clip(((x - y) * seg).sum(axis=3) / np.maximum((seg * seg).sum(axis=3), 1e-6), 0.0, 1.0)
                    n = y + t[..., None] * seg
                d = np.sqrt(((x - n) ** 2).sum(axis=3))
                np.minimum(best, d, out=best)
        return best[:, 1:-1, 1:-1].reshape(len(x), -1).max(axis=1)

    return np.maximum(one_way(a, b), one_way(b, a))


def _detail_distance(da: np.ndarray, db: np.ndarray, reach: int = 1) -> np.ndarray:
    """Per pair, the 98th percentile over inner cells of |a - b| / 255, at the best global shift of b
    by up to ``reach`` half cells per axis (linear interpolation): a content box found a pixel or two
    apart moves the grid by part of a cell, which a sharp edge would otherwise count; one global shift
    cannot turn other words into the same ones. Hand-written: shifted array views, no library needed."""
    if not len(da):
        return np.zeros(0, dtype=np.float32)
    margin = reach // 2 + 2
    pad = np.pad(db, ((0, 0), (margin, margin), (margin, margin)), mode="edge")

    def at(offset: int) -> slice:  # the inner cells (1 .. side-2) of b, moved by ``offset`` whole cells
        return slice(margin + 1 + offset, margin + DETAIL_SIDE - 1 + offset)

    def moved(arr: np.ndarray, half_cells: int, axis: int) -> np.ndarray:
        lo, hi = math.floor(half_cells / 2), math.ceil(half_cells / 2)
        take = (lambda o: arr[:, at(o)]) if axis == 1 else (lambda o: arr[:, :, at(o)])
        return take(lo) if lo == hi else (take(lo) + take(hi)) / 2

    best = np.full(len(da), np.inf, dtype=np.float32)
    target = da[:, 1:-1, 1:-1]
    for sy in range(-reach, reach + 1):
        rows = moved(pad, sy, 1)
        for sx in range(-reach, reach + 1):
            diff = np.abs(target - moved(rows, sx, 2)).reshape(len(da), -1)
            np.minimum(best, np.quantile(diff, 0.98, axis=1).astype(np.float32), out=best)
    return best / 255.0


def _at(values: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, n) rows sampled linearly at ``pos`` ((m, ..., k), fractions of the row's length, cell centres at
    (i + 0.5) / n), and whether each position falls inside the row."""
    n = values.shape[1]
    x = pos * n - 0.5
    inside = (x >= -0.5) & (x <= n - 0.5)
    x = np.clip(x, 0, n - 1)
    left = np.minimum(np.floor(x).astype(np.int64), n - 2)
    frac = x - left
    rows = np.arange(len(values)).reshape((-1,) + (1,) * (pos.ndim - 1))
    return values[rows, left] * (1 - frac) + values[rows, left + 1] * frac, inside


def _fit_axis(pa: np.ndarray, pb: np.ndarray, start: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, where a whole picture b's profile ``pb`` lies along a content grid's profile ``pa`` (the grid
    spans [start, start + extent] of its own picture, which b shows cropped by up to ``_CROP_MAX`` per side):
    (offset, scale) with b's [0, 1] at a's [offset, offset + scale], by least squares over a coarse grid of
    crops, then a finer one around the best."""
    cells = (np.arange(pa.shape[1]) + 0.5) / pa.shape[1]

    def search(cl: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # (m, k) each
        off, scale = (cl - start[:, None]) / extent[:, None], kept / extent[:, None]
        seen, inside = _at(pb, (cells[None, None, :] - off[..., None]) / scale[..., None])
        count = inside.sum(axis=2)
        cost = np.where(inside, (pa[:, None, :] - seen) ** 2, 0.0).sum(axis=2) / np.maximum(count, 1)
        cr = 1.0 - kept - cl
        cost = np.where((count >= 0.6 * pa.shape[1]) & (np.abs(cr) <= _CROP_MAX + 1e-9), cost, np.inf)
        best = cost.argmin(axis=1)
        rows = np.arange(len(pa))
        return cl[rows, best], kept[rows, best], cost[rows, best]

    steps = np.linspace(-1.0, 1.0, 13)
    cl, kept = np.meshgrid(steps * _CROP_MAX, 1.0 + 2 * steps * _CROP_MAX, indexing="ij")
    cl, kept, _ = search(np.broadcast_to(cl.ravel(), (len(pa), cl.size)),
                         np.broadcast_to(kept.ravel(), (len(pa), kept.size)))
    fine = np.linspace(-1.0, 1.0, 5) * _CROP_MAX / 6  # +-1 coarse step
    dcl, dkept = np.meshgrid(fine, 2 * fine, indexing="ij")
    cl, kept, _ = search(cl[:, None] + dcl.ravel()[None], kept[:, None] + dkept.ravel()[None])
    return (cl - start) / extent, kept / extent


def _aligned_detail(da: np.ndarray, db: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Per pair, :func:`_detail_distance` between the detail grid ``da`` of a picture cropped to its content
    ``box`` and the grid ``db`` of a whole picture that may be a crop of it (a crop into the content leaves
    no flat border to find a box on), after aligning b onto a axis by axis (:func:`_fit_axis`, on the
    grids' row and column means). Hand-written: a small registration search over stored grids."""
    side = da.shape[1]
    cells = (np.arange(side) + 0.5) / side
    (ox, sx), (oy, sy) = (_fit_axis(da.mean(axis=axis), db.mean(axis=axis), box[:, lo], box[:, hi] - box[:, lo])
                          for axis, lo, hi in ((1, 0, 2), (2, 1, 3)))
    ux = (cells[None, :] - ox[:, None]) / sx[:, None]  # a's columns (rows) in b's
    uy = (cells[None, :] - oy[:, None]) / sy[:, None]
    rows, in_y = _at(db.transpose(0, 2, 1).reshape(-1, side), np.repeat(uy, side, axis=0))  # (m * side, side)
    rows = rows.reshape(len(da), side, side).transpose(0, 2, 1)  # b resampled along y, at a's rows
    seen, in_x = _at(rows.reshape(-1, side), np.repeat(ux, side, axis=0))
    seen = seen.reshape(len(da), side, side)
    inside = in_y.reshape(len(da), side, side)[:, 0, :][:, :, None] & in_x.reshape(len(da), side, side)[:, 0, :][:, None, :]
    inside[:, [0, -1], :] = False
    inside[:, :, [0, -1]] = False
    diff = np.where(inside, np.abs(da - seen), np.nan).reshape(len(da), -1)
    return (np.nanquantile(diff, 0.98, axis=1) / 255.0).astype(np.float32)


def _after(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, whether thumbnail ``a`` sorts after ``b`` (bytewise): equal rows do not."""
    differ = a != b
    first = differ.argmax(axis=1)
    rows = np.arange(len(a))
    return differ[rows, first] & (a[rows, first] > b[rows, first])


def _box_side(t: np.ndarray) -> np.ndarray:
    """The content box's shorter side, in 1/255 of the picture's side."""
    box = t[:, BOX_AT:BG_AT].astype(np.int16)
    return np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])


def _fractions(t: np.ndarray) -> np.ndarray:
    """(m, 4) float64: content box x0, y0, x1, y1 as fractions of the picture's sides."""
    return t[:, BOX_AT:BG_AT].astype(np.float64) / 255.0


def _line_axis(box: np.ndarray) -> np.ndarray:
    """Per row, 1 when the content box is a wide line (of text), 2 a tall one, else 0: along the short
    side a line has a few pixels, so its grids' rows (columns) move with a pixel of box error."""
    w, h = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    return np.where(h < _LINE * w, 1, np.where(w < _LINE * h, 2, 0)).astype(np.int8)


def _pool_lines(grid: np.ndarray, line: np.ndarray) -> np.ndarray:
    """(m, side, side, ch) grids with the rows of wide-line pairs (columns of tall ones) replaced by their
    mean: what is left is the layout along the line, which a pixel of box error does not move."""
    out = grid.copy()
    for axis, sel in ((1, line == 1), (2, line == 2)):
        if sel.any():
            out[sel] = np.broadcast_to(grid[sel].mean(axis=axis, keepdims=True), grid[sel].shape)
    return out


def _crop_needed(a: np.ndarray, b: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Per pair, the least crop per side (a fraction of the side) that makes one picture a crop of the
    other, mapping its content box onto the other's to within ``_EDGE_ERR``: ~0.07 at most between copies
    cropped by up to 6% per side, more for the same content moved or resized inside the picture.

    Per axis, picture b shows a's [cl, 1 - cr] at scale s = 1 - cl - cr, so a box edge x_b in b sits at
    cl + s * x_b in a; for each s on a grid, the edges inside both pictures bound cl (an edge on the
    border may have been cut there) and the least max(|cl|, |cr|) within the bounds is kept. Across a
    line (``line``: 1 wide, 2 tall) the box's centre stands for its edges: a few pixels tall, its height
    moves with JPEG ringing. Both directions (a from b, b from a), so the value is a function of the
    unordered pair. Hand-written: a one-parameter search over small vectors, which no library offers.
    """
    scales = 1.0 + np.linspace(-2.0, 2.0, 41) * _CROP_MAX  # s = 1 - cl - cr with |cl|, |cr| <= _CROP_MAX
    need = np.zeros(len(a), dtype=np.float64)
    for x, y in ((a, b), (b, a)):
        for lo, hi, across in ((0, 2, line == 2), (1, 3, line == 1)):
            lower = np.full((len(x), scales.size), -np.inf)
            upper = np.full((len(x), scales.size), np.inf)
            mid_x, mid_y = (x[:, lo] + x[:, hi]) / 2, (y[:, lo] + y[:, hi]) / 2
            for px, py, inside in ((x[:, lo], y[:, lo], ~across & (x[:, lo] > _AT_EDGE) & (y[:, lo] > _AT_EDGE)),
                                   (x[:, hi], y[:, hi], ~across & (x[:, hi] < 1 - _AT_EDGE) & (y[:, hi] < 1 - _AT_EDGE)),
                                   (mid_x, mid_y, across)):
                cl = px[:, None] - scales[None, :] * py[:, None]
                lower = np.where(inside[:, None], np.maximum(lower, cl - _EDGE_ERR), lower)
                upper = np.where(inside[:, None], np.minimum(upper, cl + _EDGE_ERR), upper)
            best = np.clip((1.0 - scales[None, :]) / 2, lower, upper)  # max(|cl|, |cr|) is least at cl = cr
            cost = np.maximum(np.abs(best), np.abs(1.0 - scales[None, :] - best))
            need = np.maximum(need, np.where(lower <= upper, cost, np.inf).min(axis=1))
    return need


def _cheap_signals(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """The signals that cost O(cells) per pair: most candidates that are not copies fail one of them."""
    box_a, box_b = _fractions(a), _fractions(b)
    line_a, line_b = _line_axis(box_a), _line_axis(box_b)
    line = np.where((line_a == line_b) & (a[:, BG_AT + 3] == 1) & (b[:, BG_AT + 3] == 1), line_a, 0)
    ga = _pool_lines(a[:, :GREY_N].astype(np.float32).reshape(-1, GREY_SIDE, GREY_SIDE, 1), line)
    gb = _pool_lines(b[:, :GREY_N].astype(np.float32).reshape(-1, GREY_SIDE, GREY_SIDE, 1), line)
    la = _lab(a[:, GREY_N:BOX_AT].reshape(-1, RGB_SIDE, RGB_SIDE, 3))
    lb = _lab(b[:, GREY_N:BOX_AT].reshape(-1, RGB_SIDE, RGB_SIDE, 3))
    both_cropped = (a[:, BG_AT + 3] == 1) & (b[:, BG_AT + 3] == 1)
    background = np.sqrt(((_lab(a[:, BG_AT:BG_AT + 3]) - _lab(b[:, BG_AT:BG_AT + 3])) ** 2).sum(axis=1))
    background = np.where(both_cropped, background, 0.0).astype(np.float32)
    area = np.maximum((box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1]),
                      (box_b[:, 2] - box_b[:, 0]) * (box_b[:, 3] - box_b[:, 1]))
    return {
        "grey_mean": np.abs(ga - gb).mean(axis=(1, 2, 3)) / 255.0,
        "colour_mean": np.sqrt(((la.mean(axis=(1, 2)) - lb.mean(axis=(1, 2))) ** 2).sum(axis=1)),
        "shift": np.abs(a[:, BOX_AT:BG_AT].astype(np.float32) - b[:, BOX_AT:BG_AT]).max(axis=1) / 255.0,
        "background": background,
        # small content: the background is most of the picture, so JPEG's error on it is all that may differ
        "background_small": np.where(area < _SMALL_CONTENT, background, 0.0).astype(np.float32),
        "crop": _crop_needed(box_a, box_b, line).astype(np.float32),
        "line": line,
    }


def _costly_signals(a: np.ndarray, b: np.ndarray, line: np.ndarray) -> dict[str, np.ndarray]:
    """The shift-tolerant cell comparisons (9 shifted copies of every grid), run on pairs that passed
    :func:`_cheap_signals`."""
    ga = _pool_lines(a[:, :GREY_N].astype(np.float32).reshape(-1, GREY_SIDE, GREY_SIDE, 1), line)
    gb = _pool_lines(b[:, :GREY_N].astype(np.float32).reshape(-1, GREY_SIDE, GREY_SIDE, 1), line)
    la = _pool_lines(_lab(a[:, GREY_N:BOX_AT].reshape(-1, RGB_SIDE, RGB_SIDE, 3)), line)
    lb = _pool_lines(_lab(b[:, GREY_N:BOX_AT].reshape(-1, RGB_SIDE, RGB_SIDE, 3)), line)
    both_cropped = (a[:, BG_AT + 3] == 1) & (b[:, BG_AT + 3] == 1)
    # aligned by their (large) content boxes, two copies agree cell by cell; other words or marks do not.
    # The 98th percentile over inner cells ignores the few cells that resampling of sharp edges moves.
    # A box edge found a pixel off moves the grid by 32 / (box pixels) cells: under 0.2 cell for boxes of
    # >= 60% of the picture (compared as they are), under 0.35 for 40-60% (compared at the best half-cell
    # shift, which also forgives some real difference); smaller boxes (a small shape, a line) are not compared.
    side = np.minimum(_box_side(a), _box_side(b))
    swap = _after(a, b)  # a canonical order for the asymmetric comparisons: a function of the unordered pair
    a, b = np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)
    da = a[:, DETAIL_AT:].astype(np.float32).reshape(-1, DETAIL_SIDE, DETAIL_SIDE)
    db = b[:, DETAIL_AT:].astype(np.float32).reshape(-1, DETAIL_SIDE, DETAIL_SIDE)
    detail = np.zeros(len(a), dtype=np.float32)
    for sel, reach in ((both_cropped & (side >= 153), 0), (both_cropped & (side >= 102) & (side < 153), 1)):
        if sel.any():
            detail[sel] = _detail_distance(da[sel], db[sel], reach)
    # one cropped to a large box, the other whole (a crop cut into its border): aligned by a crop search
    a_cropped, b_cropped = a[:, BG_AT + 3] == 1, b[:, BG_AT + 3] == 1
    one = (a_cropped != b_cropped) & (np.where(a_cropped, _box_side(a), _box_side(b)) >= 102)
    if one.any():
        first = a_cropped[one][:, None, None]
        detail[one] = _aligned_detail(np.where(first, da[one], db[one]), np.where(first, db[one], da[one]),
                                      np.where(first[:, :, 0], _fractions(a[one]), _fractions(b[one])))
    return {
        "grey_local": _local_max(ga, gb) / 255.0,
        "colour_local": _local_max(la, lb, interpolate=True),
        "detail": detail,
    }


def thumbnail_signals(thumbs: np.ndarray, pairs: np.ndarray) -> dict[str, np.ndarray]:
    """Per pair, every signal :func:`confirm_pairs` thresholds; ``thumbs`` is (n, THUMB_BYTES) uint8."""
    a, b = thumbs[pairs[:, 0]], thumbs[pairs[:, 1]]
    cheap = _cheap_signals(a, b)
    return {**cheap, **_costly_signals(a, b, cheap["line"])}


def _cheap_ok(sig: dict[str, np.ndarray], cfg: DedupConfig) -> np.ndarray:
    return ((sig["grey_mean"] <= cfg.thumbnail_max_distance)
            & (sig["colour_mean"] <= cfg.colour_max_mean_delta_e)
            & (sig["background"] <= cfg.colour_max_mean_delta_e)
            & (sig["background_small"] <= min(_SMALL_CONTENT_DELTA_E, cfg.colour_max_mean_delta_e))
            & (sig["shift"] <= cfg.thumbnail_max_shift)
            & (sig["crop"] <= _CROP_MAX))


def _costly_ok(sig: dict[str, np.ndarray], cfg: DedupConfig) -> np.ndarray:
    return ((sig["grey_local"] <= cfg.thumbnail_max_local_distance)
            & (sig["colour_local"] <= cfg.colour_max_local_delta_e)
            & (sig["detail"] <= cfg.thumbnail_max_detail))


_CONFIRM_CHUNK = 2048  # pairs per step: ~75 MiB of float work arrays (8192: ~300 MiB, a partition's peak)


def confirm_pairs(thumbs: np.ndarray, pairs: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """Boolean mask over ``pairs`` (indices into ``thumbs``, (n, THUMB_BYTES) uint8): same picture?

    A pure function of the two thumbnails and the config, so a partitioned decide can call it on any
    worker that holds both items' signatures. The cheap signals go first; the shift-tolerant grid
    comparisons run only on the pairs that pass them.
    """
    ok = np.zeros(len(pairs), dtype=bool)
    for s in range(0, len(pairs), _CONFIRM_CHUNK):  # bounded memory: 9 shifted float copies per chunk
        chunk = pairs[s:s + _CONFIRM_CHUNK]
        a, b = thumbs[chunk[:, 0]], thumbs[chunk[:, 1]]
        cheap = _cheap_signals(a, b)
        passed = np.flatnonzero(_cheap_ok(cheap, cfg))
        if passed.size:
            costly = _costly_signals(a[passed], b[passed], cheap["line"][passed])
            ok[s + passed] = _costly_ok(costly, cfg)
    return ok


def confirm_pair(thumb_a: bytes, thumb_b: bytes, cfg: DedupConfig) -> bool:
    """:func:`confirm_pairs` for one pair of thumbnail byte strings."""
    t = np.frombuffer(thumb_a + thumb_b, dtype=np.uint8).reshape(2, THUMB_BYTES)
    return bool(confirm_pairs(t, np.array([[0, 1]], dtype=np.int64), cfg)[0])


_KEY_BOX = 3  # a content-box byte against a grey level: a crop moves a coordinate by <= ~18, a moved shape >= 45
_KEY_COLOUR = 6  # one delta E of the mean colour against a grey level: look-alikes of one grey differ by >= ~20


def content_lines(thumbs: np.ndarray) -> np.ndarray:
    """Per thumbnail, 1 when it was cropped to a content box that is a wide line (of text), 2 a tall one,
    else 0."""
    return np.where(thumbs[:, BG_AT + 3] == 1, _line_axis(_fractions(thumbs)), 0).astype(np.int8)


def knn_key(thumbs: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """(n, 71) float32 nearest-neighbour key: ``grey`` ((n, 64) levels 0-255 of the 8x8 pooled grid), the
    content box and the mean colour, weighted so that what tells look-alikes of one grey apart (where the
    content sits, its size, its colour) outweighs a crop's or a re-encode's change: one shape on a page in
    many colours and places otherwise has near-equal keys, and copies lose their place among the nearest.
    Small integers (squared norms < 2^23), so faiss' float32 distances are exact and ties break alike
    in every process."""
    box = thumbs[:, BOX_AT:BG_AT].astype(np.float32) * _KEY_BOX
    lab = _lab(thumbs[:, GREY_N:BOX_AT].reshape(-1, RGB_SIDE * RGB_SIDE, 3)).mean(axis=1)
    colour = np.rint(lab * _KEY_COLOUR).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([grey.astype(np.float32), box, colour], axis=1))


def knn_index_pairs(index: Any, x: np.ndarray, k: int) -> np.ndarray:
    """Add ``x`` to the empty faiss ``index`` and return the unique pairs i < j with j among i's k nearest
    (self matches and faiss' -1 fillers dropped)."""
    n = len(x)
    index.add(x)
    _, nbrs = index.search(x, min(k + 1, n))
    rows = np.repeat(np.arange(n, dtype=np.int64), nbrs.shape[1])
    cols = nbrs.reshape(-1).astype(np.int64)
    keep = (cols >= 0) & (rows != cols)
    a, b = rows[keep], cols[keep]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs
