"""Near-duplicate detection that gives the same decisions in memory and over partitions on disk.

A document's MinHash signature (``NUM_PERM`` values over its character 5-gram hashes) is computed with
fixed permutations, the ones ``datasketch.MinHash(seed=1)`` draws (its default ``affine32`` scheme:
a MurmurHash3 mix, then a 32-bit multiply-add), so every worker, every process and the in-memory index
agree bit for bit (tested against datasketch). The signature is cut into ``bands`` of
``rows`` values (the (b, r) that datasketch's ``MinHashLSH`` picks for the threshold); each band becomes one
64-bit key that also encodes the band's index, so one key space serves all bands.

The decision rule is local to an LSH bucket, so a streaming index and a partitioned job compute it alike:
**a document is a near duplicate when it shares a band key with an earlier document** (smaller document
id = earlier in input order) that survived exact dedup. The first document of every bucket is kept. This
never removes a document only because it resembles a document that resembles it (no transitive chains);
the connected components of the "shares a bucket" graph (union-find) are the duplicate clusters that
the report counts. The partitioned path (``data/partitioned.py``) writes band records sorted per band
partition, turns each bucket into edges (first id, later id) and takes the removal list as the later ids.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

NGRAM = 5
NUM_PERM = 128
SEED = 1
MAX_HASH = np.uint32((1 << 32) - 1)
BLOCK = 1024  # shingles per block while computing a signature: bounds the (NUM_PERM, BLOCK) temporary


def shingle_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """32-bit hashes of the character n-grams of ``text`` (lowercased, whitespace collapsed). (N,) uint32"""
    text = " ".join(text.lower().split())
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.zeros(1, dtype=np.uint32)
    n = min(n, len(codes))
    width = len(codes) - n + 1
    h = np.zeros(width, dtype=np.uint64)
    for j in range(n):
        h = (h * np.uint64(1_000_003)) ^ codes[j : j + width]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return (h & np.uint64(0xFFFFFFFF)).astype(np.uint32)  # repeats stay: a minimum does not mind them


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (a bijection that spreads the input hashes), as datasketch applies it."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def permutations(num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the permutations ``a*h + b mod 2^32`` (a odd: a bijection), drawn as datasketch's
    default ``affine32`` scheme draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


class MinHasher:
    """Signatures of texts: vectorised over permutations and shingles, in blocks of ``BLOCK`` shingles."""

    def __init__(self, num_perm: int = NUM_PERM, seed: int = SEED):
        a, b = permutations(num_perm, seed)
        self.a, self.b = a[:, None], b[:, None]

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32, equal to ``datasketch.MinHash(num_perm, seed).hashvalues`` for the shingles."""
        shingles = fmix32(shingle_hashes(text))
        out = np.full(len(self.a), MAX_HASH, dtype=np.uint32)
        for start in range(0, len(shingles), BLOCK):
            x = self.a * shingles[None, start : start + BLOCK]  # (P, S), wraps mod 2^32
            x += self.b
            np.minimum(out, x.min(axis=1), out=out)
        return out


@functools.cache
def lsh_params(threshold: float, num_perm: int = NUM_PERM, steps: int = 1000) -> tuple[int, int]:
    """(bands, rows) minimising the equally weighted false positive and negative areas around ``threshold``
    (the rule datasketch's MinHashLSH uses)."""

    def area(f, lo: float, hi: float) -> float:
        x = np.linspace(lo, hi, steps + 1)
        y = f(x)
        return float(np.sum((y[1:] + y[:-1]) / 2) * (hi - lo) / steps)

    best, params = float("inf"), (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = area(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)
            fn = area(lambda s, b=b, r=r: 1 - (1 - (1 - s**r) ** b), threshold, 1.0)
            if 0.5 * fp + 0.5 * fn < best:
                best, params = 0.5 * fp + 0.5 * fn, (b, r)
    return params


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band (the band's index is part of the hashed bytes). (bands,) uint64"""
    keys = np.empty(bands, dtype=np.uint64)
    for i in range(bands):
        data = i.to_bytes(2, "little") + signature[i * rows : (i + 1) * rows].tobytes()
        keys[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return keys


class BandIndex:
    """The in-memory index: ``seen(keys)`` is True when an earlier document shared one of the band keys.
    Every document that reaches it is inserted, removed or not, so the decision equals the partitioned one."""

    def __init__(self):
        self.keys: set[int] = set()

    def seen(self, keys: np.ndarray) -> bool:
        values = keys.tolist()
        duplicate = any(k in self.keys for k in values)
        self.keys.update(values)
        return duplicate


def bucket_edges(keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(first id, later id) for every later member of every bucket of equal ``keys``. (E, 2) uint64"""
    if len(keys) == 0:
        return np.empty((0, 2), dtype=np.uint64)
    order = np.lexsort((ids, keys))
    keys, ids = keys[order], ids[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    first = np.repeat(ids[starts], np.diff(np.concatenate([starts, [len(keys)]])))
    later = np.ones(len(keys), dtype=bool)
    later[starts] = False
    return np.stack([first[later], ids[later]], axis=1)


def clusters(edges: np.ndarray) -> list[list[int]]:
    """Connected components (union-find with path halving) of the documents in ``edges``, each sorted."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values())
