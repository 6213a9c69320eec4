"""Source health: a source whose image references mostly fail is a configuration problem, not data.

A wrong ``image_dir`` makes every MMC4 image "missing"; a COYO parquet of URLs without ``fetch_remote``
quarantines every row as unsafe; a dead mirror fails every download. Each of those runs "succeeds" with
nothing published for that source, so the end of a run computes, per source, how many image references
failed at read and why, and flags the source when most did (``FAILED_SHARE_WARNING``) or when it kept
nothing. The entry goes into stats.json (``sources.<name>.health``), on screen (``warning_lines``) and into
the report. Everything is derived from the counted reasons, so it is identical on every engine and on
resume.
"""

from __future__ import annotations

from typing import Any

FAILED_SHARE_WARNING = 0.5  # "most references fail"; real URL lists lose 20-40% (img2dataset's COYO runs)

# read-stage reason classes that mean "the reference did not give an image", by likely cause
_NOT_FOUND = {"image_missing", "image_unreadable", "image_empty", "missing_from_tar"}
_UNSAFE = {"image_path_unsafe", "image_name_unsafe"}
_UNREACHABLE = {"failed_to_download", "url_refused_private_network", "img2dataset_failed_to_download",
                "image_too_large"}
_NO_REFERENCE = {"image_path_missing"}
REFERENCE_FAILURES = _NOT_FOUND | _UNSAFE | _UNREACHABLE | _NO_REFERENCE


def _failures(reasons: dict[str, int]) -> dict[str, int]:
    """{reason class: count} of read-stage reference failures among ``stage:reason`` counts."""
    out: dict[str, int] = {}
    for key, n in reasons.items():
        stage, _, cls = key.partition(":")
        if stage == "read" and cls in REFERENCE_FAILURES:
            out[cls] = out.get(cls, 0) + n
    return dict(sorted(out.items()))


def source_health(src: dict[str, Any]) -> dict[str, Any]:
    """The health entry of one source's merged stats (see module docstring)."""
    documents = src.get("images_in", 0) > 0
    if documents:  # MMC4: references are the documents' images, each with its own reason
        references, failures = src["images_in"], _failures(src.get("image_reasons") or {})
    else:
        references, failures = src.get("rows_in", 0), _failures(src.get("reasons") or {})
    failed = sum(failures.values())
    share = failed / references if references else 0.0
    health: dict[str, Any] = {"status": "ok", "references": references, "failed": failed,
                              "failed_share": round(share, 4), "failures": failures}
    if references and share > FAILED_SHARE_WARNING:
        health["status"] = "warning"
        health["cause"] = _cause(failures, failed, references, documents)
    elif src.get("rows_in", 0) and not src.get("kept", 0):
        health["status"] = "warning"
        health["cause"] = f"no row of {src['rows_in']} kept (see reasons)"
    return health


def _cause(failures: dict[str, int], failed: int, references: int, documents: bool) -> str:
    """The likely cause, named after the largest group of failure reasons."""
    groups = {"not_found": _NOT_FOUND, "unsafe": _UNSAFE, "unreachable": _UNREACHABLE,
              "no_reference": _NO_REFERENCE}
    counts = {g: sum(n for c, n in failures.items() if c in members) for g, members in groups.items()}
    top = max(counts, key=lambda g: counts[g])
    n = counts[top]
    of = f"{n} of {references} image references"
    if top == "not_found":
        setting = "image_dir" if documents else "image_root"
        if "missing_from_tar" in failures:
            return f"shards incomplete: {of} listed in the parquet are not in the tar"
        return f"{setting} probably wrong: {of} not found"
    if top == "unsafe":
        return (f"{of} point outside image_root/image_dir or are URLs without fetch_remote: true "
                "(absolute paths, '..', other schemes)")
    if top == "unreachable":
        return f"{of} could not be downloaded (dead links, network, refused private addresses)"
    return f"{of} are empty in the image path column (wrong image_path_column?)"


def add_source_health(stats: dict[str, Any]) -> dict[str, Any]:
    """Add ``health`` to every source of a merged stats.json payload (in place; returned for chaining)."""
    for src in (stats.get("sources") or {}).values():
        src["health"] = source_health(src)
    return stats


def warning_lines(stats: dict[str, Any], sources: list[Any] | None = None) -> list[str]:
    """One ``warning:`` line per unhealthy source, naming the configured folder when the config is at hand."""
    where = {}
    for s in sources or []:
        folder = getattr(s, "image_dir", None) or getattr(s, "image_root", None)
        if folder:
            where[s.name] = folder
    lines = []
    for name, src in sorted((stats.get("sources") or {}).items()):
        health = src.get("health") or source_health(src)
        if health.get("status") != "warning":
            continue
        cause = health["cause"]
        if name in where and "probably wrong" in cause:
            cause += f" under {where[name]}"
        lines.append(f"warning: source {name!r}: {cause} ({100 * health['failed_share']:.0f}% of references "
                     "failed)")
    return lines


def probe_source(reader: Any, shards: list[Any], limit: int = 20) -> dict[str, Any]:
    """Read the first ``limit`` references of a source through its own reader and say how many resolve.

    The reader itself does the work (same root containment, same fetcher, same reasons), so the probe
    cannot disagree with a run; reading stops once ``limit`` image references (pair rows, or MMC4 images)
    were seen. Returns ``{"checked", "found", "failures", "status", "cause"?}``.
    """
    source = getattr(reader, "source", None)
    if source is not None and getattr(source, "fetch_remote", False):
        # a URL source reads ahead `prefetch_rows` downloads (4096 by default); a probe wants `limit` of them
        from vila2_curate.pipelines.io.readers import make_reader

        reader = make_reader(source.model_copy(update={"fetch": source.fetch.model_copy(
            update={"prefetch_rows": max(limit, 1)})}))
    counts: dict[str, Any] = {"rows_in": 0, "kept": 0, "images_in": 0, "reasons": {}, "image_reasons": {}}
    for shard in shards:
        tables = reader.read(shard, batch_size=limit)
        try:
            for table in tables:
                _count_probe(table, counts)
                if (counts["images_in"] or counts["rows_in"]) >= limit:
                    break
        finally:
            tables.close()  # closes the shard's file (and a fetcher) without reading the rest
        if (counts["images_in"] or counts["rows_in"]) >= limit:
            break
    health = source_health(counts)
    unhealthy = health["references"] > 0 and health["failed_share"] > FAILED_SHARE_WARNING
    out = {"checked": health["references"], "found": health["references"] - health["failed"],
           "failures": health["failures"], "status": "warning" if unhealthy else "ok"}
    if unhealthy:
        out["cause"] = health["cause"]
    return out


def _count_probe(table: Any, counts: dict[str, Any]) -> None:
    reasons, image_reasons = counts["reasons"], counts["image_reasons"]
    cols = table.select([c for c in ("drop_reason", "drop_stage", "image_info") if c in table.column_names])
    for row in cols.to_pylist():
        counts["rows_in"] += 1
        _count_reason(row, reasons)
        for im in row.get("image_info") or []:
            counts["images_in"] += 1
            _count_reason(im, image_reasons)


def _count_reason(item: dict[str, Any], into: dict[str, int]) -> None:
    """``stage:reason`` (the reason's class, before any ``:``) of a dropped row or image."""
    if item.get("drop_reason") is not None:
        key = f"{item.get('drop_stage')}:{str(item['drop_reason']).split(':', 1)[0].strip()}"
        into[key] = into.get(key, 0) + 1
