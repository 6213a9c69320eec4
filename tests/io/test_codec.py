"""The row <-> sample json codec (pipelines/io/codec.py): the published ``<key>.json`` bytes are pinned,
and a row written and read back (by the codec alone, and through the tar writer and the vila_wds reader)
keeps every field the codec carries."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest

from vila2_curate.pipelines.io import codec
from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.pipelines.io.writers.wds import WdsShardWriter
from vila2_curate.schemas.config import CaptionPolicy, SourceConfig
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
       b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")
CARRIED = [f.name for f in codec.FIELDS if f.decode is not None]
FROM_TAR = ("key", "source", "shard")  # written for readers of the json; a read-back row takes them from the tar


def caption(rnd: int, text: str, **over: Any) -> dict[str, Any]:
    c = {"round": rnd, "model": "nvila-8b" if rnd else "original", "prompt_id": f"p{rnd}" if rnd else "",
         "params_hash": f"h{rnd}" if rnd else "", "text": text, "created_at": f"2024-01-0{rnd + 1}T00:00:00Z",
         "flags": []}
    c.update(over)
    return c


def full_row(i: int = 7) -> dict[str, Any]:
    """Every carried field set; specialists with boxes (one missing), models as sorted JSON text."""
    return {
        "key": f"k{i}", "source": "coyo", "shard": "00003", "source_key": f"{i}",
        "url": "https://example.com/ü.jpg", "image": PNG, "image_format": "png", "sha256": "ab" * 32,
        "phash": 2**64 - 2, "width": 640, "height": 480, "clip_score": 0.1, "clip_cosine": 1 / 3,
        "clip_model": "ViT-B-32", "text": "alt ✓",
        "captions": [caption(0, "alt ✓"), caption(1, "A cat.", flags=["truncated"])],
        "specialists": {"ocr": [{"text": "SALE", "box": [0.1, 0.2, 0.3, 0.4], "score": 0.9}], "ocr_text": "SALE",
                        "grounding": [{"label": "cat", "box": None, "score": None},
                                      {"label": "dog", "box": [0.0, 0.5, 1 / 3, 1.0], "score": 0.123456789}],
                        "grounding_text": None, "spatial": ["left of"], "spatial_text": None,
                        "models": '{"grounding": "gdino-t", "ocr": "rapidocr-1.3"}'},
        "delta_loss": 1.5, "logp_small": -10.25, "logp_large": -8.75, "flags": ["boilerplate_caption"],
        "meta": '{"aesthetic": 5.1, "num_faces": 0}',
    }


def bare_row(i: int = 8) -> dict[str, Any]:
    """Every nullable carried field None (phash 0 is a real hash, not a missing one); the lists empty."""
    return {"key": f"k{i}", "source": "coyo", "shard": "00003", "url": f"https://example.com/{i}.png",
            "image": PNG, "image_format": "png", "phash": 0, "text": "only alt text", "captions": [],
            "flags": []}


ROWS = [full_row(7), bare_row(8), {**full_row(9), "specialists": None, "captions": [], "phash": None}]


def arrow_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as a stage hands them over: through PAIR_SCHEMA (float32 columns, every column present)."""
    return make_table(rows, PAIR_SCHEMA).to_pylist()


def carried(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in (*CARRIED, "image", "image_format")}


def test_published_json_bytes_are_pinned() -> None:
    """The exact ``<key>.json`` a VILA consumer reads: float32 decimals, hex pHash, meta and models as
    objects, NaN as null, sorted keys, UTF-8. Any change here changes every published tar."""
    (row,) = arrow_rows([{**full_row(7), "delta_loss": float("nan"), "logp_large": None}])
    got = codec.sample_bytes(row, row["captions"][1]).decode("utf-8")
    assert got == (
        '{"captions": [{"created_at": "2024-01-01T00:00:00Z", "flags": [], "model": "original", "params_hash": '
        '"", "prompt_id": "", "round": 0, "text": "alt ✓"}, {"created_at": "2024-01-02T00:00:00Z", "flags": '
        '["truncated"], "model": "nvila-8b", "params_hash": "h1", "prompt_id": "p1", "round": 1, "text": '
        '"A cat."}], "clip_cosine": 0.33333334, "clip_model": "ViT-B-32", "clip_score": 0.1, "delta_loss": '
        'null, "flags": ["boilerplate_caption"], "height": 480, "key": "k7", "logp_large": null, '
        '"logp_small": -10.25, "meta": {"aesthetic": 5.1, "num_faces": 0}, "phash": "fffffffffffffffe", '
        '"sha256": "abababababababababababababababababababababababababababababababab", "shard": "00003", '
        '"source": "coyo", "source_key": "7", "specialists": {"grounding": [{"box": null, "label": "cat", '
        '"score": null}, {"box": [0.0, 0.5, 0.33333334, 1.0], "label": "dog", "score": 0.12345679}], '
        '"grounding_text": null, "models": {"grounding": "gdino-t", "ocr": "rapidocr-1.3"}, "ocr": [{"box": '
        '[0.1, 0.2, 0.3, 0.4], "score": 0.9, "text": "SALE"}], "ocr_text": "SALE", "spatial": ["left of"], '
        '"spatial_text": null}, "text": "alt ✓", "txt_source": {"model": "nvila-8b", "params_hash": "h1", '
        '"prompt_id": "p1", "round": 1}, "url": "https://example.com/ü.jpg", "width": 640}'
    )
    assert json.loads(codec.sample_bytes(row, None))["txt_source"] == {"round": 0, "model": "original"}


