"""The img2dataset source: webdataset tar shards with their parquet and ``_stats.json``, as

``img2dataset --output_format webdataset --resize_mode no --skip_reencode True
--save_additional_columns '["similarity","NSFW","LICENSE"]' --caption_col TEXT`` writes them.

Details reproduced (img2dataset ``writer.py``/``downloader.py``/``logger.py``, webdataset ``TarWriter``):

- tar members are written like ``webdataset.TarWriter``: ``tarfile`` stream mode ``"w|"`` in the default
  (PAX) format, extensions in sorted order (``jpg``, ``json``, ``txt``), mode 0o444, user/group
  ``bigdata``; img2dataset leaves ``mtime`` at ``time.time()``, a float, so every member is preceded by a
  pax extended header holding the exact mtime (we use fixed floats to stay byte-deterministic).
- keys are ``compute_key``: ``10**oom_sample_per_shard * shard_id + index`` zero-padded to
  ``oom_sample_per_shard + oom_shard_count`` digits (4 + 5 = 9 with 10000 samples per shard).
- the parquet holds every row (failures too); its schema is the input columns in the order
  ``save_additional_columns + [caption, url]``, then ``key, status, error_message, width, height,
  original_width, original_height`` (+ ``exif`` with extract_exif, + ``sha256`` with compute_hash);
  failed rows have null width/height/exif/sha256. Rows are in download-completion order (not sorted).
- the tar ``.json`` is ``json.dumps(meta, indent=4)`` of the same row (it repeats ``caption``), the
  ``.txt`` is the caption; failed rows are only in the parquet.
- ``_stats.json``: count, successes, failed_to_download, failed_to_resize, duration, start_time,
  end_time, status_dict (a counter of "success" and of each error message).

"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vila2_curate.pipelines.demo.items import SampleItem
from vila2_curate.pipelines.demo.ledger import GroundTruthLedger, sha256_hex
from vila2_curate.pipelines.demo.pictures import PictureGenerator, encode_jpeg

_LAION_LICENSES = ("?", "?", "?", "cc-by", "cc-by-sa")
DOWNLOAD_ERRORS = (
    "HTTP Error 404: Not Found",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "HTTP Error 403: Forbidden",
)


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema, row_group_size: int) -> None:
    """Like img2dataset's BufferedParquetWriter: one ParquetWriter, a row group per buffer of rows (the
    COYO parts are written the same way)."""
    with pq.ParquetWriter(str(path), schema) as writer:
        for i in range(0, max(len(rows), 1), row_group_size):
            chunk = rows[i:i + row_group_size]
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


def _write_wds_tar(path: Path, samples: list[tuple[str, dict[str, bytes], float]]) -> None:
    """Byte-for-byte what ``webdataset.TarWriter(fileobj).write`` produces (with a given float mtime)."""
    with path.open("wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for key, fields, mtime in samples:
            for ext in sorted(fields):
                data = fields[ext]
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), mtime, 0o444, "bigdata", "bigdata"
                tar.addfile(ti, io.BytesIO(data))


def _failed_row(it: SampleItem, failure: str) -> SampleItem:
    """The ground-truth view of a row img2dataset could not fetch: no bytes, no size."""
    out = it.copy()
    out.kind = out.expected = failure.split(":", 1)[0]
    out.data, out.width, out.height = None, None, None
    out.notes = failure.split(":", 1)[1]
    return out


def write_img2dataset(out: Path, seed: int, g: PictureGenerator, ledger: GroundTruthLedger,
                      shards: list[list[tuple[SampleItem, str | None]]]) -> None:
    """``shards[i]`` lists (item, failure) with failure None, "failed_to_download:<msg>" or
    "failed_to_resize:<msg>"; index order is the input order, rows are written shuffled."""
    folder = out / "img2dataset"
    folder.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([
        ("similarity", pa.float64()), ("NSFW", pa.string()), ("LICENSE", pa.string()),
        ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
        ("sha256", pa.string()),
    ])
    for shard_id, rows in enumerate(shards):
        name = f"{shard_id:05d}"
        order = [int(i) for i in g.rng.permutation(len(rows))]  # imap_unordered completion order
        start = 1_700_000_000.0 + 3600.0 * shard_id + seed
        metas, samples, status = [], [], Counter()
        counts = Counter()
        for n, idx in enumerate(order):
            it, failure = rows[idx]
            ledger.settle_caption(it)
            original = it.data or b""
            if failure is None and it.fmt != "jpg":
                # --skip_reencode keeps JPEG bytes only: anything else is re-encoded (cv2, quality 95),
                # while the json sha256 stays the hash of the downloaded original.
                it = it.copy()
                it.data, it.fmt = encode_jpeg(Image.open(io.BytesIO(original)), 95), "jpg"
                it.notes = (it.notes + "; " if it.notes else "") + "re-encoded PNG -> JPEG by img2dataset"
            key = f"{10**4 * shard_id + idx:09d}"  # compute_key(idx, shard_id, 4, 5)
            if it.kind == "dotted_key":
                key = f"{key}.v2"
            url_hash = sha256_hex(it.caption.encode())[:10]
            url = f"https://img.example-{idx % 7}.com/{shard_id}/{idx}/{url_hash}.jpg"
            meta: dict[str, Any] = {
                "similarity": round(float(g.rng.uniform(0.28, 0.4)), 6),
                "NSFW": g.choice(("UNLIKELY", "UNLIKELY", "UNLIKELY", "UNSURE")),
                "LICENSE": g.choice(_LAION_LICENSES), "caption": it.caption, "url": url,
                "key": key, "status": None, "error_message": None, "width": None, "height": None,
                "original_width": None, "original_height": None, "exif": None, "sha256": None,
            }
            if failure is not None:
                st, msg = failure.split(":", 1)
                meta["status"], meta["error_message"] = st, msg
                status[msg] += 1
                counts[st] += 1
            else:
                w, h = (it.width or 0), (it.height or 0)
                meta.update(status="success", width=w, height=h, original_width=w, original_height=h,
                            exif="{}", sha256=sha256_hex(original))
                status["success"] += 1
                counts["success"] += 1
                txt: bytes = it.caption_bytes if it.caption_bytes is not None else it.caption.encode()
                samples.append((key, {"jpg": it.data or b"", "json": json.dumps(meta, indent=4).encode(),
                                      "txt": txt}, start + 0.25 + 0.0137 * n))
            metas.append(meta)
            ledger.record("img2dataset", f"img2dataset/{name}.tar" if failure is None
                          else f"img2dataset/{name}.parquet", key,
                          it if failure is None else _failed_row(it, failure),
                          url=url, shard=name,
                          source_sha256=sha256_hex(original) if failure is None else None)
        _write_wds_tar(folder / f"{name}.tar", samples)
        write_parquet(folder / f"{name}.parquet", metas, schema, row_group_size=100)
        stats = {
            "count": len(rows), "successes": counts["success"],
            "failed_to_download": counts["failed_to_download"],
            "failed_to_resize": counts["failed_to_resize"],
            "duration": 12.5 + shard_id, "start_time": start, "end_time": start + 12.5 + shard_id,
            "status_dict": dict(status),
        }
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
