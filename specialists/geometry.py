"""Pure box geometry for the specialists: normalisation, IoU, NMS, reading order, spatial relations and a
box's text form.

Boxes are ``[xmin, ymin, xmax, ymax]`` normalised to [0, 1] with y growing downwards (image convention),
so "above" means a smaller y. Everything here is deterministic (ties broken by input index) because the
sentences it yields go into training data and must not change between runs or engines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = Sequence[float]

# A pair is "left of" / "above" only when the boxes overlap along that axis by less than this share of the
# smaller extent: two mostly stacked boxes are above/below each other, not left/right.
AXIS_OVERLAP_MAX = 0.5
LARGER_RATIO = 1.5  # "the A is larger than the B" only when area(A) >= 1.5 * area(B)


def clip01(v: float) -> float:
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else float(v)


def normalise_xyxy(box: Box, width: int, height: int) -> list[float]:
    """Pixel xyxy -> normalised, clipped to [0, 1] and ordered so that min <= max."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return [clip01(x0 / width), clip01(y0 / height), clip01(x1 / width), clip01(y1 / height)]


def quad_to_xyxy(points: Sequence[Sequence[float]], width: int, height: int) -> list[float]:
    """The axis-aligned normalised box around a (possibly rotated) quadrilateral of pixel points."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return normalise_xyxy((min(xs), min(ys), max(xs), max(ys)), width, height)


def format_box(box: Box) -> str:
    """``[xmin, ymin, xmax, ymax]`` with two decimals: how a box is written in grounding text and in the
    bbox_interleaved sidecar answer."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def area(b: Box) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def centre(b: Box) -> tuple[float, float]:
    return (b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0


def centre_distance(a: Box, b: Box) -> float:
    (ax, ay), (bx, by) = centre(a), centre(b)
    return math.hypot(ax - bx, ay - by)


def intersection(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def iou(a: Box, b: Box) -> float:
    inter = intersection(a, b)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def contains(outer: Box, inner: Box, tol: float = 0.0) -> bool:
    """True when ``inner`` lies inside ``outer`` grown by ``tol`` on every side."""
    return (outer[0] - tol <= inner[0] and outer[1] - tol <= inner[1]
            and inner[2] <= outer[2] + tol and inner[3] <= outer[3] + tol)


def nms(boxes: Sequence[Box], scores: Sequence[float], iou_threshold: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best score first (ties: lower index first)."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= iou_threshold for k in keep):
            keep.append(i)
    return keep


def reading_order(boxes: Sequence[Box]) -> list[list[int]]:
    """Group boxes into visual lines (top to bottom), each line left to right; returns indices per line.

    A box joins the current line when its vertical centre falls inside the line's vertical span, which
    keeps words of one slightly wavy text line together where a fixed pixel tolerance would split them.
    """
    order = sorted(range(len(boxes)), key=lambda i: (centre(boxes[i])[1], boxes[i][0], i))
    lines: list[list[int]] = []
    span: tuple[float, float] | None = None
    for i in order:
        cy = centre(boxes[i])[1]
        if span is not None and span[0] <= cy <= span[1]:
            lines[-1].append(i)
            span = (min(span[0], boxes[i][1]), max(span[1], boxes[i][3]))
        else:
            lines.append([i])
            span = (boxes[i][1], boxes[i][3])
    return [sorted(line, key=lambda i: (boxes[i][0], boxes[i][1], i)) for line in lines]


def _axis_overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Overlap of two 1-D intervals as a share of the shorter one (0: disjoint, 1: one inside the other)."""
    inter = min(a1, b1) - max(a0, b0)
    shorter = min(a1 - a0, b1 - b0)
    if inter <= 0:
        return 0.0
    return 1.0 if shorter <= 0 else inter / shorter


def horizontal_relation(a: Box, b: Box) -> str | None:
    """"left of" / "right of" (a relative to b), or None when they are mostly stacked vertically."""
    if _axis_overlap(a[0], a[2], b[0], b[2]) >= AXIS_OVERLAP_MAX:
        return None
    ax, bx = centre(a)[0], centre(b)[0]
    if ax == bx:
        return None
    return "left of" if ax < bx else "right of"


def vertical_relation(a: Box, b: Box) -> str | None:
    """"above" / "below" (a relative to b), or None when they mostly share the same rows."""
    if _axis_overlap(a[1], a[3], b[1], b[3]) >= AXIS_OVERLAP_MAX:
        return None
    ay, by = centre(a)[1], centre(b)[1]
    if ay == by:
        return None
    return "above" if ay < by else "below"


def nearest(boxes: Sequence[Box]) -> list[int | None]:
    """Per box, the index of the other box with the closest centre (ties: lower index); None if alone."""
    out: list[int | None] = []
    for i, b in enumerate(boxes):
        others = [(centre_distance(b, o), j) for j, o in enumerate(boxes) if j != i]
        out.append(min(others)[1] if others else None)
    return out


def pair_relations(a: Box, b: Box) -> list[str]:
    """Relation phrases of a to b, in a fixed order: horizontal, vertical, overlap, size.

    Each phrase completes "the A ... the B" except "larger than", which may have b as its subject and is
    returned as "larger than" (a larger) or "smaller than" (b larger) so callers can flip the sentence.
    """
    rels: list[str] = []
    h = horizontal_relation(a, b)
    if h:
        rels.append(h)
    v = vertical_relation(a, b)
    if v:
        rels.append(v)
    if intersection(a, b) > 0:
        rels.append("overlapping")
    aa, ab = area(a), area(b)
    if ab > 0 and aa >= LARGER_RATIO * ab:
        rels.append("larger than")
    elif aa > 0 and ab >= LARGER_RATIO * aa:
        rels.append("smaller than")
    return rels


def spatial_sentences(names: Sequence[str], boxes: Sequence[Box], max_relations: int) -> list[str]:
    """Plain-English relations between named objects, deterministic, at most ``max_relations``.

    Order: object pairs from the closest centres to the farthest (close pairs are what a caption would
    mention first), each pair's relations in :func:`pair_relations` order; then, per object, its nearest
    neighbour. "larger than" always has the larger object as subject.
    """
    if max_relations <= 0:
        return []
    n = len(boxes)
    pairs = sorted((centre_distance(boxes[i], boxes[j]), i, j) for i in range(n) for j in range(i + 1, n))
    out: list[str] = []
    for _, i, j in pairs:
        a, b = f"the {names[i]}", f"the {names[j]}"
        for rel in pair_relations(boxes[i], boxes[j]):
            if rel == "overlapping":
                out.append(f"{a} overlaps {b}.")
            elif rel == "larger than":
                out.append(f"{a} is larger than {b}.")
            elif rel == "smaller than":
                out.append(f"{b} is larger than {a}.")
            else:
                out.append(f"{a} is {rel} {b}.")
    for i, j in enumerate(nearest(boxes)):
        if j is not None:
            out.append(f"the {names[j]} is the nearest object to the {names[i]}.")
    return out[:max_relations]
