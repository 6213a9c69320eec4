"""Check an output folder against the output contract, reading it the way VILA's trainer does.

``validate_output`` returns a list of problems (empty = valid) instead of raising, so a user sees every
problem of a run at once. Tars are indexed with the same raw-header walk as VILA's ``MMIndexedTar``
(llava/wids/wids_mmtar.py) and grouped with wids' ``os.path.splitext`` rule, so "valid" means "VILA sees
the samples we meant", not merely "Python's tarfile can open it".
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import pyarrow.parquet as pq
from PIL import Image

from pipelines.writers.atomic import is_temp_name
from pipelines.writers.mmc4 import VILA_MAX_IMAGES_PER_DOC
from pipelines.writers.records import MANIFEST, WIDS_KIND, WIDS_META, WIDS_VERSION
from schemas.records import MANIFEST_SCHEMA

IMAGE_EXTS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}  # member extension -> PIL format
SAMPLE_EXTS = {*IMAGE_EXTS, "txt", "json"}
_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4",
}
_COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4")
_RECORD_DIRS = ("rejects/", "quarantine/")  # parquet records, not shards
_MAX_PROBLEMS_PER_FILE = 25


# ---------------------------------------------------------------- tar reading, VILA style


@dataclass
class TarMember:
    name: str
    offset: int  # of the data
    size: int


@dataclass
class TarScan:
    members: list[TarMember] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _octal(field_bytes: bytes) -> int | None:
    if field_bytes[:1] and field_bytes[0] & 0x80:
        return None  # base-256: VILA's int(..., 8) cannot read it
    text = field_bytes.replace(b"\x00", b" ").strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _pax_keys(data: bytes) -> set[str]:
    keys = set()
    for line in data.split(b"\n"):
        _, _, rec = line.partition(b" ")
        k, sep, _ = rec.partition(b"=")
        if sep:
            keys.add(k.decode("utf-8", "replace"))
    return keys


def compression_of(head: bytes) -> str | None:
    for magic, name in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def scan_tar(f: IO[bytes]) -> TarScan:
    """Walk raw headers like ``MMIndexedTar._build_index``: the name field only, typeflag "0"/"" indexed."""
    scan = TarScan()
    offset = 0
    while True:
        f.seek(offset)
        hdr = f.read(512)
        if len(hdr) == 0:
            scan.problems.append("no end-of-archive marker")
            break
        if len(hdr) < 512:
            scan.problems.append(f"truncated header at byte {offset}")
            break
        if hdr == b"\x00" * 512:
            break
        stored = _octal(hdr[148:156])
        computed = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if stored != computed:
            scan.problems.append(f"bad header checksum at byte {offset} (not a plain tar?)")
            break
        raw_name = hdr[:100].split(b"\x00", 1)[0]
        typeflag = hdr[156:157]
        size = _octal(hdr[124:136])
        if size is None:
            scan.problems.append(f"member at byte {offset}: size not in octal (VILA cannot read it)")
            break
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            name = raw_name.decode("utf-8", "replace")
            scan.problems.append(f"member name {name!r} is not UTF-8")
        if typeflag in (b"x", b"g"):
            f.seek(offset + 512)
            keys = _pax_keys(f.read(size)) & {"path", "linkpath", "size"}
            if keys:
                scan.problems.append(
                    f"pax header sets {sorted(keys)}; VILA's reader ignores pax headers and would misread it"
                )
        elif typeflag not in (b"0", b"\x00"):
            scan.problems.append(f"member {name!r} is not a regular file (type {typeflag!r})")
        else:
            if hdr[345:500].strip(b"\x00"):
                scan.problems.append(f"member {name!r} uses the ustar prefix field, which VILA ignores")
            scan.members.append(TarMember(name, offset + 512, size))
        offset += 512 + (size + 511) // 512 * 512
    return scan


def _read(f: IO[bytes], m: TarMember) -> bytes:
    f.seek(m.offset)
    return f.read(m.size)


def vila_groups(names: list[str]) -> dict[str, list[int]]:
    """wids' ``group_by_key``: key = ``os.path.splitext(name)[0]``; order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        if "." not in n:
            continue
        groups.setdefault(posixpath.splitext(n)[0], []).append(i)
    return groups


