"""Image formats and decoding: the extension tables, the magic-byte sniffer and the decode helpers.

Every reader, stage, the validator and the report take their format tables from here, and every stage that
decodes image bytes for a model (clipscore, recaption, the VLM DeltaLoss scorer, the specialists) turns a
decoder failure into :func:`undecodable_reason`, so the same bad image gets the same ``drop_reason``
whichever stage meets it, on every run (object addresses are removed from the message).

Each stage still decides how much of the image it needs (JPEG draft size, EXIF orientation, resizing);
this module only opens, drafts and names failures.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

# Member / file extension -> canonical format; "other" = an image VILA's loaders do not read.
IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "gif": "other",
                    "bmp": "other", "tif": "other", "tiff": "other"}
VILA_IMAGE_FORMATS = ("jpg", "png", "webp")  # the extensions VILA's loaders look for (never .jpeg)
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # canonical format -> PIL's ``Image.format``
FORMAT_OF_PIL = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> canonical
DRAFTABLE_PIL_FORMATS = ("JPEG", "MPO")  # DCT-domain downscale while decoding (``Image.draft``)

UNDECODABLE = "image_undecodable"
EMPTY_IMAGE_BYTES = f"{UNDECODABLE}: empty image bytes"
_MAX_DETAIL = 120
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f..>" differs run to run


def sniff_image_format(data: bytes | None, name_hint: str | None = None) -> str:
    """"jpg" / "png" / "webp" from the magic bytes, else from the extension, else "other".

    Magic bytes win over the name: web images are often mislabelled (MMC4's ``*.jpg`` names are
    assigned before download, whatever the server returns). Nothing is decoded here.
    """
    if data:
        if data[:3] == b"\xff\xd8\xff":
            return "jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "webp"
        if data[:4] in (b"GIF8", b"II*\x00", b"MM\x00*") or data[:2] == b"BM":
            return "other"
    if name_hint:
        ext = name_hint.rsplit(".", 1)[-1].lower()
        return IMAGE_EXTENSIONS.get(ext, "other")
    return "other"


class UndecodableImage(ValueError):
    """Image bytes a stage cannot decode; ``str(err)`` is the row's drop reason (it is quarantined)."""


def undecodable_reason(err: BaseException) -> str:
    """``image_undecodable: Type: detail``, the detail without object addresses and at most 120 chars."""
    detail = _ADDRESS.sub("", str(err)).strip()[:_MAX_DETAIL]
    name = type(err).__name__
    return f"{UNDECODABLE}: {name}: {detail}" if detail else f"{UNDECODABLE}: {name}"


@contextmanager
def decoding() -> Iterator[None]:
    """Turn any failure inside the block into :class:`UndecodableImage` with :func:`undecodable_reason`."""
    try:
        yield
    except UndecodableImage:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure quarantines this row only
        raise UndecodableImage(undecodable_reason(e)) from None


def open_image(data: bytes | None) -> Image.Image:
    """Open (lazily) encoded image bytes; empty bytes raise :class:`UndecodableImage` at once."""
    if not data:
        raise UndecodableImage(EMPTY_IMAGE_BYTES)
    return Image.open(io.BytesIO(data))


def draft_rgb(img: Image.Image, size: tuple[int, int]) -> None:
    """Ask a JPEG decoder for RGB at no less than ``size`` (DCT scaling); other formats are left alone."""
    if img.format in DRAFTABLE_PIL_FORMATS:
        img.draft("RGB", size)


def decode_rgb(data: bytes | None, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode to RGB, JPEG draft-decoded to about ``draft_to`` when given; failures as UndecodableImage."""
    with decoding():
        img = open_image(data)
        if draft_to is not None:
            draft_rgb(img, draft_to)
        return img.convert("RGB")
