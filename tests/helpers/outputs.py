"""Editing a written output by hand for the validate tests: build and rewrite tars, find a tar's samples, and
resync wids-meta.json / manifest.parquet so only the planted defect is left to find."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import fsspec

from tests.helpers.rows import image_bytes
from vila2_curate.pipelines.io.writers.atomic import OutputFile
from vila2_curate.pipelines.io.writers.records import manifest_row, write_manifest, write_wids_meta
from vila2_curate.pipelines.validate import scan_tar, vila_groups

FS = fsspec.filesystem("file")


def _output_file(root: Path, rel: str) -> OutputFile:
    data = (root / rel).read_bytes()
    if rel.endswith(".tar"):
        with open(root / rel, "rb") as f:
            n = len(vila_groups([m.name for m in scan_tar(f).members]))
    elif rel.endswith(".json"):  # a sidecar: one entry per url
        n = len(json.loads(data))
    else:
        n = len(pickle.loads(data))
    return OutputFile(rel, n, len(data), hashlib.sha256(data).hexdigest())


def refresh_records(root: Path) -> None:
    """Rewrite wids-meta.json and manifest.parquet from the files as they are now."""
    tars = sorted(str(p.relative_to(root)) for p in root.rglob("*.tar"))
    pkls = sorted(str(p.relative_to(root)) for p in root.rglob("*.pkl"))
    write_wids_meta(FS, str(root), "test", [_output_file(root, t) for t in tars])
    nested = [_output_file(root, t) for t in tars if t.startswith("coyo/")]
    write_wids_meta(FS, str(root / "coyo"), "test-coyo",
                    [OutputFile(f.relpath[len("coyo/"):], f.nsamples, f.bytes, f.sha256) for f in nested])
    rows = [manifest_row(_output_file(root, r), kind="wds" if r.endswith(".tar") else "mmc4", source="s",
                         input_shards=["00000"], config_hash="c", stage_versions={"normalize": "1"})
            for r in tars + pkls]
    write_manifest(FS, str(root), rows)


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def sample(key: str, ext: str = "jpg", txt: bytes = b"a caption", url: str | None = "https://x/1") -> list:
    meta = json.dumps({"url": url} if url is not None else {}).encode()
    return [(f"{key}.{ext}", image_bytes("JPEG")), (f"{key}.txt", txt), (f"{key}.json", meta)]


def replace_tar(root: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> None:
    (root / "coyo/00000_0000.tar").write_bytes(tar_bytes(members, fmt))
    refresh_records(root)


def assert_reports(problems: list[str], *needles: str) -> None:
    for needle in needles:
        assert any(needle in p for p in problems), f"{needle!r} not in {problems}"


def resync(root: Path) -> None:
    """After editing files by hand: wids-meta entries and manifest rows describe the files as they are now
    (rows of deleted files removed), so only the corruption under test remains."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for meta_path in root.rglob("wids-meta.json"):
        meta = json.loads(meta_path.read_text())
        for e in meta["shardlist"]:
            f = _output_file(meta_path.parent, e["url"])
            e["filesize"], e["nsamples"] = f.bytes, f.nsamples
        meta_path.write_text(json.dumps(meta))
    table = pq.read_table(root / "manifest.parquet")
    rows = []
    for r in table.to_pylist():
        if not (root / r["shard"]).exists():
            continue
        f = _output_file(root, r["shard"])
        r.update(bytes=f.bytes, sha256=f.sha256, nsamples=f.nsamples)
        rows.append(r)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "manifest.parquet")


def rewrite_tar(path: Path, edit, fmt: int = tarfile.USTAR_FORMAT) -> None:
    """Rewrite a tar member by member through ``edit(name, data) -> [(name, data), ...]``."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = []
    for name, data in members:
        out.extend(edit(name, data))
    path.write_bytes(tar_bytes(out, fmt))


def first_tar(root: Path, source: str = "coyo_bytes") -> Path:
    return sorted((root / source).glob("*.tar"))[0]


def sample_urls(tar_path: Path) -> dict[str, str]:
    with tarfile.open(tar_path) as tar:
        return {m.name.split(".")[0]: json.loads(tar.extractfile(m).read())["url"]
                for m in tar.getmembers() if m.name.endswith(".json")}
