"""normalize stage: decode probe, quarantine reasons, filters, EXIF, pHash identity with imagehash."""

from __future__ import annotations

import hashlib
import io
import json

import imagehash
import numpy as np
import pytest
from PIL import Image

from vila2_curate.curation.normalize import NormalizeStage, phash_u64
from vila2_curate.schemas.config import NormalizeConfig
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table


def _texture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pairs(images: list[bytes | None]) -> pa.Table:  # noqa: F821
    return make_table([{"key": f"k{i}", "source": "s", "shard": "0", "image": b, "quarantined": False}
                       for i, b in enumerate(images)], PAIR_SCHEMA)


def _run(images, **cfg):
    out = NormalizeStage(NormalizeConfig(**cfg))(_pairs(images))
    assert out.num_rows == len(images)
    return out.to_pylist()


def test_good_jpeg_identity_matches_imagehash_and_sha256():
    data = _encode(_texture(640, 480))
    (row,) = _run([data], draft=False)
    assert row["drop_reason"] is None
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["phash"] == int(str(imagehash.phash(Image.open(io.BytesIO(data)))), 16)
    assert (row["width"], row["height"], row["image_format"]) == (640, 480, "jpg")
    assert row["image"] == data  # a readable JPEG is never re-encoded


def test_draft_phash_stays_close_to_full_decode():
    dists = []
    for seed in range(20):
        data = _encode(_texture(1024, 768, seed), quality=90)
        (full,) = _run([data], draft=False)
        (draft,) = _run([data], draft=True)
        dists.append(bin(full["phash"] ^ draft["phash"]).count("1"))
    assert max(dists) <= 6 and np.mean(dists) <= 2.5, dists


@pytest.mark.parametrize(
    "payload,reason",
    [
        (b"", "image_empty"),
        (None, "image_empty"),
        (b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, "image_undecodable"),
        (b"GIF89a" + b"\x00" * 30, "image_undecodable"),
    ],
)
def test_bad_bytes_are_quarantined_with_reason(payload, reason):
    (row,) = _run([payload])
    assert row["quarantined"] is True
    assert row["drop_stage"] == "normalize"
    assert row["drop_reason"].startswith(reason)


