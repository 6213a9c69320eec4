"""Resolve image references that come from data (a parquet path column, an MMC4 image_name) safely.

A dataset is data, not configuration: a downloaded parquet must not be able to make a worker read
``/etc/passwd`` or a cluster token into an output that gets shared, nor fetch an internal address. So a
reference resolves only *inside* the source's configured root (``image_root`` / ``image_dir``, any
fsspec filesystem); for a local root the resolved real path is checked too, so a symlink inside the
folder that leads out of it is refused. A URL reference is fetched only when the source sets
``fetch_remote: true`` and its scheme is in ``fetch_schemes`` (the address check happens at connect time
in :mod:`pipelines.io.readers.fetch`). Anything else raises :class:`UnsafeRef`; readers quarantine the row
with ``image_path_unsafe`` and never read the bytes.

fsspec has no "open beneath this folder" primitive, so the containment check is written here.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from fsspec.spec import AbstractFileSystem

from vila2_curate.pipelines.io.readers.base import SourceFormatError
from vila2_curate.schemas.config import SourceConfig

UNSAFE_REASON = "image_path_unsafe"
_HTTP_SCHEMES = ("http", "https")


class UnsafeRef(ValueError):
    """A data reference that would reach outside its source's root; ``why`` goes into the row's meta."""

    def __init__(self, ref: str, why: str) -> None:
        super().__init__(f"{why}: {ref[:200]!r}")
        self.why = why


def scheme_of(ref: str) -> str | None:
    """The URL scheme of a reference (``"s3"``, ``"file"``...), None for a plain path.

    fsspec chains (``simplecache::s3://``) count as a scheme too; Windows drive letters do not occur
    in POSIX data and are treated as schemes (refused) rather than guessed at.
    """
    if "::" in ref:
        return ref.split("::", 1)[0].split("://", 1)[0].lower() or "chained"
    head, sep, _ = ref.partition(":")
    if sep and head and head.replace("+", "").replace("-", "").replace(".", "").isalnum() and "/" not in head:
        return head.lower()
    return None


def _is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _inside(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") or root == ""


@dataclass(frozen=True)
class Resolved:
    """Where a reference points: a path on the root's filesystem, or an http(s) URL to fetch."""

    path: str | None = None
    url: str | None = None


class ImageRoot:
    """One source's image folder; :meth:`resolve` maps a data reference to a path inside it or refuses."""

    def __init__(self, fs: AbstractFileSystem, path: str, source: SourceConfig, *, http_root: str | None = None):
        self.fs = fs
        self.source = source
        self.local = _is_local(fs)
        self.http_root = http_root  # an http(s) image_root: relative refs become URLs under it
        path = path.rstrip("/") if path not in ("", "/") else path
        if self.local:
            path = os.path.abspath(path)
        self.path = path
        self._real = os.path.realpath(path) if self.local else None

    @classmethod
    def from_config(cls, url: str, source: SourceConfig, fallback: tuple[AbstractFileSystem, str]) -> ImageRoot:
        """The configured root (``url``), or ``fallback`` (the data file's folder) when none is set."""
        from vila2_curate.pipelines.io.readers._common import (
            url_to_fs,  # late: _common imports this module's users
        )

        if not url:
            fs, path = fallback
            return cls(fs, path, source)
        if (scheme_of(url) or "") in _HTTP_SCHEMES:
            if not source.fetch_remote:
                raise SourceFormatError(
                    f"source {source.name!r}: image root {url!r} is an http(s) URL: set fetch_remote: true "
                    "to download images from it")
            fs, path = url_to_fs(url, source.storage_options)
            return cls(fs, path, source, http_root=url.rstrip("/"))
        fs, path = url_to_fs(url, source.storage_options)
        return cls(fs, path, source)

    # ---------------------------------------------------------------------------------------- resolve

    def resolve(self, ref: str) -> Resolved:
        """A data reference -> a path inside this root, or an allowed URL; raises UnsafeRef otherwise."""
        if not isinstance(ref, str) or ref == "":
            raise UnsafeRef(str(ref), "empty reference")
        if "\x00" in ref or any(ord(c) < 0x20 for c in ref):
            raise UnsafeRef(ref, "control character in reference")
        scheme = scheme_of(ref)
        if scheme is not None:
            return self._resolve_url(ref, scheme)
        if ref.startswith(("/", "\\")):
            return Resolved(path=self._check_absolute(ref))
        parts = ref.replace("\\", "/").split("/")
        if ".." in parts:
            raise UnsafeRef(ref, "'..' in a relative reference")
        if ref.startswith("~"):
            raise UnsafeRef(ref, "home-directory reference")
        if self.http_root is not None:
            # the reference is a path, not a URL: '%' is quoted too, so '%2e%2e/' cannot become '../' on
            # the server, and '?' / '#' stay part of the name
            return Resolved(url=f"{self.http_root}/{quote(ref, safe='/:@!$&()*+,;=-._~')}")
        joined = posixpath.normpath(posixpath.join(self.path, ref)) if self.path else posixpath.normpath(ref)
        if not _inside(joined, self.path):
            raise UnsafeRef(ref, "resolves outside the image root")
        return Resolved(path=self._check_real(ref, joined))

    def _resolve_url(self, ref: str, scheme: str) -> Resolved:
        s = self.source
        if scheme in _HTTP_SCHEMES:
            if not s.fetch_remote:
                raise UnsafeRef(ref, f"{scheme} reference but the source does not set fetch_remote: true")
            if scheme not in s.fetch_schemes:
                raise UnsafeRef(ref, f"scheme {scheme!r} not in fetch_schemes {list(s.fetch_schemes)}")
            if not urlsplit(ref).hostname:
                raise UnsafeRef(ref, "URL without a host")
            return Resolved(url=ref)
        # another filesystem URL: allowed only when it names a path inside this root on the same protocol
        # (e.g. s3://bucket/images/x.jpg under image_root s3://bucket/images), never file:// or another bucket
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "::" in ref or scheme not in protocols or self.local:
            raise UnsafeRef(ref, f"scheme {scheme!r} outside the source's image root")
        path = self.fs._strip_protocol(ref)  # fsspec's own URL -> path mapping for this filesystem
        if ".." in path.split("/"):
            raise UnsafeRef(ref, "'..' in a reference")
        if not _inside(posixpath.normpath(path), self.path):
            raise UnsafeRef(ref, "resolves outside the image root")
        return Resolved(path=path)

    def _check_absolute(self, ref: str) -> str:
        if self.http_root is not None or not self.local:
            raise UnsafeRef(ref, "absolute path")
        if ".." in ref.split("/"):
            raise UnsafeRef(ref, "'..' in a reference")
        norm = posixpath.normpath(ref)
        if not _inside(norm, self.path):
            raise UnsafeRef(ref, "absolute path outside the image root")
        return self._check_real(ref, norm)

    def _check_real(self, ref: str, path: str) -> str:
        """For a local root: the real path (symlinks followed) must still be inside the root's real path.

        The checked real path is what gets opened, so a link swapped after the check cannot redirect the
        final component (intermediate folders are the remaining, much narrower, race).
        """
        if not self.local:
            return path
        real = os.path.realpath(path)
        assert self._real is not None
        if not _inside(real, self._real):
            raise UnsafeRef(ref, "a symlink leads outside the image root")
        return real

    def read(self, path: str) -> bytes:
        """Bytes of a path :meth:`resolve` returned (never a raw reference)."""
        if self.local:
            # O_NOFOLLOW: the checked real path must not have become a symlink since the check
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                return f.read()
        with self.fs.open(path, "rb") as f:
            return f.read()

