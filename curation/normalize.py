"""normalize: decode probe, EXIF orientation, sha256, pHash, size and aspect filters.

Runs first and cheaply, before any GPU work, so every later stage can trust that an alive row holds a
decodable image in a format VILA's loader reads (jpg / png / webp) with known width and height.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings

import imagehash
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from vila2_curate.curation.dedup.thumbnails import thumbnail_of_decoded
from vila2_curate.schemas.config import NormalizeConfig
from vila2_curate.schemas.documents import NO_USABLE_IMAGES, has_kept_image
from vila2_curate.schemas.images import DRAFTABLE_PIL_FORMATS, FORMAT_OF_PIL, undecodable_reason
from vila2_curate.schemas.stage import StageBase
from vila2_curate.schemas.table_ops import replace_columns

# Formats VILA's trainer reads as-is, mapped to the shard member extension.
_KEPT_FORMATS = FORMAT_OF_PIL
_EXIF_ORIENTATION = 0x0112
_PHASH_DRAFT_SIZE = (128, 128)  # 4x pHash's 32x32 input: draft stays within a few bits of a full decode


class ImageRejected(Exception):
    """The image cannot be used; ``reason`` goes to drop_reason, ``quarantine`` says bad input vs filter."""

    def __init__(self, reason: str, quarantine: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.quarantine = quarantine


class ProbedImage:
    __slots__ = ("data", "fmt", "sha256", "phash", "width", "height", "reencoded", "thumb")

    def __init__(self, data: bytes, fmt: str, sha256: str, phash: int, width: int, height: int,
                 reencoded: str | None, thumb: bytes | None = None) -> None:
        self.data, self.fmt, self.sha256, self.phash = data, fmt, sha256, phash
        self.width, self.height, self.reencoded, self.thumb = width, height, reencoded, thumb


def phash_u64(image: Image.Image) -> int:
    """64-bit pHash as an unsigned int, bit-identical to ``int(str(imagehash.phash(image)), 16)``."""
    return int(str(imagehash.phash(image)), 16)


def probe_image(data: bytes | None, cfg: NormalizeConfig, thumbnail: bool = False) -> ProbedImage:
    """Decode-check one encoded image and compute its identity; raise ImageRejected when unusable.
    ``thumbnail``: also dedup's thumbnail signature from this decode (a dedup stage of the segment
    confirms with thumbnails and would otherwise decode the image a second time)."""
    if not data:
        raise ImageRejected("image_empty", quarantine=True)
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > cfg.max_pixels:
                raise ImageRejected(f"decompression_bomb: {width}x{height} > {cfg.max_pixels} pixels", True)
            fmt = img.format or "unknown"
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if cfg.apply_exif_orientation else 1
            needs_full = orientation not in (1, None) or fmt not in _KEPT_FORMATS
            if cfg.draft and fmt in DRAFTABLE_PIL_FORMATS and not needs_full:
                img.draft("RGB", _PHASH_DRAFT_SIZE)
            img.load()  # full read of the stream: catches truncated and corrupt data
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"decompression_bomb: {e}", True) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(undecodable_reason(e), True) from None

    reencoded = None
    out = data
    ext = _KEPT_FORMATS.get(fmt)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        width, height = img.size
        reencoded = f"exif_orientation_{orientation}"
    if reencoded or ext is None:
        reencoded = reencoded or f"format_{fmt.lower()}"
        out, ext = _reencode(img, fmt if ext else None, cfg.reencode_quality)

    side, long_side = min(width, height), max(width, height)
    if side < cfg.min_side:
        raise ImageRejected(f"too_small: {width}x{height} < {cfg.min_side}", False)
    if long_side / max(side, 1) > cfg.max_aspect:
        raise ImageRejected(f"aspect_ratio: {width}x{height} > {cfg.max_aspect}", False)
    thumb = thumbnail_of_decoded(img) if thumbnail else None
    return ProbedImage(out, ext, sha, phash_u64(img), width, height, reencoded, thumb)


def _reencode(img: Image.Image, kept_format: str | None, quality: int) -> tuple[bytes, str]:
    """Re-encode to a format VILA reads: keep PNG/WebP as themselves, alpha -> PNG, the rest -> JPEG."""
    buf = io.BytesIO()
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if kept_format in ("PNG", "WEBP") or has_alpha:
        fmt = "WEBP" if kept_format == "WEBP" else "PNG"
        img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        return buf.getvalue(), _KEPT_FORMATS[fmt]
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


class NormalizeStage(StageBase):
    """Pure batch transform over pair rows or MMC4 document rows (per image inside a document)."""

    name = "normalize"
    version = "3"  # 2: dedup's thumbnail from this decode (``thumbnails_follow``); 3: a photo's without the
    # work-size copy

    def __init__(self, cfg: NormalizeConfig | None = None) -> None:
        self.cfg = cfg or NormalizeConfig()

    def setup(self) -> None:
        """No model to load."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        if "image_info" in batch.column_names:
            return self._documents(batch)
        return self._pairs(batch)

    def _pairs(self, batch: pa.Table) -> pa.Table:
        cols: dict[str, list] = {n: batch.column(n).to_pylist() for n in (
            "image_format", "sha256", "phash", "thumb", "width", "height", "drop_reason", "drop_stage",
            "quarantined", "meta")}
        images = batch.column("image").to_pylist()
        reencoded = False
        for i, reason in enumerate(cols["drop_reason"]):
            if reason is not None:
                continue
            try:
                p = probe_image(images[i], self.cfg, self.thumbnails_follow)
            except ImageRejected as e:
                cols["drop_reason"][i], cols["drop_stage"][i] = e.reason, self.name
                cols["quarantined"][i] = e.quarantine
                # the sha256 of what we received still helps to trace a rejected sample
                if images[i]:
                    cols["sha256"][i] = hashlib.sha256(images[i]).hexdigest()
                continue
            cols["image_format"][i], cols["sha256"][i] = p.fmt, p.sha256
            cols["phash"][i], cols["width"][i], cols["height"][i] = p.phash, p.width, p.height
            cols["thumb"][i] = p.thumb
            if p.reencoded:
                images[i], reencoded = p.data, True
                cols["meta"][i] = _with_meta(cols["meta"][i], reencoded=p.reencoded)
        if reencoded:  # else the image column stays as it came: rebuilding it copies every image's bytes
            cols["image"] = images
        return replace_columns(batch, cols)

    def _documents(self, batch: pa.Table) -> pa.Table:
        infos = batch.column("image_info").to_pylist()
        drop, stage = batch.column("drop_reason").to_pylist(), batch.column("drop_stage").to_pylist()
        for d, images in enumerate(infos):
            if drop[d] is not None:
                continue
            for im in images or []:
                if im.get("drop_reason") is not None:
                    continue
                try:
                    p = probe_image(im.get("image"), self.cfg, self.thumbnails_follow)
                except ImageRejected as e:
                    im["drop_reason"], im["drop_stage"] = e.reason, self.name
                    continue
                im.update(image=p.data, image_format=p.fmt, sha256=p.sha256, phash=p.phash, thumb=p.thumb,
                          width=p.width, height=p.height)
                if p.reencoded:
                    im["meta"] = _with_meta(im.get("meta"), reencoded=p.reencoded)
            if not has_kept_image(images):
                drop[d], stage[d] = NO_USABLE_IMAGES, self.name
        return replace_columns(batch, {"image_info": infos, "drop_reason": drop, "drop_stage": stage})


def _with_meta(meta: str | None, **extra: object) -> str:
    obj = json.loads(meta) if meta else {}
    obj.update(extra)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)
