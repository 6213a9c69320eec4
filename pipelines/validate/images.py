"""Image members: each must decode as the format its name says, and byte-identical copies across the
dataset are reported (a run without exact dedup is legal, so that is a warning)."""

from __future__ import annotations

import io
import posixpath
from array import array

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
    """Every image's sha256 prefix with where it is, in flat arrays: 16 bytes per image (400 MB at 25M)."""

    def __init__(self) -> None:
        self.prefixes = bytearray()
        self.tar = array("I")
        self.ordinal = array("I")

    def add(self, tar_index: int, images: list[tuple[bytes, int]]) -> None:
        for digest, ordinal in images:
            self.prefixes += digest
            self.tar.append(tar_index)
            self.ordinal.append(ordinal)

    def duplicate_groups(self) -> list[list[tuple[int, int]]]:
        """(tar index, image ordinal) of images whose first 64 sha256 bits are equal (a collision between
        different images is ~1e-5 at 25M images)."""
        keys = np.frombuffer(bytes(self.prefixes), dtype=">u8")
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        groups: dict[int, list[int]] = {}
        for i in same.tolist():
            groups.setdefault(int(ordered[i]), [int(order[i])]).append(int(order[i + 1]))
        return [[(self.tar[j], self.ordinal[j]) for j in members] for members in groups.values()]


def _image_keys(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Keys of a tar's samples with an image member, in order (what TarFacts.images ordinals count)."""
    with fs.open(path, "rb") as f:
        names = [m.name for m in scan_tar(f).members]
    return [k for k, idxs in vila_groups(names).items()
            for i in idxs if posixpath.splitext(names[i])[1][1:] in IMAGE_EXTS]


def report_duplicate_images(
    fs: fsspec.AbstractFileSystem, base: str, tars: list[str], digests: ImageDigests, report: Validation,
) -> None:
    """Byte-identical images across the dataset: a warning (a run without exact dedup is legal)."""
    groups = digests.duplicate_groups()
    if not groups:
        return
    copies = sum(len(g) - 1 for g in groups)
    keys = {t: _image_keys(fs, f"{base}/{tars[t]}") for t in {t for t, _ in groups[0]}}
    example = ", ".join(f"{tars[t]}:{keys[t][o]}" for t, o in groups[0])
    report.warnings.append(f"{len(groups)} image(s) appear byte-identical in more than one sample ({copies} extra "
                           f"copies; sha256), e.g. {example}: was exact dedup run?")