def test_truncated_jpeg_is_quarantined():
    data = _encode(_texture(640, 480))
    (row,) = _run([data[: len(data) // 2]], draft=False)
    assert row["quarantined"] and row["drop_reason"].startswith("image_undecodable")
    (row,) = _run([data[: len(data) // 2]], draft=True)
    assert row["quarantined"] and row["drop_reason"].startswith("image_undecodable")


def test_decompression_bomb_is_quarantined_without_decoding():
    bomb = _encode(Image.new("L", (12000, 12000), 0), "PNG", optimize=True)  # 144 Mpx in a small file
    assert len(bomb) < 1_000_000
    (row,) = _run([bomb])
    assert row["quarantined"] and row["drop_reason"].startswith("decompression_bomb")
    (row,) = _run([bomb], max_pixels=10_000_000)
    assert row["drop_reason"].startswith("decompression_bomb")


def test_size_and_aspect_filters_drop_without_quarantine():
    small = _encode(_texture(150, 300))
    wide = _encode(_texture(900, 250))
    ok = _encode(_texture(600, 200))  # aspect exactly 3 is allowed
    rows = _run([small, wide, ok])
    assert rows[0]["drop_reason"].startswith("too_small") and rows[0]["quarantined"] is False
    assert rows[1]["drop_reason"].startswith("aspect_ratio") and rows[1]["quarantined"] is False
    assert rows[2]["drop_reason"] is None
    rows = _run([small], min_side=100)
    assert rows[0]["drop_reason"] is None


def test_exif_orientation_is_applied_and_recorded():
    img = _texture(640, 400)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = _encode(img, exif=exif.tobytes())
    (row,) = _run([data])
    assert (row["width"], row["height"]) == (400, 640)
    out = Image.open(io.BytesIO(row["image"]))
    assert out.size == (400, 640) and out.getexif().get(0x0112, 1) == 1
    assert json.loads(row["meta"])["reencoded"] == "exif_orientation_6"
    assert row["sha256"] == hashlib.sha256(data).hexdigest()  # identity of the bytes as received
    assert row["phash"] == phash_u64(out.convert("RGB")) or bin(row["phash"] ^ phash_u64(out)).count("1") <= 4


@pytest.mark.parametrize("fmt,mode,expect", [("GIF", "P", "jpg"), ("BMP", "RGB", "jpg"), ("TIFF", "RGBA", "png")])
def test_formats_vila_cannot_read_are_reencoded(fmt, mode, expect):
    data = _encode(_texture(320, 240).convert(mode), fmt)
    (row,) = _run([data])
    assert row["drop_reason"] is None and row["image_format"] == expect
    assert Image.open(io.BytesIO(row["image"])).format == {"jpg": "JPEG", "png": "PNG"}[expect]


def test_png_and_webp_are_kept_as_is():
    png = _encode(_texture(320, 240).convert("RGBA"), "PNG")
    webp = _encode(_texture(320, 240), "WEBP")
    rows = _run([png, webp])
    assert [r["image_format"] for r in rows] == ["png", "webp"]
    assert rows[0]["image"] == png and rows[1]["image"] == webp


def test_rows_already_dropped_are_untouched():
    t = make_table([{"key": "a", "source": "s", "shard": "0", "image": b"junk", "drop_reason": "img2dataset_x",
                     "drop_stage": "read", "quarantined": False}], PAIR_SCHEMA)
    (row,) = NormalizeStage()(t).to_pylist()
    assert (row["drop_reason"], row["drop_stage"], row["sha256"]) == ("img2dataset_x", "read", None)


def test_documents_drop_bad_images_and_empty_documents():
    good = _encode(_texture(400, 300))
    docs = [
        {"key": "d0", "source": "m", "shard": "0", "text_list": ["a", "b"], "quarantined": False,
         "image_info": [{"image_name": "x.jpg", "image": good, "matched_text_index": 0},
                        {"image_name": "y.jpg", "image": b"broken", "matched_text_index": 1}]},
        {"key": "d1", "source": "m", "shard": "0", "text_list": ["a"], "quarantined": False,
         "image_info": [{"image_name": "z.jpg", "image": b"", "matched_text_index": 0}]},
    ]
    out = NormalizeStage()(make_table(docs, DOCUMENT_SCHEMA)).to_pylist()
    imgs = out[0]["image_info"]
    assert out[0]["drop_reason"] is None
    assert imgs[0]["drop_reason"] is None and imgs[0]["sha256"] == hashlib.sha256(good).hexdigest()
    assert imgs[1]["drop_reason"].startswith("image_undecodable")
    assert out[1]["drop_reason"] == "no_usable_images" and out[1]["drop_stage"] == "normalize"


def test_image_column_is_passed_through_unless_an_image_was_reencoded():
    """Rebuilding the image column copies every image's bytes: normalize keeps the column it got unless it
    re-encoded a row (then only that row's bytes change)."""
    jpeg, png = _encode(_texture(320, 240)), _encode(_texture(320, 240), "PNG")
    batch = _pairs([jpeg, png, b"junk"])
    out = NormalizeStage()(batch)
    assert out.column("image").chunk(0).buffers()[2].address == batch.column("image").chunk(0).buffers()[2].address
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(_texture(320, 240), exif=exif.tobytes())
    images = NormalizeStage()(_pairs([jpeg, rotated])).column("image").to_pylist()
    assert images[0] == jpeg and images[1] != rotated and Image.open(io.BytesIO(images[1])).size == (240, 320)


def test_dedup_thumbnail_comes_from_normalizes_own_decode():
    from vila2_curate.curation.dedup.stage import DedupStage
    from vila2_curate.curation.dedup.thumbnails import THUMB_BYTES, thumbnail, thumbnail_of_decoded

    big, small = _encode(_texture(1280, 720, 1)), _encode(_texture(500, 260, 2))
    stage = NormalizeStage(NormalizeConfig())
    stage.thumbnails_follow = True
    out = stage(_pairs([big, small])).to_pylist()
    drafted = Image.open(io.BytesIO(big))
    drafted.draft("RGB", (128, 128))  # normalize's pHash decode: 320x180, long side past the work size
    drafted.load()
    assert out[0]["thumb"] == thumbnail_of_decoded(drafted) and len(out[0]["thumb"]) == THUMB_BYTES
    assert out[0]["thumb"] != thumbnail(big)  # not the dedup stage's own (half-scale) decode
    assert out[1]["thumb"] is None  # drafted to 250x130, under the work size: dedup decodes the bytes itself
    assert [r["thumb"] for r in _run([big])] == [None]  # no dedup follows: no thumbnail work

    sigs = DedupStage().signatures(make_table(out, PAIR_SCHEMA)).column("thumb").to_pylist()
    assert sigs == [out[0]["thumb"], thumbnail(small)]


def test_planner_asks_normalize_for_thumbnails_only_when_dedup_confirms_with_them():
    from vila2_curate.pipelines.engine.plan import build_plan
    from vila2_curate.schemas.config import DedupConfig, RunConfig

    def normalize_of(dedup: DedupConfig) -> NormalizeStage:
        cfg = RunConfig.model_validate({"sources": [{"name": "s", "kind": "coyo_parquet", "paths": ["in"]}],
                                        "output": {"path": "out"},
                                        "stages": [NormalizeConfig(), dedup]})
        return build_plan(cfg).segments[0].maps[0]

    assert normalize_of(DedupConfig()).thumbnails_follow
    assert not normalize_of(DedupConfig(phash_confirm="none")).thumbnails_follow
    assert not normalize_of(DedupConfig(methods=["exact"])).thumbnails_follow
