"""The learned quality filter (data/quality.py): features, training, the model file, the cleaning stage."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data.clean import QUALITY_BINS, Cleaner
from lmforge.data.quality import (
    BASE,
    CHAR_NGRAMS,
    MULTIPLIERS,
    WORD_BASE,
    QualityModel,
    features,
    fit_quality_model,
    load_quality_model,
)
from lmforge.errors import DataError
from tests.conftest import require_module

M64 = (1 << 64) - 1


def reference_features(text: str, bits: int) -> dict[int, float]:
    """The feature vector of data/quality.py's docstring, in plain Python integers (no prefix-sum trick)."""
    cps = [ord(c) for c in text.lower()]

    def bucket(h: int, kind) -> int:
        return ((h * MULTIPLIERS[kind]) & M64) >> (64 - bits)

    buckets = Counter()
    for n in CHAR_NGRAMS:
        for i in range(len(cps) - n + 1):
            h = 0
            for c in cps[i : i + n]:
                h = (h * int(BASE) + c) & M64
            buckets[bucket(h, ("char", n))] += 1
    words = [w for w in "".join(chr(c) if c > 32 and c != 0x3000 else " " for c in cps).split(" ") if w]
    hashes = []
    for w in words:  # sum_j c_j Q^j over the word's own positions
        hashes.append(sum(ord(c) * pow(WORD_BASE, j, 1 << 64) for j, c in enumerate(w)) & M64)
    for h in hashes:
        buckets[bucket(h, ("word", 1))] += 1
    for a, b in zip(hashes, hashes[1:]):
        buckets[bucket((a * int(BASE) + b) & M64, ("word", 2))] += 1
    values = {k: math.log1p(v) for k, v in buckets.items()}
    norm = math.sqrt(sum(v * v for v in values.values()))
    return {k: v / norm for k, v in values.items()}


@pytest.mark.parametrize(
    "text",
    [
        "The cat sat on the mat; the cat sat.",
        "床前明月光，疑是地上霜。\u3000举头 望明月",
        "a\tb\nc  a b",
        "x",
    ],
)
def test_features_equal_a_plain_python_reference(text):
    index, values = features(text, bits=12)
    got = dict(zip(index.tolist(), values.tolist()))
    expected = reference_features(text, 12)
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) < 1e-6 for k in got)
    assert list(index) == sorted(index) and abs(np.linalg.norm(values) - 1) < 1e-6
    assert features("", bits=12)[0].size == 0


def english_paragraphs(shared, name: str, n: int) -> list[str]:
    text = (shared / "en" / name).read_text(encoding="utf-8")[30_000:]
    return [p.replace("\n", " ") for p in text.split("\n\n") if len(p) >= 300][:n]


def spoil(docs: list[str], seed: int) -> list[str]:
    """Low-quality versions: words shuffled, keyword spam, or markup and boilerplate around a few words."""
    rng = random.Random(seed)
    out = []
    for i, doc in enumerate(docs):
        words = doc.split()
        if i % 3 == 0:
            rng.shuffle(words)
            out.append(" ".join(words))
        elif i % 3 == 1:
            keys = rng.sample(words, 4)
            out.append(" ".join(rng.choice(keys) for _ in range(len(words))))
        else:
            out.append(
                " | ".join(f"<a href='/p/{rng.randint(1, 999)}'>{w}</a>" for w in words[:40]) + " Login"
            )
    return out


@pytest.fixture(scope="module")
def trained(shared):
    require_module("scipy", "filters")
    train = english_paragraphs(shared, "pg1342_pride_and_prejudice.txt", 90)
    model = fit_quality_model(train, spoil(train, seed=1), bits=14)
    return model


def test_trained_model_separates_held_out_documents_of_another_book(trained, shared):
    """Trained on 90 paragraphs of one book and their spoiled copies; measured on another book. Spam and
    markup are caught from so few examples; shuffled words only score lower (benchmarks/quality_filter.py
    measures them with thousands of examples)."""
    held = english_paragraphs(shared, "pg2701_moby_dick.txt", 60)
    good = np.array([trained.score(t) for t in held])
    bad = np.array([trained.score(t) for t in spoil(held, seed=2)])
    shuffled, spam, markup = bad[0::3], bad[1::3], bad[2::3]
    assert (good >= 0.5).mean() >= 0.95
    assert (spam < 0.5).mean() >= 0.95 and (markup < 0.5).mean() >= 0.95
    assert shuffled.mean() < good.mean() - 0.1
    assert ((good > 0) & (good < 1)).all()