@pytest.mark.parametrize("row", arrow_rows(ROWS), ids=["full", "nulls", "no-specialists"])
def test_row_json_row_round_trip(row: dict[str, Any]) -> None:
    before = copy.deepcopy(row)
    files = {"png": row["image"], "json": codec.sample_bytes(row, None)}
    fields, problem = codec.row_fields(files)
    assert problem is None
    assert row == before  # encoding does not touch the row it is given
    (back,) = arrow_rows([fields])
    assert carried(back) == carried(row)
    assert back["phash"] == row["phash"]  # 0, 2**64 - 2 and None are three different things
    info = json.loads(files["json"])
    assert [info[k] for k in FROM_TAR] == [row[k] for k in FROM_TAR]


def test_round_trip_normalises_only_what_it_documents() -> None:
    """flags and captions None come back [], meta text and models as sorted JSON, None captions are not
    written; float columns come back as the same float32."""
    (row,) = arrow_rows([{**bare_row(), "flags": None, "meta": '{"b": 1,  "a": 2}', "captions": [None,
                          caption(0, "x")], "specialists": {"models": '{"z": 1, "a": 2}'}, "clip_score": 0.3}])
    fields, problem = codec.row_fields({"png": PNG, "json": codec.sample_bytes(row, None)})
    assert problem is None
    assert fields["flags"] == []
    assert fields["meta"] == '{"a": 2, "b": 1}'
    assert fields["specialists"]["models"] == '{"a": 2, "z": 1}'
    assert fields["captions"] == [caption(0, "x")]
    (none,) = arrow_rows([{**bare_row(), "captions": None}])
    assert codec.row_fields({"png": PNG, "json": codec.sample_bytes(none, None)})[0]["captions"] == []
    (back,) = arrow_rows([fields])
    assert back["clip_score"] == row["clip_score"]


@pytest.mark.parametrize(("info", "why", "has_fields"), [
    (b"{not json", "json_invalid: JSONDecodeError", False),
    (b"[1, 2]", "json_invalid: not an object", False),
    (b'{"captions": [1]}', "json_invalid: captions", False),
    (b'{"specialists": [1]}', "json_invalid: specialists/meta", False),
    (b'{"flags": "x", "meta": 3}', "json_invalid: specialists/meta", False),  # meta is checked before flags
    (b'{"flags": "x"}', "json_invalid: flags", False),
    (b'{"phash": "zz", "text": "kept"}', "json_invalid: phash", True),
])
def test_unusable_sample_json_gives_the_quarantine_reason(info: bytes, why: str, has_fields: bool) -> None:
    fields, problem = codec.row_fields({"jpg": PNG, "json": info})
    assert problem is not None and problem.startswith(why)
    assert bool(fields) == has_fields
    if has_fields:  # the quarantined row keeps everything that did decode
        assert fields["text"] == "kept" and "phash" not in fields and fields["image"] == PNG


def test_a_sample_without_an_image_member_is_missing_image() -> None:
    assert codec.row_fields({"json": b"{}", "txt": b"x", "gif": PNG}) == ({}, "missing_image")


def test_every_pair_column_is_carried_or_deliberately_left_out() -> None:
    """Adding a PAIR_SCHEMA column means deciding here whether samples publish it."""
    names = [f.name for f in codec.FIELDS]
    assert len(names) == len(set(names))
    assert set(names) | codec.FROM_MEMBERS | codec.NOT_PUBLISHED == set(PAIR_SCHEMA.names)
    assert not (set(names) & (codec.FROM_MEMBERS | codec.NOT_PUBLISHED))


def test_writer_and_reader_round_trip_through_tars(tmp_path: Path) -> None:
    rows = arrow_rows(ROWS)
    fs = fsspec.filesystem("file")
    w = WdsShardWriter(fs, str(tmp_path), "coyo/00000", max_samples=2, max_bytes=None,
                       caption_policy=CaptionPolicy(mode="latest"))
    assert w.write(make_table(rows, PAIR_SCHEMA)) == []
    files = w.close()
    (tmp_path / "wids-meta.json").write_text(json.dumps({"shardlist": [{"url": f.relpath} for f in files]}))
    reader = make_reader(SourceConfig(name="prev", kind="vila_wds", paths=[str(tmp_path)]))
    back = [r for s in reader.list_shards() for t in reader.read(s, 10) for r in t.to_pylist()]
    assert [r["key"] for r in back] == [r["key"] for r in rows]
    assert [r["quarantined"] for r in back] == [False] * len(rows)
    assert [carried(r) for r in back] == [carried(r) for r in rows]


@pytest.mark.parametrize("first", ["vila2_curate.pipelines.io.codec", "vila2_curate.pipelines.io.writers.wds",
                                   "vila2_curate.pipelines.io.readers.vila_wds"])
def test_codec_writer_and_reader_import_in_any_order(first: str) -> None:
    """codec imports readers._common and the readers package imports vila_wds, which imports codec."""
    code = f"import {first}; import vila2_curate.pipelines.io.readers, vila2_curate.pipelines.io.writers.wds"
    subprocess.run([sys.executable, "-c", code], check=True)
