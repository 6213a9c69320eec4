"""Atomic file writes through fsspec: write a temporary sibling, then rename it into place.

A killed run must never leave a half-written file under its final name. Locally ``fs.mv`` is a rename
(atomic on POSIX); on object stores it is copy + delete, which is still safe here because the manifest
entry that makes a shard count is written last, after every shard it lists is in place.

Temporary names start with ``.`` and contain ``.tmp-`` so that ``is_temp_name`` (used by the validator
and by resume clean-up) recognises them; they live in the final file's own folder so the rename never
crosses a filesystem.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import queue
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Self

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class OutputFile:
    """One finished output file: where it is (relative to the dataset root) and what it holds."""

    relpath: str
    nsamples: int
    bytes: int
    sha256: str


def join(root: str, relpath: str) -> str:
    """Join a dataset root (local path or URL) and a relative posix path."""
    return f"{root.rstrip('/')}/{relpath.lstrip('/')}" if root else relpath


def temp_path(path: str) -> str:
    """A unique temporary sibling of ``path`` (same folder, so the final rename stays cheap)."""
    parent, base = posixpath.split(path)
    name = f".{base}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    return f"{parent}/{name}" if parent else name


def is_temp_name(path: str) -> bool:
    """True for names this module (or a ``*.tmp`` convention) uses for unfinished files."""
    base = posixpath.basename(path.rstrip("/"))
    return TMP_MARKER in base or base.endswith(".tmp") or ".tmp." in base


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except (FileNotFoundError, OSError):
        pass


def _makedirs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    parent = posixpath.dirname(path)
    if parent and parent not in (".", "/") and not parent.endswith("://"):
        fs.makedirs(parent, exist_ok=True)


@contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and the exception
    propagates, so neither a partial final file nor a stray temporary is left behind.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    _makedirs(fs, path)
    tmp = temp_path(path)
    done = False
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
        done = True
    finally:
        if not done:
            _remove_quietly(fs, tmp)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with atomic_open(fs, path) as f:
        f.write(data)


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed indent, UTF-8, trailing newline) for byte-stable output."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> bytes:
    """Write ``obj`` as deterministic JSON; returns the bytes written (handy for hashing)."""
    data = json_bytes(obj)
    write_bytes_atomic(fs, path, data)
    return data


def write_parquet_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    # Serialise in memory first: pyarrow wants a seekable sink, and fsspec's remote files are not.
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(fs, path, buf.getvalue())


class PartsWriter:
    """What the shard writers share: parts committed by rename, an error or ``abort`` removing the unfinished
    ones, ``close`` idempotent, usable as a context manager (close on success, abort on error).

    Subclasses write rows in ``_write_rows`` (returning the refused ``(row index, why)``), finish the open
    part(s) in ``_finish``, list what they wrote in ``_written`` and drop unfinished temp files in ``_discard``.
    """

    _closed = False

    def write(self, table: pa.Table) -> list[tuple[int, str]]:
        """Append kept rows; returns ``(row index, why)`` for rows that cannot be published (no url, no
        usable caption, duplicate key): they are skipped, so the caller rejects them with a reason."""
        if self._closed:
            raise RuntimeError("writer is closed")
        try:
            return self._write_rows(table)
        except BaseException:
            self.abort()
            raise

    def close(self) -> list[OutputFile]:
        """Finish the open part(s); returns every file written (relpath, count, bytes, sha256) by name."""
        if not self._closed:
            try:
                self._finish()
            except BaseException:
                self.abort()
                raise
            self._closed = True
        return self._written()

    def abort(self) -> None:
        self._closed = True
        self._discard()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _write_rows(self, table: pa.Table) -> list[tuple[int, str]]:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _written(self) -> list[OutputFile]:
        raise NotImplementedError

    def _discard(self) -> None:
        raise NotImplementedError


class HashingWriter(io.RawIOBase):
    """Write-through wrapper that counts bytes and hashes them, so finished files need no re-read.

    Hashing runs on a helper thread (hashlib releases the GIL on large buffers), so it overlaps with the
    caller's encoding and I/O instead of adding to them. ``tell()`` is what ``tarfile`` in "w" mode asks
    for; position == bytes written because we only append.
    """

    _SMALL = 1 << 14  # below this, hashing inline is cheaper than a queue hop

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self.nbytes = 0
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None

    def _hash_loop(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._sha.update(chunk)

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        data = bytes(b) if not isinstance(b, bytes) else b  # the hashing thread needs an immutable copy
        self._raw.write(data)
        n = len(data)
        if n < self._SMALL and self._thread is None:
            self._sha.update(data)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._hash_loop, daemon=True)
                self._thread.start()
            self._queue.put(data)
        self.nbytes += n
        return n

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        super().close()

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()