def test_the_model_file_round_trips_and_a_damaged_one_is_named(trained, tmp_path, shared):
    path = trained.save(tmp_path / "q.safetensors")
    loaded = load_quality_model(path)
    doc = english_paragraphs(shared, "pg2701_moby_dick.txt", 1)[0]
    assert loaded.score(doc) == trained.score(doc) and loaded.fingerprint == trained.fingerprint
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(DataError, match="saved as .safetensors"):
        trained.save(tmp_path / "q.pt")
    with pytest.raises(DataError, match="does not exist"):
        load_quality_model(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="bad.safetensors is not a readable safetensors file"):
        load_quality_model(tmp_path / "bad.safetensors")
    from safetensors.numpy import save_file

    save_file(
        {"weight": np.zeros(8, np.float32), "bias": np.zeros(1, np.float32)}, str(tmp_path / "o.safetensors")
    )
    with pytest.raises(DataError, match="not an lmforge-quality-v1 model"):
        load_quality_model(tmp_path / "o.safetensors")


def test_cleaner_removes_documents_below_the_threshold_and_keeps_the_histogram(tmp_path):
    # a hand-made model: the bucket of the word 'spam' weighs -50, all else 0, bias +1
    bits = 10
    index, _ = features("spam", bits)
    weight = np.zeros(1 << bits, np.float32)
    word = ((int(reference_hash("spam")) * MULTIPLIERS[("word", 1)]) & M64) >> (64 - bits)
    assert word in index.tolist()
    weight[word] = -50.0
    path = QualityModel(weight=weight, bias=1.0, bits=bits).save(tmp_path / "m.safetensors")
    docs = ["good plain words here", "spam spam spam spam", "more good words", "buy spam now"]
    model = load_quality_model(path)
    scores = [model.score(d) for d in docs]
    assert scores[0] == pytest.approx(1 / (1 + math.exp(-1.0)), abs=1e-6) and scores[1] < 0.01
    cleaner = Cleaner(DataConfig(quality_model=str(path), quality_threshold=0.5))
    assert [cleaner(d) is not None for d in docs] == [True, False, True, False]
    report = cleaner.report.as_dict()
    assert report["filter_reasons"] == {"low_quality": 2}
    assert (report["stages"]["quality"]["docs_in"], report["stages"]["quality"]["docs_out"]) == (4, 2)
    q = report["quality"]
    expected = [0] * QUALITY_BINS
    for s in scores:
        expected[min(int(s * QUALITY_BINS), QUALITY_BINS - 1)] += 1
    assert q["histogram"] == expected and q["scored"] == 4
    assert q["score_sum"] == pytest.approx(sum(scores)) and q["fingerprint"] == model.fingerprint
    assert all(Cleaner(DataConfig(quality_model=str(path), quality_threshold=0.0))(d) for d in docs)
    with pytest.raises(DataError, match="data.quality_model: .*nope.safetensors does not exist"):
        Cleaner(DataConfig(quality_model=str(tmp_path / "nope.safetensors")))


def reference_hash(word: str) -> int:
    return sum(ord(c) * pow(WORD_BASE, j, 1 << 64) for j, c in enumerate(word)) & M64


def test_cli_train_quality_measures_held_out_documents(tmp_path, shared, capsys):
    require_module("scipy", "filters")
    from lmforge.cli import main

    good = english_paragraphs(shared, "pg1342_pride_and_prejudice.txt", 80)
    (tmp_path / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in good))
    bad = [t for i, t in enumerate(spoil(good, 3)) if i % 3]  # spam and markup (see the test above)
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in bad))
    out = tmp_path / "model.safetensors"
    args = ["data", "train-quality", "--positive", str(tmp_path / "good.jsonl"), "--negative"]
    assert main([*args, str(tmp_path / "bad.jsonl"), "--out", str(out), "--holdout", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and load_quality_model(out).bits == 18
    numbers = printed.split("held out ")[1]
    held_pos, held_neg = (int(x) for x in numbers.split(":")[0].split(" + "))
    assert 10 <= held_pos <= 30 and 5 <= held_neg <= 25 and held_pos + held_neg < 134
    precision = float(numbers.split("precision ")[1].split(",")[0])
    recall = float(numbers.split("recall ")[1].split(" ")[0])
    assert precision >= 0.9 and recall >= 0.9
