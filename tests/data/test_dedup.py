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


def test_shingles_are_the_lowercased_whitespace_collapsed_character_5_grams():
    text = "The  quick brown\nFox jumps over\tthe lazy dog"
    norm = "the quick brown fox jumps over the lazy dog"
    grams = [norm[i : i + 5] for i in range(len(norm) - 4)]
    hashes = shingle_hashes(text)
    assert len(hashes) == len(grams)  # every 5-gram, the last one included, repeats kept
    inner = [i for i, g in enumerate(grams) if g == g.strip()]  # (alone, a gram's edge spaces would go)
    assert len(inner) > 20
    assert [int(hashes[i]) for i in inner] == [int(shingle_hashes(grams[i])[0]) for i in inner]
    assert len(set(hashes.tolist())) == len(set(grams))  # distinct 5-grams, distinct hashes here
    assert np.array_equal(MinHasher().signature(text), MinHasher().signature(norm))


def test_signatures_estimate_the_jaccard_similarity_of_the_5_gram_sets(shared):
    text = (shared / "en" / "pg132_art_of_war.txt").read_text(encoding="utf-8")[:3000]
    rng = random.Random(1)
    hasher = MinHasher()
    for edits in (30, 150, 600):
        chars = list(text)
        for _ in range(edits):
            chars[rng.randrange(len(chars))] = rng.choice("#@%")
        other = "".join(chars)
        a, b = (" ".join(t.lower().split()) for t in (text, other))
        a, b = ({t[i : i + 5] for i in range(len(t) - 4)} for t in (a, b))
        exact = len(a & b) / len(a | b)
        estimate = float(np.mean(hasher.signature(text) == hasher.signature(other)))
        sigma = (exact * (1 - exact) / 128) ** 0.5  # the standard error of 128 permutations
        assert abs(estimate - exact) < 4 * sigma + 0.01, (edits, estimate, exact)


def test_band_keys_of_different_bands_never_meet():
    """Band 0 of one document equal to band 1 of another is no shared bucket (datasketch keeps one table
    per band); equal bands at the same index are."""
    bands, rows = 4, 3
    first = np.arange(12, dtype=np.uint32)
    second = np.arange(100, 112, dtype=np.uint32)
    second[rows : 2 * rows] = first[:rows]  # its band 1 holds the values of the first's band 0
    a, b = band_keys(first, bands, rows), band_keys(second, bands, rows)
    assert len(set(a.tolist())) == bands and not set(a.tolist()) & set(b.tolist())
    third = second.copy()
    third[2 * rows : 3 * rows] = first[2 * rows : 3 * rows]  # band 2 equal at the same index
    assert set(band_keys(third, bands, rows).tolist()) & set(a.tolist()) == {int(a[2])}
    index = BandIndex()
    assert [index.seen(k) for k in (a, b, band_keys(third, bands, rows))] == [False, False, True]


def test_a_removed_document_still_marks_its_buckets():
    """Every document is inserted, removed or not: C shares a bucket only with B, which went because it
    shares one with A; C goes too (the partitioned rule: C is a later member of B's bucket)."""
    index = BandIndex()
    a, b, c = (np.array(keys, dtype=np.uint64) for keys in ([1, 2], [2, 3], [3, 4]))
    assert [index.seen(a), index.seen(b), index.seen(c)] == [False, True, True]
    edges = bucket_edges(
        np.array([1, 2, 2, 3, 3, 4], dtype=np.uint64), np.array([0, 0, 1, 1, 2, 2], dtype=np.uint64)
    )
    assert sorted(map(tuple, edges.tolist())) == [(0, 1), (1, 2)]  # the later ids: 1 and 2, as the index
