"""Reading the run's own parquet files (signatures, decisions, manifests, parts) through fsspec, with no
Python object left in Arrow's thread pools."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem


def read_parquet(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one parquet file whole, from a copy of its bytes that Arrow owns.

    Arrow's thread pools must never hold the last reference to a Python object: a pool thread releasing
    one while the interpreter exits needs the GIL, and the process aborts ("terminate called without an
    active exception", seen in ~1 of 3 `validate` runs). Reading through a Python file object (fsspec's)
    leaves such references in pool tasks: ``pq.read_table``'s dataset scanner callbacks, row-group decode
    tasks and ``ReadAsync`` futures hold the Python buffers they read. Copying the bytes into an
    Arrow-allocated buffer first (a local file is opened by Arrow itself) leaves nothing Python-owned to
    them. The files read here are small (manifests, signatures, decisions), so the copy costs little.
    """
    if isinstance(fs, LocalFileSystem):
        source: pa.NativeFile = pa.OSFile(path, "rb")
    else:
        sink = pa.BufferOutputStream()
        sink.write(fs.cat_file(path))
        source = pa.BufferReader(sink.getvalue())
    with source, pq.ParquetFile(source) as pf:
        return pf.read(columns=columns, use_threads=False)


@contextmanager
def open_parquet(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[pq.ParquetFile]:
    """A ParquetFile to stream from; on a local filesystem through Arrow's own file (see ``read_parquet``:
    Arrow's pool threads then hold no Python object that could abort the interpreter's exit)."""
    if isinstance(fs, LocalFileSystem):
        with pa.OSFile(path, "rb") as f, pq.ParquetFile(f) as pf:
            yield pf
    else:
        with fs.open(path, "rb") as f, pq.ParquetFile(f) as pf:
            yield pf