def _decode_member(ext: str, data: bytes) -> Any:
    if ext == ".txt":
        return data.decode("utf-8")
    if ext == ".json":
        return json.loads(data)
    return data


def read_vila_samples(root: str, storage_options: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Yield samples as VILA's ``VILAWebDataset`` does: via wids-meta.json, splitext keys, ``.ext`` fields.

    Each sample has ``__key__``, ``__shard__`` (relative url), ``.txt`` (str), ``.json`` (dict) and the raw
    image bytes under its ``.jpg`` / ``.png`` / ``.webp`` field.
    """
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    base = base.rstrip("/")
    with fs.open(f"{base}/{WIDS_META}", "rb") as fh:
        meta = json.load(fh)
    for entry in meta["shardlist"]:
        url = entry["url"]
        with fs.open(posixpath.normpath(f"{base}/{url}"), "rb") as f:
            scan = scan_tar(f)
            names = [m.name for m in scan.members]
            for key, idxs in vila_groups(names).items():
                sample: dict[str, Any] = {"__key__": key, "__shard__": url}
                for i in idxs:
                    ext = posixpath.splitext(names[i])[1]
                    sample[ext] = _decode_member(ext, _read(f, scan.members[i]))
                yield sample


# ---------------------------------------------------------------- checks


def _check_image(data: bytes, ext: str) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
    except Exception as e:  # noqa: BLE001 - any decode failure is the finding
        return f"does not decode with PIL ({type(e).__name__}: {e})"
    want = IMAGE_EXTS.get(ext)
    if want and fmt != want:
        return f"is {fmt} data under a .{ext} name"
    return None


def _check_tar(fs: fsspec.AbstractFileSystem, path: str, rel: str, problems: list[str]) -> int | None:
    """Check one shard; returns the sample count VILA would index (None if unreadable)."""
    local: list[str] = []
    with fs.open(path, "rb") as f:
        head = f.read(6)
        comp = compression_of(head)
        if comp:
            problems.append(f"{rel}: compressed tar ({comp}); VILA's reader needs an uncompressed tar")
            return None
        scan = scan_tar(f)
        local.extend(scan.problems)
        names = [m.name for m in scan.members]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                local.append(f"duplicate member {n!r}")
            seen.add(n)
            if len(n.encode()) > 100:
                local.append(f"member name {n!r} is over 100 bytes")
            if "/" in n or ".." in n:
                local.append(f"member name {n!r} contains '/' or '..'")
            if n.count(".") != 1:
                local.append(f"member {n!r}: dotted key or missing extension (wids and webdataset disagree)")
        # webdataset groups consecutive members: a key must not reappear after another key.
        order: list[str] = []
        for n in names:
            k = n.split(".", 1)[0]
            if order and order[-1] == k:
                continue
            if k in order:
                local.append(f"sample {k!r} members are not contiguous")
            order.append(k)
        groups = vila_groups(names)
        for key, idxs in groups.items():
            exts = [posixpath.splitext(names[i])[1][1:] for i in idxs]
            if "jpeg" in exts:
                local.append(f"sample {key!r} has a .jpeg member; VILA only looks for .jpg/.png/.webp")
            unknown = sorted(set(exts) - SAMPLE_EXTS - {"jpeg"})
            if unknown:
                local.append(f"sample {key!r} has unexpected members {unknown}")
            images = [i for i in idxs if posixpath.splitext(names[i])[1][1:] in IMAGE_EXTS]
            if len(images) != 1:
                local.append(f"sample {key!r} has {len(images)} images (.jpg/.png/.webp); needs exactly 1")
            for i in images:
                err = _check_image(_read(f, scan.members[i]), posixpath.splitext(names[i])[1][1:])
                if err:
                    local.append(f"sample {key!r} image {err}")
            by_ext = {posixpath.splitext(names[i])[1]: scan.members[i] for i in idxs}
            if ".txt" not in by_ext:
                local.append(f"sample {key!r} has no .txt")
            else:
                try:
                    txt = _read(f, by_ext[".txt"]).decode("utf-8")
                    if not txt.strip():
                        local.append(f"sample {key!r} has an empty .txt caption")
                except UnicodeDecodeError:
                    local.append(f"sample {key!r} .txt is not UTF-8")
            if ".json" not in by_ext:
                local.append(f"sample {key!r} has no .json")
            else:
                try:
                    meta = json.loads(_read(f, by_ext[".json"]))
                    if not isinstance(meta, dict) or not isinstance(meta.get("url"), str) or not meta["url"]:
                        local.append(f"sample {key!r} .json has no \"url\" string")
                except ValueError:
                    local.append(f"sample {key!r} .json is not valid JSON")
    for msg in local[:_MAX_PROBLEMS_PER_FILE]:
        problems.append(f"{rel}: {msg}")
    if len(local) > _MAX_PROBLEMS_PER_FILE:
        problems.append(f"{rel}: ... and {len(local) - _MAX_PROBLEMS_PER_FILE} more problems")
    return len(groups)


class _NoClasses(pickle.Unpickler):
    """Our pkls hold only builtins; refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _check_pkl(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, max_images: int, problems: list[str]
) -> int | None:
    local: list[str] = []
    try:
        with fs.open(path, "rb") as f:
            docs = _NoClasses(f).load()
    except Exception as e:  # noqa: BLE001
        problems.append(f"{rel}: cannot unpickle ({type(e).__name__}: {e})")
        return None
    if not isinstance(docs, list):
        problems.append(f"{rel}: pickle holds {type(docs).__name__}, VILA expects a list of documents")
        return None
    for d, doc in enumerate(docs):
        if not isinstance(doc, dict):
            local.append(f"document {d} is not a dict")
            continue
        texts, infos, sim = doc.get("text_list"), doc.get("image_info"), doc.get("similarity_matrix")
        if not isinstance(texts, list) or not isinstance(infos, list) or not isinstance(sim, list):
            local.append(f"document {d}: text_list, image_info and similarity_matrix must be lists")
            continue
        if not infos:
            local.append(f"document {d} has no image (VILA's loader crashes on those)")
        if len(infos) > max_images:
            local.append(f"document {d} has {len(infos)} images, over the limit of {max_images}")
        if len(sim) != len(infos):
            local.append(f"document {d}: similarity_matrix has {len(sim)} rows for {len(infos)} images")
        for i, im in enumerate(infos):
            idx = im.get("matched_text_index") if isinstance(im, dict) else None
            if not isinstance(idx, int) or not 0 <= idx < len(texts):
                local.append(f"document {d} image {i}: matched_text_index {idx!r} outside text_list")
            try:
                raw = base64.b64decode(im["image_base64"], validate=True)
            except Exception:  # noqa: BLE001
                local.append(f"document {d} image {i}: image_base64 missing or not base64")
                continue
            err = _check_image(raw, "")
            if err:
                local.append(f"document {d} image {i} {err}")
    for msg in local[:_MAX_PROBLEMS_PER_FILE]:
        problems.append(f"{rel}: {msg}")
    if len(local) > _MAX_PROBLEMS_PER_FILE:
        problems.append(f"{rel}: ... and {len(local) - _MAX_PROBLEMS_PER_FILE} more problems")
    return len(docs)


def _sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_wids_meta(
    fs: fsspec.AbstractFileSystem, base: str, meta_rel: str, files: dict[str, int], tars: list[str],
    counts: dict[str, int | None], problems: list[str],
) -> None:
    """Check one wids-meta.json; its urls are relative to its own folder (wids rebases them there)."""
    folder = posixpath.dirname(meta_rel)
    try:
        with fs.open(f"{base}/{meta_rel}", "rb") as fh:
            meta = json.load(fh)
    except ValueError as e:
        problems.append(f"{meta_rel}: not valid JSON ({e})")
        return
    if not isinstance(meta, dict):
        problems.append(f"{meta_rel}: top level must be an object")
        return
    if meta.get("__kind__") != WIDS_KIND:
        problems.append(f"{meta_rel}: __kind__ is {meta.get('__kind__')!r}, expected {WIDS_KIND!r}")
    if meta.get("wids_version") != WIDS_VERSION:
        problems.append(f"{meta_rel}: wids_version is {meta.get('wids_version')!r}, expected {WIDS_VERSION}")
    if not meta.get("name"):
        problems.append(f"{meta_rel}: no name")
    shardlist = meta.get("shardlist")
    in_scope = [t for t in tars if not folder or t.startswith(folder + "/")]
    if not isinstance(shardlist, list) or (not shardlist and in_scope):
        problems.append(f"{meta_rel}: shardlist missing or empty (wids asserts at least one shard)")
        return
    urls = [e.get("url") if isinstance(e, dict) else None for e in shardlist]
    if urls != sorted(u for u in urls if isinstance(u, str)) or len(set(urls)) != len(urls):
        problems.append(f"{meta_rel}: shardlist is not sorted by url, has duplicates or entries without url")
    listed = set()
    for e in shardlist:
        if not isinstance(e, dict) or not isinstance(e.get("url"), str):
            continue
        url = e["url"]
        if url.startswith("/") or "://" in url or ".." in url.split("/"):
            problems.append(f"{meta_rel}: url {url!r} is not relative to the dataset root")
            continue
        rel = posixpath.join(folder, url) if folder else url
        listed.add(rel)
        if rel not in files:
            problems.append(f"{meta_rel}: {url} does not exist")
            continue
        if e.get("filesize") != files[rel]:
            problems.append(f"{meta_rel}: {url} filesize {e.get('filesize')!r} but the file has {files[rel]} bytes")
        actual = counts.get(rel)
        if actual is not None and e.get("nsamples") != actual:
            problems.append(f"{meta_rel}: {url} nsamples {e.get('nsamples')!r} but the tar holds {actual} samples")
    if not folder:
        for t in tars:
            if t not in listed:
                problems.append(f"{t}: missing from {WIDS_META} (VILA would never read it)")


def _check_mmc4_dirs(files: dict[str, int], problems: list[str]) -> list[tuple[str, str]]:
    """Folders with pkl/count files must hold only complete pairs (VILA counts listdir() // 2)."""
    pairs = []
    dirs = {posixpath.dirname(r) for r in files if r.endswith((".pkl", ".count"))}
    for d in sorted(dirs):
        children = [r for r in files if posixpath.dirname(r) == d]
        inside = [r if d == "" else r[len(d) + 1:] for r in files if d == "" or r.startswith(d + "/")]
        subdirs = {r.split("/", 1)[0] for r in inside if "/" in r}
        stems: dict[str, set[str]] = {}
        for c in children:
            stem, ext = posixpath.splitext(c)
            if ext in (".pkl", ".count"):
                stems.setdefault(stem, set()).add(ext)
            else:
                problems.append(f"{c}: not a .pkl/.count file in an MMC4 folder (VILA's shard count would be off)")
        if subdirs:
            problems.append(f"{d or '.'}: MMC4 folder has sub-folders {sorted(subdirs)} (VILA counts listdir() // 2)")
        for stem, exts in sorted(stems.items()):
            if exts != {".pkl", ".count"}:
                missing = ({".pkl", ".count"} - exts).pop()
                problems.append(f"{stem}{missing}: missing (pkl and count come in pairs)")
            else:
                pairs.append((stem + ".pkl", stem + ".count"))
    return pairs


def _check_manifest(
    fs: fsspec.AbstractFileSystem, base: str, files: dict[str, int], shards: dict[str, str],
    counts: dict[str, int | None], problems: list[str],
) -> None:
    if MANIFEST not in files:
        if shards:
            problems.append(f"{MANIFEST} is missing")
        return
    try:
        with fs.open(f"{base}/{MANIFEST}", "rb") as fh:
            table = pq.read_table(fh)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{MANIFEST}: unreadable ({type(e).__name__}: {e})")
        return
    missing_cols = set(MANIFEST_SCHEMA.names) - set(table.column_names)
    if missing_cols:
        problems.append(f"{MANIFEST}: missing columns {sorted(missing_cols)}")
        return
    listed: set[str] = set()
    for r in table.to_pylist():
        rel = r["shard"]
        if rel in listed:
            problems.append(f"{MANIFEST}: {rel} listed twice")
        listed.add(rel)
        if rel not in files:
            problems.append(f"{MANIFEST}: {rel} does not exist")
            continue
        if r["bytes"] != files[rel]:
            problems.append(f"{MANIFEST}: {rel} bytes {r['bytes']} but the file has {files[rel]}")
        if r["sha256"] != _sha256(fs, f"{base}/{rel}"):
            problems.append(f"{MANIFEST}: {rel} sha256 does not match the file")
        if rel in shards and r["kind"] != shards[rel]:
            problems.append(f"{MANIFEST}: {rel} kind {r['kind']!r}, expected {shards[rel]!r}")
        actual = counts.get(rel)
        if actual is not None and r["nsamples"] != actual:
            problems.append(f"{MANIFEST}: {rel} nsamples {r['nsamples']} but the file holds {actual}")
    for rel in sorted(set(shards) - listed):
        problems.append(f"{rel}: not listed in {MANIFEST}")


_COUNT_KEYS = ("rows_in", "kept", "dropped", "quarantined")


def _check_stats(fs: fsspec.AbstractFileSystem, base: str, files: dict[str, int], problems: list[str]) -> None:
    if "stats.json" not in files:
        problems.append("stats.json is missing")
        return
    try:
        with fs.open(f"{base}/stats.json", "rb") as fh:
            stats = json.load(fh)
    except ValueError as e:
        problems.append(f"stats.json: not valid JSON ({e})")
        return

    def balanced(what: str, rec: Any) -> None:
        if not isinstance(rec, dict) or any(not isinstance(rec.get(k), int) for k in _COUNT_KEYS):
            problems.append(f"stats.json: {what} lacks integer {list(_COUNT_KEYS)}")
            return
        if rec["rows_in"] != rec["kept"] + rec["dropped"] + rec["quarantined"]:
            problems.append(
                f"stats.json: {what} unbalanced: rows_in {rec['rows_in']} != kept {rec['kept']} + dropped "
                f"{rec['dropped']} + quarantined {rec['quarantined']}"
            )

    balanced("total", stats.get("total"))
    for name, rec in sorted((stats.get("sources") or {}).items()):
        balanced(f"source {name}", rec)
    for rec in stats.get("shards") or []:
        label = f"shard {rec.get('source')}/{rec.get('shard')}" if isinstance(rec, dict) else "shard"
        balanced(label, rec)
    if stats.get("balanced") is False:
        problems.append("stats.json: says balanced: false")


def validate_output(
    root: str, storage_options: dict[str, Any] | None = None, *, max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC
) -> list[str]:
    """Return every way the output folder at ``root`` breaks the output contract (empty list = valid)."""
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    base = base.rstrip("/")
    problems: list[str] = []
    if not fs.isdir(base):
        return [f"{root}: not a folder"]
    files: dict[str, int] = {}
    for path, info in sorted(fs.find(base, detail=True).items()):
        rel = posixpath.relpath(fs._strip_protocol(path), base)
        files[rel] = int(info.get("size") or 0)
    for rel in files:
        if is_temp_name(rel):
            problems.append(f"{rel}: leftover temporary file (an interrupted write)")
    records = [r for r in files if not r.startswith(_RECORD_DIRS) and not is_temp_name(r)]
    for rel in records:
        if rel.endswith(_COMPRESSED_SUFFIXES):
            problems.append(f"{rel}: compressed tar; VILA's reader needs an uncompressed .tar")
    tars = [r for r in records if r.endswith(".tar")]
    counts: dict[str, int | None] = {}
    for rel in tars:
        counts[rel] = _check_tar(fs, f"{base}/{rel}", rel, problems)
    if tars and WIDS_META not in files:
        problems.append(f"{WIDS_META} is missing but the output has {len(tars)} tar shards")
    for meta_rel in [r for r in records if posixpath.basename(r) == WIDS_META]:
        _check_wids_meta(fs, base, meta_rel, files, tars, counts, problems)
    pairs = _check_mmc4_dirs({r: s for r, s in files.items() if r in records}, problems)
    for pkl, cnt in pairs:
        n = _check_pkl(fs, f"{base}/{pkl}", pkl, max_images_per_doc, problems)
        counts[pkl] = n
        with fs.open(f"{base}/{cnt}", "rb") as fh:
            text = fh.read().decode("utf-8", "replace").strip()
        if not text.isdigit():
            problems.append(f"{cnt}: holds {text!r}, not a document count")
        elif n is not None and int(text) != n:
            problems.append(f"{cnt}: says {text} documents but {pkl} holds {n}")
    shards = {r: "wds" for r in tars} | {p: "mmc4" for p, _ in pairs}
    _check_manifest(fs, base, files, shards, counts, problems)
    _check_stats(fs, base, files, problems)
    return problems
