"""The COYO-700M source: parquet parts with the dataset card's columns plus the image, either as encoded
bytes (``image``, part 0) or as a path relative to ``coyo/`` (``image_path``, part 1, files in coyo/images/).

Scores are drawn in plausible ranges, lower CLIP similarity for boilerplate and broken rows, higher
watermark score for boilerplate; ``image_phash`` is the picture's real pHash where there is a picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from vila2_curate.pipelines.demo.img2dataset import write_parquet
from vila2_curate.pipelines.demo.items import SampleItem
from vila2_curate.pipelines.demo.ledger import GroundTruthLedger
from vila2_curate.pipelines.demo.pictures import PictureGenerator

_COYO_SCHEMA = pa.schema([
    ("id", pa.int64()), ("url", pa.string()), ("text", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("image_phash", pa.string()), ("text_length", pa.int32()),
    ("word_count", pa.int32()), ("num_tokens_bert", pa.int32()), ("num_tokens_gpt", pa.int32()),
    ("num_faces", pa.int32()), ("clip_similarity_vitb32", pa.float32()),
    ("clip_similarity_vitl14", pa.float32()), ("nsfw_score_opennsfw2", pa.float32()),
    ("nsfw_score_gantman", pa.float32()), ("watermark_score", pa.float32()),
    ("aesthetic_score_laion_v2", pa.float32()),
])


def write_coyo(out: Path, g: PictureGenerator, ledger: GroundTruthLedger, part: int, items: list[SampleItem],
               mode: str) -> None:
    """Write ``coyo/part-<part>.parquet`` holding ``items``, with images inline (``mode`` "bytes") or as
    files beside it ("paths"); every row is recorded in ``ledger``."""
    folder = out / "coyo"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    source = "coyo_bytes" if mode == "bytes" else "coyo_paths"
    fname = f"part-{part:05d}.parquet"
    cols: dict[str, list[Any]] = {k: [] for k in _COYO_SCHEMA.names}
    extra_col = "image" if mode == "bytes" else "image_path"
    cols[extra_col] = []
    for it in items:
        ledger.settle_caption(it)
        cid = int(g.rng.integers(10**12, 10**13))
        text = it.caption
        words = text.split()
        nw = len(words)
        low = it.boilerplate or it.kind in {"flat", "corrupt_bytes", "zero_bytes", "bomb", "missing_file"}
        meta_w = it.width if it.width is not None else g.randint(300, 800)
        meta_h = it.height if it.height is not None else g.randint(300, 800)
        row = {
            "id": cid, "url": f"https://cdn.shop-{cid % 13}.net/media/{cid}.jpg", "text": text,
            "width": meta_w, "height": meta_h,
            "image_phash": it.phash or f"{int(g.rng.integers(0, 2**63)):016x}",
            "text_length": len(text), "word_count": nw,
            "num_tokens_bert": nw + sum(ch in ",.:-!?'\"" for ch in text) + g.randint(0, 2),
            "num_tokens_gpt": nw + sum(ch in ",.:-!?'\"" for ch in text) + g.randint(0, 3),
            "num_faces": 0,
            "clip_similarity_vitb32": float(g.rng.uniform(0.2, 0.25) if low
                                            else g.rng.uniform(0.27, 0.38)),
            "clip_similarity_vitl14": float(g.rng.uniform(0.18, 0.23) if low
                                            else g.rng.uniform(0.24, 0.34)),
            "nsfw_score_opennsfw2": float(g.rng.uniform(0.0, 0.08)),
            "nsfw_score_gantman": float(g.rng.uniform(0.0, 0.12)),
            "watermark_score": float(g.rng.uniform(0.3, 0.6) if it.boilerplate
                                     else g.rng.uniform(0.0, 0.25)),
            "aesthetic_score_laion_v2": float(g.rng.uniform(3.8, 6.2)),
        }
        if mode == "bytes":
            row["image"] = it.data
        else:
            ext = "png" if it.fmt == "png" else "jpg"
            rel = f"images/{cid}.{ext}"
            row["image_path"] = rel
            if it.kind != "missing_file":
                (folder / rel).write_bytes(it.data or b"")
        for k, v in row.items():
            cols[k].append(v)
        ledger.record(source, f"coyo/{fname}", str(cid), it, coyo_id=cid,
                      image_path=row.get("image_path"), url=row["url"])
    fields = list(_COYO_SCHEMA) + [pa.field(extra_col, pa.binary() if mode == "bytes" else pa.string())]
    rows = [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]
    write_parquet(folder / fname, rows, pa.schema(fields), row_group_size=1000)
