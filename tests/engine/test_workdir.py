"""Intermediate rows without image bytes: what a segment saves, and the join with the re-read input."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from vila2_curate.pipelines.engine.workdir import (
    InputChangedError,
    rejoin_input,
    restore_from_input,
    slim_for_work,
    work_schema,
)
from vila2_curate.schemas.rows import DOCUMENT_SCHEMA, PAIR_SCHEMA, make_table


def _pairs() -> pa.Table:
    """As the reader gives them (input) and after normalize + a decision (mapped)."""
    base = [{"key": f"k{i}", "source": "s", "shard": "0", "url": f"http://x/{i}", "text": f"caption {i}",
             "image": f"bytes-{i}".encode(), "meta": json.dumps({"col": i})} for i in range(5)]
    return make_table(base, PAIR_SCHEMA)


def _mapped(inp: pa.Table) -> pa.Table:
    rows = inp.to_pylist()
    rows[1].update(image=b"rotated-1", meta=json.dumps({"col": 1, "reencoded": "exif_orientation_6"}))
    rows[2].update(drop_reason="dedup: duplicate of k0", drop_stage="dedup")
    rows[3].update(drop_reason="image_undecodable", drop_stage="normalize", quarantined=True)
    for r in rows:
        r.update(sha256="ab" * 32, phash=7, thumb=b"t" * 8, width=300, height=200)
    return make_table(rows, PAIR_SCHEMA)


def test_pair_rows_keep_no_input_bytes_and_join_back_exactly():
    inp = _pairs()
    mapped = _mapped(inp)
    saved = slim_for_work(mapped)
    assert saved.schema.names == work_schema(PAIR_SCHEMA).names
    assert not {"url", "source_key"} & set(saved.column_names)
    # bytes only where normalize changed the image; its metadata kept with it
    assert saved.column("image").to_pylist() == [None, b"rotated-1", None, None, None]
    assert saved.column("meta").to_pylist()[1] == mapped.column("meta")[1].as_py()
    back = restore_from_input(saved, inp, PAIR_SCHEMA)
    assert back.schema == PAIR_SCHEMA
    expected = mapped.to_pylist()
    expected[2]["image"] = None  # a row dropped by a decision gets no image back (nothing needs it)
    for row in expected:  # dedup's signatures hold the thumbnails: not saved twice
        row["thumb"] = None
    assert back.to_pylist() == expected
    assert back.column("image")[3].as_py() == b"bytes-3"  # quarantined rows keep theirs for quarantine/


def test_rejoin_aligns_batches_of_any_size():
    inp = _pairs()
    saved = slim_for_work(_mapped(inp))
    work = [saved.slice(0, 3), saved.slice(3)]
    source = [inp.slice(0, 1), inp.slice(1, 1), inp.slice(2)]
    joined = pa.concat_tables(rejoin_input(iter(work), source, PAIR_SCHEMA))
    assert joined.column("url").to_pylist() == inp.column("url").to_pylist()
    assert [b.num_rows for b in rejoin_input(iter(work), source, PAIR_SCHEMA)] == [3, 2]


@pytest.mark.parametrize("change", ["fewer", "more", "other_keys"])
def test_changed_input_shard_is_an_error_not_a_wrong_join(change: str):
    inp = _pairs()
    saved = slim_for_work(_mapped(inp))
    if change == "fewer":
        source = [inp.slice(0, 4)]
    elif change == "more":
        source = [inp, inp.slice(0, 1)]
    else:
        source = [inp.set_column(0, "key", pa.array([f"z{i}" for i in range(5)]))]
    with pytest.raises(InputChangedError):
        list(rejoin_input(iter([saved]), source, PAIR_SCHEMA))


def test_document_images_keep_bytes_only_where_normalize_changed_them():
    images = [{"image_name": "a.jpg", "image": b"A", "meta": "{}"},
              {"image_name": "b.jpg", "image": b"B", "meta": None}]
    inp = make_table([{"key": "d0", "source": "m", "shard": "0", "url": "u", "text_list": ["one", "two"],
                       "image_info": images, "similarity_matrix": [[0.1, 0.2], [0.3, 0.4]]}], DOCUMENT_SCHEMA)
    rows = inp.to_pylist()
    rows[0]["image_info"][1].update(image=b"B-reencoded", meta=json.dumps({"reencoded": "format_gif"}))
    mapped = make_table(rows, DOCUMENT_SCHEMA)
    saved = slim_for_work(mapped)
    assert "similarity_matrix" not in saved.column_names
    assert [im["image"] for im in saved.column("image_info")[0].as_py()] == [None, b"B-reencoded"]
    back = restore_from_input(saved, inp, DOCUMENT_SCHEMA)
    assert back.to_pylist() == mapped.to_pylist()
