"""wids-meta.json files, the index VILA's ``VILAWebDataset`` reads shards through, and what VILA's COYO
loader then reads of each dataset root."""

from __future__ import annotations

import json
import posixpath

import fsspec

from vila2_curate.pipelines.io.writers.records import WIDS_KIND, WIDS_META, WIDS_VERSION
from vila2_curate.pipelines.validate.findings import Validation
from vila2_curate.pipelines.validate.shards import TarFacts

COYO_SAMPLES_PER_IDX = 4  # LazyCoyoWebDataset(n_samples_per_idx=4): __len__ = len(dataset) // 4


def check_wids_meta(
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


def check_coyo_len4(metas: dict[str, list[str]], facts: dict[str, TarFacts], report: Validation) -> None:
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
