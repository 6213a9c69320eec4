"""Image references that come from data never reach beyond the source's root.

Each hostile reference is quarantined with ``image_path_unsafe`` and its target is never read: a whole
run with ``keep_quarantine_payloads`` leaves no byte of the outside files anywhere in its output.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vila2_curate.pipelines.executors.local import run_local
from vila2_curate.pipelines.io.readers import make_reader
from vila2_curate.pipelines.io.readers.refs import ImageRoot, UnsafeRef
from vila2_curate.schemas.config import SourceConfig, load_config

SECRET = b"TOPSECRET-credentials-h3-" + b"x" * 64


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((320, 240)).save(buf, format="JPEG")
    return buf.getvalue()


def read_rows(source: SourceConfig, batch_size: int = 4) -> list[dict[str, Any]]:
    reader = make_reader(source)
    return [r for shard in reader.list_shards() for t in reader.read(shard, batch_size) for r in t.to_pylist()]


@pytest.fixture()
def hostile_tree(tmp_path: Path) -> Path:
    """images/ with good files and links out of it; secret.txt and outside/ beside it."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.jpg").write_bytes(SECRET)
    img = tmp_path / "images"
    (img / "sub").mkdir(parents=True)
    (img / "sub" / "0.jpg").write_bytes(jpeg(0))
    (img / "1.jpg").write_bytes(jpeg(1))
    os.symlink(tmp_path / "secret.txt", img / "link.jpg")  # file link leading out
    os.symlink(tmp_path / "outside", img / "dirlink")  # folder link leading out
    os.symlink("/etc/passwd", img / "passwd.jpg")
    os.symlink(img / "1.jpg", img / "inside-link.jpg")  # a link that stays inside is fine
    return tmp_path


# hostile reference -> why it must be refused
HOSTILE = {
    "/etc/passwd": "absolute path outside the root",
    "file:///etc/passwd": "file scheme",
    "../../../../etc/passwd": "'..' escape",
    "sub/../../secret.txt": "'..' escape inside a path",
    "..\\secret.txt": "backslash '..' escape",
    "link.jpg": "symlink to a file outside",
    "dirlink/x.jpg": "symlink to a folder outside",
    "passwd.jpg": "symlink to /etc/passwd",
    "s3://other-bucket/secret.jpg": "another bucket",
    "simplecache::file:///etc/passwd": "fsspec chained URL",
    "~/.ssh/id_rsa": "home directory",
    "sub/0.jpg\x00.png": "NUL byte",
    "http://169.254.169.254/latest/meta-data/": "cloud metadata without fetch_remote",
    "ftp://example.com/x.jpg": "other scheme",
    "zip://secret.txt::file:///tmp/x.zip": "archive chain",
}


def test_hostile_references_are_quarantined_and_never_read(hostile_tree: Path) -> None:
    good = ["sub/0.jpg", "1.jpg", "inside-link.jpg", str(hostile_tree / "images" / "1.jpg")]
    refs = good + list(HOSTILE)
    pq.write_table(pa.table({"id": list(range(len(refs))), "url": [f"http://a/{i}" for i in range(len(refs))],
                             "text": ["t"] * len(refs), "image_path": refs}), hostile_tree / "part-0.parquet")
    src = SourceConfig(name="coyo", kind="coyo_parquet", paths=[str(hostile_tree / "part-0.parquet")],
                       image_path_column="image_path", image_root=str(hostile_tree / "images"))
    rows = read_rows(src)
    assert len(rows) == len(refs)
    for r, ref in zip(rows, refs, strict=True):
        if ref in good:
            assert r["drop_reason"] is None and r["image"] in (jpeg(0), jpeg(1)), ref
        else:
            assert (r["drop_reason"], r["quarantined"], r["image"]) == ("image_path_unsafe", True, None), ref
            assert json.loads(r["meta"])["unsafe_ref"], ref  # says why


def test_default_root_is_the_parquet_folder(hostile_tree: Path) -> None:
    (hostile_tree / "data").mkdir()
    (hostile_tree / "data" / "a.jpg").write_bytes(jpeg(2))
    pq.write_table(pa.table({"id": [0, 1], "url": ["u0", "u1"], "text": ["t", "t"],
                             "image_path": ["a.jpg", "../secret.txt"]}), hostile_tree / "data" / "p.parquet")
    rows = read_rows(SourceConfig(name="c", kind="coyo_parquet", paths=[str(hostile_tree / "data" / "p.parquet")],
                                  image_path_column="image_path"))
    assert rows[0]["image"] == jpeg(2) and rows[1]["drop_reason"] == "image_path_unsafe"


