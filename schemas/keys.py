"""Sample keys: dot-free, short, filesystem- and tar-safe, rewritten deterministically when needed.

VILA's WebDataset reader splits a member name at its first dot into key and extension, so a dot in a
key would split one sample into two; member names must also fit the 100-byte ustar name field.
"""

from __future__ import annotations

import hashlib
import re

MAX_KEY_LEN = 80  # leaves room for ".json" and a 3-level relative folder inside 100 bytes
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(raw: str) -> str:
    """Return ``raw`` if it is already a safe key, else a deterministic safe rewrite of it.

    The rewrite replaces unsafe characters with ``_`` and appends 8 hex chars of the original's sha1,
    so two originals that differ only in unsafe characters never collide.
    """
    if raw and len(raw) <= MAX_KEY_LEN and not _UNSAFE.search(raw):
        return raw
    digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = _UNSAFE.sub("_", raw)[: MAX_KEY_LEN - 9] or "k"
    return f"{stem}-{digest}"


def is_safe_key(key: str) -> bool:
    return bool(key) and len(key) <= MAX_KEY_LEN and not _UNSAFE.search(key)
