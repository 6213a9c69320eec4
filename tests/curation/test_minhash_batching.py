"""MinHash signatures do not depend on batching: the chunked (perms x shingles) matrix gives each text
the value a one-text-at-a-time computation gives, including texts that fill or straddle a chunk."""

from __future__ import annotations

import numpy as np

from vila2_curate.curation.dedup import minhash


def _one_by_one(texts: list[str], num_perm: int, k: int, seed: int) -> np.ndarray:
    """The textbook definition per text: min over shingles of ((a*x + b) mod 2^64) >> 32."""
    a, b = minhash.permutations(num_perm, seed)
    out = np.full((len(texts), num_perm), minhash.EMPTY, dtype=np.uint32)
    for i, text in enumerate(texts):
        sh, _ = minhash.shingle_hashes([text], k)
        if sh.size:
            out[i] = ((np.multiply.outer(sh, a) + b) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    return out


def test_batched_signatures_equal_one_text_at_a_time() -> None:
    rng = np.random.default_rng(3)
    num_perm = 64
    per_chunk = minhash._CHUNK_CELLS // num_perm  # shingles per chunk
    texts = [" ".join(f"w{int(x)}" for x in rng.integers(0, 300, size=int(n)))
             for n in rng.integers(0, 60, size=200)]
    texts += ["", "single", " ".join(f"v{i}" for i in range(per_chunk + 5))]  # one text larger than a chunk
    texts += [" ".join(f"u{i}" for i in range(per_chunk // 3)) for _ in range(4)]  # texts straddling chunks
    batched = minhash.minhash_signatures(texts, num_perm=num_perm, shingle_words=3, seed=11)
    assert batched.dtype == np.uint32 and batched.shape == (len(texts), num_perm)
    assert np.array_equal(batched, _one_by_one(texts, num_perm, 3, 11))
    assert (batched[200] == minhash.EMPTY).all() and not (batched[201] == minhash.EMPTY).any()
