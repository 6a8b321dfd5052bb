"""Near-dedup primitives against independent references: datasketch's MinHash and MinHashLSH, brute force."""

import json
import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from lmforge.data.dedup import (
    BandIndex,
    MinHasher,
    band_keys,
    bucket_edges,
    clusters,
    lsh_params,
    shingle_hashes,
)


def test_signatures_equal_datasketch_minhash(shared):
    hasher = MinHasher()
    english = (shared / "en" / "pg132_art_of_war.txt").read_text(encoding="utf-8")
    with open(shared / "zh" / "song_ci.jsonl", encoding="utf-8") as f:
        chinese = [json.loads(next(f))["text"] for _ in range(5)]
    for text in [english[:20_000], english[20_000:20_003], "", *chinese]:
        reference = MinHash(num_perm=128, seed=1, hashfunc=int)  # datasketch's default (affine32) scheme
        reference.update_batch(shingle_hashes(text).tolist())
        assert np.array_equal(hasher.signature(text), reference.hashvalues)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_params_equal_datasketch(threshold):
    assert lsh_params(threshold) == _optimal_param(threshold, 128, 0.5, 0.5)


def test_bucket_edges_and_clusters_against_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 40, 300).astype(np.uint64)
    ids = rng.permutation(1000)[:300].astype(np.uint64)
    edges = bucket_edges(keys, ids)
    expected = set()
    for key in set(keys.tolist()):
        members = sorted(ids[keys == key].tolist())
        expected |= {(members[0], m) for m in members[1:]}
    assert set(map(tuple, edges.tolist())) == expected
    # union-find components equal a breadth-first search over the same edges
    neighbours: dict[int, set[int]] = {}
    for a, b in expected:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    seen, components = set(), []
    for start in sorted(neighbours):
        if start in seen:
            continue
        stack, component = [start], set()
        while stack:
            x = stack.pop()
            if x not in component:
                component.add(x)
                stack.extend(neighbours[x] - component)
        seen |= component
        components.append(sorted(component))
    assert clusters(edges) == sorted(components)


def test_band_index_decides_like_datasketch_lsh(shared):
    """The in-memory rule (removed when a band is shared with any earlier document) equals querying
    datasketch's MinHashLSH before inserting every document, on texts with planted near copies."""
    text = (shared / "en" / "pg1342_pride_and_prejudice.txt").read_text(encoding="utf-8")
    docs = [text[i : i + 1500] for i in range(0, 150_000, 1500)]
    rng = random.Random(0)
    for i in rng.sample(range(len(docs)), 20):
        chars = list(docs[i])
        for _ in range(8):
            chars[rng.randrange(len(chars))] = "#"
        docs.append("".join(chars))
    hasher, (bands, rows) = MinHasher(), lsh_params(0.8)
    index, lsh = BandIndex(), MinHashLSH(threshold=0.8, num_perm=128)
    ours, theirs = [], []
    for n, doc in enumerate(docs):
        signature = hasher.signature(doc)
        ours.append(index.seen(band_keys(signature, bands, rows)))
        minhash = MinHash(num_perm=128, seed=1, hashvalues=signature, scheme="affine32")
        theirs.append(bool(lsh.query(minhash)))
        lsh.insert(str(n), minhash)
    assert ours == theirs
    assert sum(ours[-20:]) == 20 and sum(ours[:-20]) == 0
