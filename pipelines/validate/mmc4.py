"""MMC4 folders as VILA's ``LazyMMC4Dataset`` loads them: complete pkl/count pairs (it counts
``listdir() // 2``), pkls of well-formed documents, and the per-rank split that cuts every rank to the
smallest one."""

from __future__ import annotations

import base64
import pickle
import posixpath
from typing import Any

import fsspec

from vila2_curate.pipelines.validate.findings import Validation, add_capped
from vila2_curate.pipelines.validate.images import check_image


class BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Our pkls hold only builtins; refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def check_pkl(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, max_images: int, problems: list[str]
) -> int | None:
    """Check one pkl's documents; returns how many it holds (None if it is not a list VILA can load)."""
    local: list[str] = []
    try:
        with fs.open(path, "rb") as f:
            docs = BuiltinsOnlyUnpickler(f).load()
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
            err = check_image(raw, "")
            if err:
                local.append(f"document {d} image {i} {err}")
    add_capped(problems, rel, local)
    return len(docs)


def check_mmc4_dirs(files: dict[str, int], problems: list[str]) -> list[tuple[str, str]]:
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


def check_mmc4_pairs(
    fs: fsspec.AbstractFileSystem, base: str, pairs: list[tuple[str, str]], max_images: int,
    counts: dict[str, int | None], problems: list[str],
) -> None:
    """Check each pkl and that its .count file states its document count (recorded in ``counts``)."""
    for pkl, cnt in pairs:
        n = check_pkl(fs, f"{base}/{pkl}", pkl, max_images, problems)
        counts[pkl] = n
        with fs.open(f"{base}/{cnt}", "rb") as fh:
            text = fh.read().decode("utf-8", "replace").strip()
        if not text.isdigit():
            problems.append(f"{cnt}: holds {text!r}, not a document count")
        elif n is not None and int(text) != n:
            problems.append(f"{cnt}: says {text} documents but {pkl} holds {n}")


def vila_mmc4_ranks(counts: list[int], n_listed: int, world_size: int) -> list[int]:
    """Documents per rank as ``LazyMMC4Dataset.__init__`` computes them (llava/data/dataset.py).

    ``counts``: the ``.count`` values in sorted file-name order; ``n_listed``: ``len(os.listdir(folder))``.
    VILA then reads ``min(result) * world_size`` documents in all.
    """
    n_shards = n_listed // 2
    counts = counts[:n_shards]
    shared_size = n_shards // world_size
    return [sum(counts[i * shared_size:(i + 1) * shared_size]) for i in range(world_size)]


def check_world_sizes(
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
