"""Tars read the way VILA's trainer reads them, not the way Python's tarfile does.

``scan_tar`` walks raw headers like VILA's ``MMIndexedTar`` (llava/wids/wids_mmtar.py) and ``vila_groups``
groups members with wids' ``os.path.splitext`` rule, so a shard is judged by what VILA would index.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

from vila2_curate.pipelines.io.writers.records import WIDS_META

GNU_MAGIC = b"ustar  \x00"  # GNU tar's: bytes 345-500 then hold atime/ctime/sparse data, not a prefix
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"\x04\x22\x4d\x18": "lz4",
}


@dataclass
class TarMember:
    """A regular file as VILA's index records it: its 100-byte name field and where its data lies."""

    name: str
    offset: int  # of the data
    size: int


@dataclass
class TarScan:
    """The members VILA would index, plus what would make VILA and tarfile disagree about them."""

    members: list[TarMember] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gnu_headers: list[int] = field(default_factory=list)  # offsets of GNU-format headers


def parse_octal(field_bytes: bytes) -> int | None:
    """A header number as VILA's ``int(..., 8)`` reads it; None where VILA could not."""
    if field_bytes[:1] and field_bytes[0] & 0x80:
        return None  # base-256: VILA's int(..., 8) cannot read it
    text = field_bytes.replace(b"\x00", b" ").strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def pax_header_keys(data: bytes) -> set[str]:
    """The keys a pax header sets (VILA skips pax headers, so a key that renames or resizes matters)."""
    keys = set()
    for line in data.split(b"\n"):
        _, _, rec = line.partition(b" ")
        k, sep, _ = rec.partition(b"=")
        if sep:
            keys.add(k.decode("utf-8", "replace"))
    return keys


def compression_of(head: bytes) -> str | None:
    """The compression whose magic ``head`` starts with, if any (VILA's reader needs a plain tar)."""
    for magic, name in COMPRESSED_MAGIC.items():
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
        stored = parse_octal(hdr[148:156])
        computed = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if stored != computed:
            scan.problems.append(f"bad header checksum at byte {offset} (not a plain tar?)")
            break
        raw_name = hdr[:100].split(b"\x00", 1)[0]
        typeflag = hdr[156:157]
        gnu = hdr[257:265] == GNU_MAGIC
        if gnu:
            scan.gnu_headers.append(offset)
        size = parse_octal(hdr[124:136])
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
            keys = pax_header_keys(f.read(size))
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
            if not gnu and hdr[345:500].strip(b"\x00"):
                scan.problems.append(f"member {name!r} uses the ustar prefix field, which VILA ignores")
            scan.members.append(TarMember(name, offset + 512, size))
        offset += 512 + (size + 511) // 512 * 512
    if scan.gnu_headers:
        scan.problems.append(_gnu_problem(scan.gnu_headers))
    return scan


def _gnu_problem(offsets: list[int]) -> str:
    """One line for a tar's GNU headers. GNU format is where VILA's index and tarfile part ways (long names
    in 'L' headers, base-256 sizes, sparse members, atime/ctime where ustar keeps its prefix) and our writer
    never emits it, so GNU magic means another tool rewrote the shard."""
    return (f"{len(offsets)} header(s) in GNU tar format (magic 'ustar  \\0'), the first at byte {offsets[0]}; "
            f"the writer emits POSIX ustar ('ustar\\0' '00'): the shard was rewritten by another tool (GNU tar?), "
            f"rewrite it in POSIX ustar format")


def read_member(f: IO[bytes], m: TarMember) -> bytes:
    """The data of one scanned member (seek + read: the scan already knows where it is)."""
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
                    sample[ext] = _decode_member(ext, read_member(f, scan.members[i]))
                yield sample
