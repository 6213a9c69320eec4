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
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np
from PIL import Image

from vila2_curate.pipelines.io.writers.atomic import is_temp_name, read_parquet
from vila2_curate.pipelines.io.writers.mmc4 import VILA_MAX_IMAGES_PER_DOC
from vila2_curate.pipelines.io.writers.records import MANIFEST, WIDS_KIND, WIDS_META, WIDS_VERSION
from vila2_curate.pipelines.io.writers.wds import SIDECAR_ROOT
from vila2_curate.schemas.images import PIL_FORMATS
from vila2_curate.schemas.records import MANIFEST_SCHEMA

IMAGE_EXTS = PIL_FORMATS  # member extension -> PIL format
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
    warnings: list[str] = field(default_factory=list)


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
            keys = _pax_keys(f.read(size))
            misread = keys & {"path", "linkpath", "size"}
            kind = "global pax header ('g')" if typeflag == b"g" else "pax header ('x')"
            if misread:
                scan.problems.append(
                    f"{kind} at byte {offset}: pax header sets {sorted(misread)}; VILA's reader ignores pax "
                    f"headers and would misread it (tarfile would not: the two readers disagree)"
                )
            else:
                scan.warnings.append(f"{kind} at byte {offset} with {sorted(keys)}: VILA's reader skips it")
        elif typeflag in (b"L", b"K"):
            f.seek(offset + 512)
            long = f.read(size).split(b"\x00", 1)[0].decode("utf-8", "replace")
            what = "long name" if typeflag == b"L" else "long link name"
            scan.problems.append(
                f"GNU {what} header ('{typeflag.decode()}') for {long!r}: VILA's reader skips it and indexes the "
                f"next member under its truncated 100-byte name (tarfile uses the long one)"
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


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN/Infinity; JSON (and our writer) does not


def strict_json(data: bytes | str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity instead of turning them into floats."""
    return json.loads(data, parse_constant=_no_constants)


@dataclass
class TarFacts:
    """What the cross-file checks need from one shard, gathered during its single pass."""

    nsamples: int | None
    urls: dict[str, str] = field(default_factory=dict)  # key -> .json url, in shard order
    duplicate_urls: dict[str, list[str]] = field(default_factory=dict)  # url -> keys sharing it
    images: list[tuple[bytes, int]] = field(default_factory=list)  # (sha256 prefix, sample ordinal)
    last_keys: list[str] = field(default_factory=list)  # the last 3 samples (COYO's len // 4 rule)


_DIGEST_PREFIX = 8  # bytes of each image's sha256 kept for the cross-dataset duplicate check


def _check_tar(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, problems: list[str], warnings: list[str]
) -> TarFacts:
    """Check one shard; returns the sample count VILA would index (None if unreadable) and its urls."""
    local: list[str] = []
    facts = TarFacts(nsamples=None)
    with fs.open(path, "rb") as f:
        head = f.read(6)
        comp = compression_of(head)
        if comp:
            problems.append(f"{rel}: compressed tar ({comp}); VILA's reader needs an uncompressed tar")
            return facts
        scan = scan_tar(f)
        local.extend(scan.problems)
        warnings.extend(f"{rel}: {w}" for w in scan.warnings[:_MAX_PROBLEMS_PER_FILE])
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
        by_url: dict[str, list[str]] = {}
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
                data = _read(f, scan.members[i])
                facts.images.append((hashlib.sha256(data).digest()[:_DIGEST_PREFIX], len(facts.images)))
                err = _check_image(data, posixpath.splitext(names[i])[1][1:])
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
                    meta = strict_json(_read(f, by_ext[".json"]))
                    if not isinstance(meta, dict) or not isinstance(meta.get("url"), str) or not meta["url"]:
                        local.append(f"sample {key!r} .json has no \"url\" string")
                    else:
                        facts.urls[key] = meta["url"]
                        by_url.setdefault(meta["url"], []).append(key)
                except ValueError as e:
                    local.append(f"sample {key!r} .json is not valid JSON ({e})")
    facts.duplicate_urls = {u: ks for u, ks in by_url.items() if len(ks) > 1}
    facts.last_keys = list(groups)[-3:]
    for msg in local[:_MAX_PROBLEMS_PER_FILE]:
        problems.append(f"{rel}: {msg}")
    if len(local) > _MAX_PROBLEMS_PER_FILE:
        problems.append(f"{rel}: ... and {len(local) - _MAX_PROBLEMS_PER_FILE} more problems")
    facts.nsamples = len(groups)
    return facts


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
) -> list[str]:
    """Check one wids-meta.json (its urls are relative to its own folder: wids rebases them there); returns
    the tars it lists, in shardlist order."""
    folder = posixpath.dirname(meta_rel)
    try:
        with fs.open(f"{base}/{meta_rel}", "rb") as fh:
            meta = json.load(fh)
    except ValueError as e:
        problems.append(f"{meta_rel}: not valid JSON ({e})")
        return []
    if not isinstance(meta, dict):
        problems.append(f"{meta_rel}: top level must be an object")
        return []
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
        return []
    urls = [e.get("url") if isinstance(e, dict) else None for e in shardlist]
    if urls != sorted(u for u in urls if isinstance(u, str)) or len(set(urls)) != len(urls):
        problems.append(f"{meta_rel}: shardlist is not sorted by url, has duplicates or entries without url")
    listed: list[str] = []
    for e in shardlist:
        if not isinstance(e, dict) or not isinstance(e.get("url"), str):
            continue
        url = e["url"]
        if url.startswith("/") or "://" in url or ".." in url.split("/"):
            problems.append(f"{meta_rel}: url {url!r} is not relative to the dataset root")
            continue
        rel = posixpath.join(folder, url) if folder else url
        listed.append(rel)
        if rel not in files:
            problems.append(f"{meta_rel}: {url} does not exist")
            continue
        if e.get("filesize") != files[rel]:
            problems.append(f"{meta_rel}: {url} filesize {e.get('filesize')!r} but the file has {files[rel]} bytes")
        actual = counts.get(rel)
        if actual is not None and e.get("nsamples") != actual:
            problems.append(f"{meta_rel}: {url} nsamples {e.get('nsamples')!r} but the tar holds {actual} samples")
    if not folder:
        listed_set = set(listed)
        for t in tars:
            if t not in listed_set:
                problems.append(f"{t}: missing from {WIDS_META} (VILA would never read it)")
    return listed


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
        table = read_parquet(fs, f"{base}/{MANIFEST}")
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


# ---------------------------------------------------------------- VILA's loading rules


COYO_SAMPLES_PER_IDX = 4  # LazyCoyoWebDataset(n_samples_per_idx=4): __len__ = len(dataset) // 4
_KEYWORDS = ("spatial", "ocr", "bbox_interleaved")  # coyo_qa picks a specialist question by substring


def vila_mmc4_ranks(counts: list[int], n_listed: int, world_size: int) -> list[int]:
    """Documents per rank as ``LazyMMC4Dataset.__init__`` computes them (llava/data/dataset.py).

    ``counts``: the ``.count`` values in sorted file-name order; ``n_listed``: ``len(os.listdir(folder))``.
    VILA then reads ``min(result) * world_size`` documents in all.
    """
    n_shards = n_listed // 2
    counts = counts[:n_shards]
    shared_size = n_shards // world_size
    return [sum(counts[i * shared_size:(i + 1) * shared_size]) for i in range(world_size)]


def _check_world_sizes(
    fs: fsspec.AbstractFileSystem, base: str, entries: set[str], pairs: list[tuple[str, str]],
    world_sizes: list[int], report: Validation,
) -> None:
    """Print what each rank of each MMC4 folder gets; a rank with no document is a problem."""
    by_dir: dict[str, list[str]] = {}
    for _, cnt in pairs:
        by_dir.setdefault(posixpath.dirname(cnt), []).append(cnt)
    for d, cnts in sorted(by_dir.items()):
        names = sorted(posixpath.basename(c) for c in cnts)  # VILA: sorted(f for f in listdir if .count)
        counts = []
        for name in names:
            with fs.open(f"{base}/{posixpath.join(d, name)}", "rb") as fh:
                text = fh.read().decode("utf-8", "replace").strip()
            if text.isdigit():
                counts.append(int(text))
        if len(counts) < len(names):
            continue  # a bad count is already reported; this folder's arithmetic would be meaningless
        n_listed = sum(1 for e in entries if posixpath.dirname(e) == d)
        total = sum(counts)
        label = d or "."
        for ws in world_sizes:
            ranks = vila_mmc4_ranks(counts, n_listed, ws)
            read = min(ranks) * ws
            files_used = n_listed // 2 // ws * ws
            report.info.append(
                f"{label}: world size {ws}: {len(counts)} pkl files, {n_listed // 2 // ws} per rank, documents per "
                f"rank {ranks}; VILA reads {read} of {total} documents, {total - read} never read "
                f"({len(counts) - files_used} files past the last rank, the rest cut to the smallest rank)"
            )
            if min(ranks) == 0:
                empty = [r for r, n in enumerate(ranks) if n == 0]
                n_files = n_listed // 2
                why = (f"{n_files} pkl files for {ws} ranks: each gets {n_files} // {ws} = {n_files // ws} files; set "
                       f"output.mmc4_min_files to a multiple of {ws}" if n_files < ws else
                       f"only {total} documents for {ws} ranks" if total < ws else
                       f"set output.mmc4_min_files to a multiple of {ws}")
                report.problems.append(
                    f"{label}: with world size {ws}, rank(s) {empty[:8]} get no MMC4 document, so VILA cuts every "
                    f"rank to 0 and trains on none of the {total} documents ({why})"
                )


def _check_coyo_len4(metas: dict[str, list[str]], facts: dict[str, TarFacts], report: Validation) -> None:
    """Warn about the samples ``LazyCoyoWebDataset``'s ``len(dataset) // 4`` never serves, per dataset root."""
    for folder, tars in sorted(metas.items()):
        n = sum(facts[t].nsamples or 0 for t in tars if t in facts)
        lost = n % COYO_SAMPLES_PER_IDX
        if not lost:
            continue
        keys: list[str] = []
        for t in reversed(tars):  # the last `lost` samples in shardlist order
            if len(keys) >= lost or t not in facts:
                break
            keys = facts[t].last_keys[-(lost - len(keys)):] + keys
        report.warnings.append(
            f"{folder or '.'}: VILA's COYO loader serves len // {COYO_SAMPLES_PER_IDX} = {n // COYO_SAMPLES_PER_IDX} "
            f"groups of {COYO_SAMPLES_PER_IDX}; the last {lost} of {n} samples ({', '.join(keys)}) are never read"
        )


@dataclass
class _SidecarTally:
    covered: int = 0
    samples: int = 0
    tars_with_file: int = 0
    tars: int = 0


def _check_sidecars_of_tar(
    fs: fsspec.AbstractFileSystem, base: str, tar: str, facts: TarFacts, folders: list[str],
    sidecar_files: set[str], tallies: dict[str, _SidecarTally], problems: list[str],
) -> None:
    """VILA reads ``<caption_choice>/<tar relpath>.json`` = ``{url: {"output": str}}``, looked up by url."""
    urls = set(facts.urls.values())
    has_any = False
    for folder in folders:
        rel = f"{SIDECAR_ROOT}/{folder}/{tar}.json"
        tally = tallies.setdefault(folder, _SidecarTally())
        tally.tars += 1
        tally.samples += len(facts.urls)
        if rel not in sidecar_files:
            continue
        has_any = True
        tally.tars_with_file += 1
        try:
            with fs.open(f"{base}/{rel}", "rb") as fh:
                data = strict_json(fh.read())
        except ValueError as e:
            problems.append(f"{rel}: not valid JSON ({e})")
            continue
        if not isinstance(data, dict):
            problems.append(f"{rel}: top level must be an object {{url: {{\"output\": str}}}}")
            continue
        foreign = [k for k in data if k not in urls]
        if foreign:
            problems.append(f"{rel}: {len(foreign)} key(s) are not a url of {tar} (VILA looks captions up by the "
                            f"sample's url, so they are never read), e.g. {foreign[0]!r}")
        bad = [k for k, v in data.items() if not isinstance(v, dict) or not isinstance(v.get("output"), str)
               or not v["output"].strip()]
        if bad:
            problems.append(f"{rel}: {len(bad)} entr(y/ies) lack a non-empty {{\"output\": str}}, e.g. {bad[0]!r}")
        tally.covered += len(urls & set(data))
    if has_any and facts.duplicate_urls:
        url, keys = next(iter(facts.duplicate_urls.items()))
        problems.append(f"{tar}: {len(facts.duplicate_urls)} url(s) shared by several samples, e.g. {url!r} by "
                        f"{keys}: sidecars are keyed by url, so those samples get one another's captions")


class _ImageDigests:
    """Every image's sha256 prefix with where it is, in flat arrays: 16 bytes per image (400 MB at 25M)."""

    def __init__(self) -> None:
        self.prefixes = bytearray()
        self.tar = array("I")
        self.ordinal = array("I")

    def add(self, tar_index: int, images: list[tuple[bytes, int]]) -> None:
        for digest, ordinal in images:
            self.prefixes += digest
            self.tar.append(tar_index)
            self.ordinal.append(ordinal)

    def duplicate_groups(self) -> list[list[tuple[int, int]]]:
        """(tar index, image ordinal) of images whose first 64 sha256 bits are equal (a collision between
        different images is ~1e-5 at 25M images)."""
        keys = np.frombuffer(bytes(self.prefixes), dtype=">u8")
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        groups: dict[int, list[int]] = {}
        for i in same.tolist():
            groups.setdefault(int(ordered[i]), [int(order[i])]).append(int(order[i + 1]))
        return [[(self.tar[j], self.ordinal[j]) for j in members] for members in groups.values()]


def _image_keys(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Keys of a tar's samples with an image member, in order (what TarFacts.images ordinals count)."""
    with fs.open(path, "rb") as f:
        names = [m.name for m in scan_tar(f).members]
    return [k for k, idxs in vila_groups(names).items()
            for i in idxs if posixpath.splitext(names[i])[1][1:] in IMAGE_EXTS]


def _report_duplicate_images(
    fs: fsspec.AbstractFileSystem, base: str, tars: list[str], digests: _ImageDigests, report: Validation,
) -> None:
    """Byte-identical images across the dataset: a warning (a run without exact dedup is legal)."""
    groups = digests.duplicate_groups()
    if not groups:
        return
    copies = sum(len(g) - 1 for g in groups)
    keys = {t: _image_keys(fs, f"{base}/{tars[t]}") for t in {t for t, _ in groups[0]}}
    example = ", ".join(f"{tars[t]}:{keys[t][o]}" for t, o in groups[0])
    report.warnings.append(f"{len(groups)} image(s) appear byte-identical in more than one sample ({copies} extra "
                           f"copies; sha256), e.g. {example}: was exact dedup run?")


@dataclass
class Validation:
    """Everything ``vila2-curate validate`` found: problems fail it, warnings and info are printed."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)


def _walk(fs: fsspec.AbstractFileSystem, base: str, report: Validation) -> tuple[dict[str, int], set[str]]:
    """Regular files (relpath -> size) and every entry name; symlinks and other non-regular files are
    problems (VILA's sidecar lookup uses realpath, and a fifo would hang any reader)."""
    files: dict[str, int] = {}
    entries: set[str] = set()
    for path, info in sorted(fs.find(base, withdirs=True, detail=True).items()):
        rel = posixpath.relpath(fs._strip_protocol(path), base)
        if rel == ".":
            continue
        entries.add(rel)
        if info.get("islink"):
            report.problems.append(f"{rel}: symlink in the output tree (VILA resolves realpath for sidecars and "
                                   f"copies would not follow it); publish regular files only")
        elif info.get("type") == "file":
            files[rel] = int(info.get("size") or 0)
        elif info.get("type") != "directory":
            report.problems.append(f"{rel}: not a regular file ({info.get('type')})")
    return files, entries


def check_output(
    root: str, storage_options: dict[str, Any] | None = None, *, max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
    world_sizes: list[int] | tuple[int, ...] = (),
) -> Validation:
    """Check the output folder at ``root`` against the output contract and VILA's loading rules."""
    report = Validation()
    problems = report.problems
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    base = base.rstrip("/")
    if not fs.isdir(base):
        problems.append(f"{root}: not a folder")
        return report
    files, entries = _walk(fs, base, report)
    for rel in sorted(entries):
        if is_temp_name(rel):
            problems.append(f"{rel}: leftover temporary file (an interrupted write)")
    records = [r for r in files if not r.startswith(_RECORD_DIRS) and not is_temp_name(r)]
    for rel in records:
        if rel.endswith(_COMPRESSED_SUFFIXES):
            problems.append(f"{rel}: compressed tar; VILA's reader needs an uncompressed .tar")
    tars = [r for r in records if r.endswith(".tar")]
    sidecar_files = {r for r in records if r.startswith(SIDECAR_ROOT + "/")}
    folders = sorted({r.split("/")[1] for r in sidecar_files if r.count("/") >= 2})
    for folder in folders:
        hits = [k for k in _KEYWORDS if k in folder]
        if len(hits) > 1:
            problems.append(f"{SIDECAR_ROOT}/{folder}: name contains {hits}; VILA's specialist loader takes the "
                            f"first of spatial/ocr/bbox_interleaved it finds")
    for rel in sorted(sidecar_files):
        tar = rel.split("/", 2)[2][: -len(".json")] if rel.count("/") >= 2 and rel.endswith(".json") else None
        if tar not in tars:
            problems.append(f"{rel}: not <caption folder>/<tar relpath>.json of a tar in this output; VILA never "
                            f"reads it")
    counts: dict[str, int | None] = {}
    facts: dict[str, TarFacts] = {}
    tallies: dict[str, _SidecarTally] = {}
    digests = _ImageDigests()
    for t_index, rel in enumerate(tars):
        tf = _check_tar(fs, f"{base}/{rel}", rel, problems, report.warnings)
        counts[rel] = tf.nsamples
        _check_sidecars_of_tar(fs, base, rel, tf, folders, sidecar_files, tallies, problems)
        if tf.duplicate_urls and not any(f"{SIDECAR_ROOT}/{f}/{rel}.json" in sidecar_files for f in folders):
            url, keys = next(iter(tf.duplicate_urls.items()))
            report.warnings.append(f"{rel}: {len(tf.duplicate_urls)} url(s) shared by several samples, e.g. {url!r} "
                                   f"by {keys}: a recaption round's sidecars (keyed by url) would mix them up")
        digests.add(t_index, tf.images)
        # keep only what the cross-file checks need, so memory stays per shard (plus the digests)
        facts[rel] = TarFacts(nsamples=tf.nsamples, last_keys=tf.last_keys)
    _report_duplicate_images(fs, base, tars, digests, report)
    if tars and WIDS_META not in files:
        problems.append(f"{WIDS_META} is missing but the output has {len(tars)} tar shards")
    metas: dict[str, list[str]] = {}
    for meta_rel in [r for r in records if posixpath.basename(r) == WIDS_META]:
        listed = _check_wids_meta(fs, base, meta_rel, files, tars, counts, problems)
        metas[posixpath.dirname(meta_rel)] = listed
    _check_coyo_len4(metas, facts, report)
    for folder, tally in sorted(tallies.items()):
        share = tally.covered / tally.samples if tally.samples else 0.0
        roots = ", ".join(f"data_path {d or '.'} -> caption_choice "
                          f"{posixpath.join(SIDECAR_ROOT, folder, d).rstrip('/')}" for d in sorted(metas))
        report.info.append(
            f"{SIDECAR_ROOT}/{folder}: covers {tally.covered} of {tally.samples} samples ({share:.1%}) in "
            f"{tally.tars_with_file} of {tally.tars} tars; samples without an entry fall back to their .txt "
            f"({roots})"
        )
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
    if world_sizes:
        _check_world_sizes(fs, base, entries, pairs, list(world_sizes), report)
    shards = {r: "wds" for r in tars} | {p: "mmc4" for p, _ in pairs}
    _check_manifest(fs, base, files, shards, counts, problems)
    _check_stats(fs, base, files, problems)
    return report


def validate_output(
    root: str, storage_options: dict[str, Any] | None = None, *, max_images_per_doc: int = VILA_MAX_IMAGES_PER_DOC,
    world_sizes: list[int] | tuple[int, ...] = (),
) -> list[str]:
    """Return every way the output folder at ``root`` breaks the output contract (empty list = valid)."""
    return check_output(root, storage_options, max_images_per_doc=max_images_per_doc,
                        world_sizes=world_sizes).problems
