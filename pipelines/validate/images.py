"""Image members: each must decode as the format its name says, and byte-identical copies across the
dataset are reported: a problem where the run's records say exact dedup ran (it should have left one), a
warning otherwise (a run without exact dedup, such as a recaption round, is legal)."""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Iterator

import fsspec
import numpy as np
from PIL import Image

from vila2_curate.pipelines.validate.findings import Validation
from vila2_curate.pipelines.validate.tar_reader import scan_tar, vila_groups
from vila2_curate.schemas.images import PIL_FORMATS

IMAGE_EXTS = PIL_FORMATS  # member extension -> PIL format
DIGEST_PREFIX = 8  # bytes of each image's sha256 kept for the cross-dataset duplicate check


def check_image(data: bytes, ext: str) -> str | None:
    """Why ``data`` is not a decodable image of the format ``ext`` names; None if it is."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as e:  # noqa: BLE001 - any decode failure is the finding
        return f"does not decode with PIL ({type(e).__name__}: {e})"
    want = IMAGE_EXTS.get(ext)
    if want and fmt != want:
        return f"is {fmt} data under a .{ext} name"
    return None


class ImageDigests:
    """Every image's sha256 prefix with where it is (16 bytes per image), with bounded memory.

    Records collect in flat arrays; past ``spill_at`` records they are appended to 256 bucket files (by the
    digest's first byte) in a temporary folder, so memory stays ``spill_at`` x 16 bytes (16 MiB) whatever
    the dataset's size. ``summary`` sorts one bucket at a time: buckets in byte order, keys sorted inside
    each, is the same order as one global sort.
    """

    RECORD = np.dtype([("key", "u8"), ("tar", "u4"), ("ordinal", "u4")])  # native: the files never leave
    BUCKETS = 256

    def __init__(self, spill_at: int = 1 << 20) -> None:
        self.spill_at = spill_at
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._spill: tempfile.TemporaryDirectory | None = None

    def add(self, tar_index: int, images: list[tuple[bytes, int]]) -> None:
        if not images:
            return
        rec = np.empty(len(images), dtype=self.RECORD)
        rec["key"] = np.frombuffer(b"".join(d for d, _ in images), dtype=">u8")
        rec["tar"] = tar_index
        rec["ordinal"] = [o for _, o in images]
        self._buf.append(rec)
        self._buffered += len(rec)
        if self._buffered >= self.spill_at:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="vila2-validate-")
        rec = np.concatenate(self._buf)
        self._buf, self._buffered = [], 0
        bucket = (rec["key"] >> np.uint64(56)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        rec, bucket = rec[order], bucket[order]
        edges = np.searchsorted(bucket, np.arange(self.BUCKETS + 1))
        for b in range(self.BUCKETS):
            if edges[b] < edges[b + 1]:
                with open(os.path.join(self._spill.name, f"{b:03d}"), "ab") as f:
                    f.write(rec[edges[b]:edges[b + 1]].tobytes())

    def _buckets(self) -> Iterator[np.ndarray]:
        if self._spill is None:
            if self._buf:
                yield np.concatenate(self._buf)
            return
        self._flush()
        for b in range(self.BUCKETS):
            path = os.path.join(self._spill.name, f"{b:03d}")
            if os.path.exists(path):
                yield np.fromfile(path, dtype=self.RECORD)

    def summary(self) -> tuple[int, int, list[tuple[int, int]]]:
        """(groups of images whose first 64 sha256 bits are equal, extra copies, the first group's
        (tar index, image ordinal) members); a collision between different images is ~1e-5 at 25M."""
        groups = copies = 0
        first: list[tuple[int, int]] = []
        try:
            for rec in self._buckets():
                order = np.argsort(rec["key"], kind="stable")
                rec = rec[order]
                keys = rec["key"]
                dup = keys[1:] == keys[:-1]
                if not dup.any():
                    continue
                starts = np.flatnonzero(dup & np.concatenate(([True], ~dup[:-1])))
                groups += len(starts)
                copies += int(dup.sum())
                if not first:
                    s = int(starts[0])
                    e = s + 1
                    while e < len(keys) and keys[e] == keys[s]:
                        e += 1
                    first = [(int(t), int(o)) for t, o in zip(rec["tar"][s:e], rec["ordinal"][s:e], strict=True)]
        finally:
            if self._spill is not None:
                self._spill.cleanup()
                self._spill = None
        return groups, copies, first


def _image_keys(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Keys of a tar's samples with an image member, in order (what TarFacts.images ordinals count)."""
    with fs.open(path, "rb") as f:
        names = [m.name for m in scan_tar(f).members]
    return [k for k, idxs in vila_groups(names).items()
            for i in idxs if posixpath.splitext(names[i])[1][1:] in IMAGE_EXTS]


def report_duplicate_images(
    fs: fsspec.AbstractFileSystem, base: str, tars: list[str], digests: ImageDigests, report: Validation,
    exact_dedup: str | None = None,
) -> None:
    """Byte-identical images across the dataset: a problem when ``exact_dedup`` (the record saying exact
    dedup ran) is given, since VILA would train on each copy; a warning otherwise."""
    n_groups, copies, first = digests.summary()
    if not n_groups:
        return
    keys = {t: _image_keys(fs, f"{base}/{tars[t]}") for t in {t for t, _ in first}}
    example = ", ".join(f"{tars[t]}:{keys[t][o]}" for t, o in first)
    found = (f"{n_groups} image(s) appear byte-identical in more than one sample ({copies} extra copies; "
             f"sha256), e.g. {example}")
    if exact_dedup:
        report.problems.append(f"{found}, though exact dedup ran ({exact_dedup}): it keeps one copy of each, "
                               f"VILA trains on every copy")
    else:
        report.warnings.append(f"{found}: was exact dedup run?")
