"""One WebDataset shard checked in a single pass: member names, sample grouping, images, captions and
``.json`` urls, as VILA's wids reader and webdataset would see them."""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec

from vila2_curate.pipelines.validate.findings import MAX_PROBLEMS_PER_FILE, add_capped
from vila2_curate.pipelines.validate.images import DIGEST_PREFIX, IMAGE_EXTS, check_image
from vila2_curate.pipelines.validate.rounds import sample_caption_folders
from vila2_curate.pipelines.validate.tar_reader import compression_of, read_member, scan_tar, vila_groups

SAMPLE_EXTS = {*IMAGE_EXTS, "txt", "json"}


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
    usable_captions: Counter[str] = field(default_factory=Counter)  # round folder -> samples it should cover
    captioned_rounds: Counter[int] = field(default_factory=Counter)  # round -> samples with its caption


def check_tar(
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
        warnings.extend(f"{rel}: {w}" for w in scan.warnings[:MAX_PROBLEMS_PER_FILE])
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
                data = read_member(f, scan.members[i])
                facts.images.append((hashlib.sha256(data).digest()[:DIGEST_PREFIX], len(facts.images)))
                err = check_image(data, posixpath.splitext(names[i])[1][1:])
                if err:
                    local.append(f"sample {key!r} image {err}")
            by_ext = {posixpath.splitext(names[i])[1]: scan.members[i] for i in idxs}
            if ".txt" not in by_ext:
                local.append(f"sample {key!r} has no .txt")
            else:
                try:
                    txt = read_member(f, by_ext[".txt"]).decode("utf-8")
                    if not txt.strip():
                        local.append(f"sample {key!r} has an empty .txt caption")
                except UnicodeDecodeError:
                    local.append(f"sample {key!r} .txt is not UTF-8")
            if ".json" not in by_ext:
                local.append(f"sample {key!r} has no .json")
            else:
                try:
                    meta = strict_json(read_member(f, by_ext[".json"]))
                    if not isinstance(meta, dict) or not isinstance(meta.get("url"), str) or not meta["url"]:
                        local.append(f"sample {key!r} .json has no \"url\" string")
                    else:
                        facts.urls[key] = meta["url"]
                        by_url.setdefault(meta["url"], []).append(key)
                        folders, rounds = sample_caption_folders(meta.get("captions"))
                        facts.usable_captions.update(folders)
                        facts.captioned_rounds.update(rounds)
                except ValueError as e:
                    local.append(f"sample {key!r} .json is not valid JSON ({e})")
    facts.duplicate_urls = {u: ks for u, ks in by_url.items() if len(ks) > 1}
    facts.last_keys = list(groups)[-3:]
    add_capped(problems, rel, local)
    facts.nsamples = len(groups)
    return facts
