"""Dedup keepers that survive: publishable first, then the larger image, the better CLIP score, the id."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vila2_curate.curation.decisions import index_decisions
from vila2_curate.curation.dedup import DedupStage
from vila2_curate.curation.dedup.keeper import keeper_sort_columns, keeper_sort_key
from vila2_curate.curation.normalize import phash_u64
from vila2_curate.pipelines.demo.dedup_eval import write_dedup_eval
from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.validate import read_vila_samples, validate_output
from vila2_curate.schemas.config import DedupConfig, load_config
from vila2_curate.schemas.rows import PAIR_SCHEMA, make_table


def _picture(seed: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 255, size=(9, 12, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_keeper_order():
    best = keeper_sort_key(True, 100, 0.1, "s/z/-1")
    assert best < keeper_sort_key(False, 10_000, 0.9, "s/a/-1")  # publishable beats everything
    assert keeper_sort_key(True, 200, 0.1, "s/z/-1") < keeper_sort_key(True, 100, 0.9, "s/a/-1")  # pixels
    assert keeper_sort_key(True, 100, 0.5, "s/z/-1") < best  # then CLIP score
    assert best < keeper_sort_key(True, 100, None, "s/a/-1")  # a missing score is the worst score
    assert best < keeper_sort_key(True, 100, float("nan"), "s/a/-1")
    assert keeper_sort_key(True, 100, 0.1, "s/a/-1") < best  # then the smallest id


def test_keeper_sort_columns_order_as_the_key() -> None:
    """The vectorised keys the partitioned combine sorts by give the order of ``keeper_sort_key``."""
    rng = np.random.default_rng(3)
    n = 400
    publishable = [None if r < 0.1 else bool(r < 0.6) for r in rng.random(n)]
    pixels = [None if r < 0.1 else int(v) for r, v in zip(rng.random(n), rng.integers(1, 4, n) * 100, strict=True)]
    scores = [None if r < 0.1 else float("nan") if r < 0.2 else float(np.float32(v))
              for r, v in zip(rng.random(n), rng.integers(0, 4, n) / 4, strict=True)]
    ids = [f"s{rng.integers(0, 3)}/k{i:04d}/-1" for i in rng.permutation(n)]
    rank = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    cols = keeper_sort_columns(pa.array(publishable, pa.bool_()), pa.array(pixels, pa.int64()),
                               pa.array(scores, pa.float32()), rank)
    by_columns = np.lexsort(cols[::-1]).tolist()
    by_key = sorted(range(n), key=lambda i: keeper_sort_key(publishable[i], pixels[i], scores[i], ids[i]))
    assert by_columns == by_key



def _rows(specs: list[tuple[str, str, Image.Image, str | None]]) -> pa.Table:
    rows = []
    for key, text, img, url in specs:
        data = _jpeg(img)
        rows.append({"key": key, "source": "s", "shard": "0", "url": url, "text": text, "image": data,
                     "image_format": "jpg", "phash": phash_u64(img), "width": img.width,
                     "height": img.height, "sha256": str(hash(data))})
    return make_table(rows, PAIR_SCHEMA)


def _decisions(table: pa.Table) -> dict[str, str | None]:
    """key -> drop reason (None: kept) for every grouped pair row."""
    stage = DedupStage(DedupConfig())
    return {k: v[-1][0] for (_, k), v in index_decisions(stage.decide(stage.signatures(table))).items()}


def test_keeper_is_publishable_then_largest():
    pic, other = _picture(1), _picture(2)
    half = pic.resize((300, 225), Image.Resampling.LANCZOS)
    table = _rows([
        ("a", "   ", pic, "http://x/a"),  # smallest id, blank caption: the writer would refuse it
        ("b", "a red photo", half, "http://x/b"),  # publishable, smaller
        ("c", "a red photo", pic, "http://x/c"),  # publishable, largest: the keeper
        ("d", "no url", pic, None),  # largest too, but no url
        ("e", "", other, "http://x/e"),  # alone: no group, no decision
    ])
    d = _decisions(table)
    assert d["c"] is None and "e" not in d
    assert {k for k, why in d.items() if why} == {"a", "b", "d"}
    assert all(why.endswith("of s/c/-1") for why in d.values() if why)


def test_no_publishable_member_keeps_the_smallest_id():
    pic = _picture(3)
    d = _decisions(_rows([("b", "", pic, "http://x/b"), ("a", "", pic, "http://x/a")]))
    assert d["a"] is None and d["b"] == "duplicate_exact: of s/a/-1"


def test_run_publishes_the_picture_whose_smallest_id_has_no_caption(tmp_path: Path):
    """The whole local run: the empty-caption copy is the smallest id, the captioned copy is published."""
    pic = _picture(4)
    resized = pic.resize((320, 240), Image.Resampling.LANCZOS)
    table = pa.table({"id": ["k1", "k2", "k3"], "url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"],
                      "text": ["", "a picture with a caption", "another picture"],
                      "image": [_jpeg(pic), _jpeg(resized, 70), _jpeg(_picture(5))]})
    (tmp_path / "coyo").mkdir()
    pq.write_table(table, tmp_path / "coyo" / "part-0.parquet")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{tmp_path}/coyo/*.parquet'], "
                   f"image_column: image}}]\noutput: {{path: '{tmp_path}/out'}}\n"
                   "stages: [{type: normalize}, {type: dedup}]\n")
    stats = run_local(load_config(cfg), progress=False)
    assert stats["balanced"] and stats["total"]["kept"] == 2 and stats["total"]["quarantined"] == 0
    assert validate_output(str(tmp_path / "out")) == []
    published = {s[".json"]["url"]: s[".txt"] for s in read_vila_samples(str(tmp_path / "out"))}
    assert published == {"http://a/2.jpg": "a picture with a caption", "http://a/3.jpg": "another picture"}
    reasons = json.dumps(stats["total"]["reasons"])
    assert "dedup:duplicate_phash" in reasons and "unpublishable" not in reasons


def test_run_on_the_evaluation_set_loses_no_picture(tmp_path: Path):
    """Every picture's original (its smallest id) has an empty caption: each picture is still published,
    by a captioned copy, and no published sample carries an empty caption."""
    truth_dir = tmp_path / "eval"
    ev = write_dedup_eval(str(truth_dir), seed=1, families=4, blank_first_caption=True)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{truth_dir}/coyo/*.parquet'], "
                   f"image_column: image}}]\noutput: {{path: '{tmp_path}/out'}}\n"
                   "stages: [{type: normalize}, {type: dedup}]\n")
    stats = run_local(load_config(cfg), progress=False)
    assert stats["balanced"] and stats["total"]["quarantined"] == 0, stats["total"]
    samples = list(read_vila_samples(str(tmp_path / "out")))
    published = {s[".json"]["url"].rsplit("/", 1)[1].split(".")[0] for s in samples}
    picture_of = {it.id: it.picture for it in ev.items}
    assert {picture_of[i] for i in published} == {it.picture for it in ev.items}
    assert all(s[".txt"].strip() for s in samples)
    assert not any(it.transform == "original" and it.id in published for it in ev.items)