def test_object_store_root_refuses_other_buckets() -> None:
    base = f"memory://bucket-{uuid.uuid4().hex[:8]}"
    other = f"memory://other-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{base}/imgs/0.jpg", jpeg(0))
    fs.pipe(f"{other}/secret.jpg", SECRET)
    buf = io.BytesIO()
    refs = ["0.jpg", f"{base}/imgs/0.jpg", f"{other}/secret.jpg", f"{base}/imgs/../../{other[9:]}/secret.jpg",
            "/" + other[9:] + "/secret.jpg", f"s3://{other[9:]}/secret.jpg"]
    pq.write_table(pa.table({"id": list(range(len(refs))), "url": ["u"] * len(refs), "text": ["t"] * len(refs),
                             "image_path": refs}), buf)
    fs.pipe(f"{base}/data/p.parquet", buf.getvalue())
    rows = read_rows(SourceConfig(name="c", kind="coyo_parquet", paths=[f"{base}/data/p.parquet"],
                                  image_path_column="image_path", image_root=f"{base}/imgs"))
    assert [r["image"] == jpeg(0) for r in rows] == [True, True, False, False, False, False]
    assert [r["drop_reason"] for r in rows[2:]] == ["image_path_unsafe"] * 4


def test_image_root_resolve_unit(tmp_path: Path) -> None:
    src = SourceConfig(name="c", kind="coyo_parquet", paths=["x"], image_path_column="p")
    root = ImageRoot.from_config(str(tmp_path), src, fallback=(None, ""))  # type: ignore[arg-type]
    assert root.resolve("a/b.jpg").path == str(tmp_path / "a" / "b.jpg")
    for ref in ("", "a/../../b", "/", "file:/etc/passwd", "c:/x", "a/\nb"):
        with pytest.raises(UnsafeRef):
            root.resolve(ref)
    fetching = src.model_copy(update={"fetch_remote": True, "fetch_schemes": ["https"]})
    root = ImageRoot.from_config(str(tmp_path), fetching, fallback=(None, ""))  # type: ignore[arg-type]
    assert root.resolve("https://img.example/a.jpg").url == "https://img.example/a.jpg"
    with pytest.raises(UnsafeRef, match="fetch_schemes"):
        root.resolve("http://img.example/a.jpg")
    http_root = ImageRoot.from_config("https://img.example/imgs", fetching, fallback=(None, ""))  # type: ignore[arg-type]
    assert http_root.resolve("%2e%2e/admin?x#y").url == "https://img.example/imgs/%252e%252e/admin%3Fx%23y"
    for ref in ("../admin", "/admin", "https://other.example/a.jpg".replace("https", "ftp")):
        with pytest.raises(UnsafeRef):
            http_root.resolve(ref)


def test_mmc4_image_name_symlink_out_of_folder_quarantines_the_document(hostile_tree: Path) -> None:
    img = hostile_tree / "images"
    docs = [
        {"url": "https://d/0", "text_list": ["s0", "s1"],
         "image_info": [{"image_name": "1.jpg", "matched_text_index": 0}]},
        {"url": "https://d/1", "text_list": ["s0"],
         "image_info": [{"image_name": "1.jpg", "matched_text_index": 0},
                        {"image_name": "link.jpg", "matched_text_index": 0}]},
        {"url": "https://d/2", "text_list": ["s0"], "image_info": [{"image_name": "/etc/passwd", "matched_text_index": 0}]},
    ]
    (hostile_tree / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    rows = read_rows(SourceConfig(name="m", kind="mmc4", paths=[str(hostile_tree / "docs.jsonl")], image_dir=str(img)))
    assert rows[0]["drop_reason"] is None and rows[0]["image_info"][0]["image"] == jpeg(1)
    assert rows[1]["quarantined"] and rows[1]["drop_reason"] == "image_path_unsafe"
    assert rows[1]["image_info"][1]["image"] is None and rows[1]["image_info"][1]["drop_reason"] == "image_path_unsafe"
    assert rows[2]["drop_reason"] == "image_path_unsafe"


def test_a_run_with_hostile_rows_writes_no_outside_bytes(hostile_tree: Path) -> None:
    """keep_quarantine_payloads is on (the default): quarantine/ must still hold nothing from outside."""
    passwd = Path("/etc/passwd").read_bytes()[:32]
    refs = ["sub/0.jpg", "1.jpg", *HOSTILE]
    (hostile_tree / "coyo").mkdir()
    pq.write_table(pa.table({"id": list(range(len(refs))), "url": [f"http://a/{i}.jpg" for i in range(len(refs))],
                             "text": [f"caption {i}" for i in range(len(refs))], "image_path": refs}),
                   hostile_tree / "coyo" / "part-0.parquet")
    out = hostile_tree / "out"
    cfg = hostile_tree / "run.yaml"
    cfg.write_text(f"sources: [{{name: c, kind: coyo_parquet, paths: ['{hostile_tree}/coyo/*.parquet'], "
                   f"image_path_column: image_path, image_root: '{hostile_tree}/images'}}]\n"
                   f"stages: [{{type: normalize, min_side: 100}}]\n"
                   f"output: {{path: '{out}', keep_quarantine_payloads: true}}\n")
    stats = run_local(load_config(cfg), progress=False)
    assert stats["balanced"] and stats["total"]["kept"] == 2
    assert stats["total"]["quarantined"] == len(HOSTILE)
    assert stats["total"]["reasons"] == {"read:image_path_unsafe": len(HOSTILE)}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("quarantine" in p.parts for p in files)
    for p in files:
        data = p.read_bytes()
        assert SECRET[:24] not in data and passwd not in data, p
