"""Every document the cleaning keeps reaches the shards, whole and once, with near-dedup, PII scrubbing and
the filters switched on: the shards are decoded and compared with documents worked out by hand."""

import json
import random

import numpy as np
import pytest

from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data
from lmforge.data.tokenizer import load_tokenizer

# 2,000 made-up words: distinct essays share few character 5-grams, so only planted copies are near copies
_letters = random.Random(5)
WORDS = ["".join(_letters.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(2000)]


def essay(rng: random.Random, n_words: int = 120) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def corpus(rng: random.Random) -> tuple[list[str], list[str], dict]:
    """(documents as written, the documents expected in the shards in order, expected removal counts)."""
    written, kept = [], []
    for i in range(60):
        text = f"Essay {i}.\n" + essay(rng)
        written.append(text)
        kept.append(text)
        if i % 10 == 3:  # an exact copy, and a near copy (one word of ~130 changed): both removed
            written.append(text)
            words = text.split(" ")
            words[40] = "zeppelin"
            written.append(" ".join(words))
        if i % 10 == 5:  # too short, and mostly repeated lines: removed by the filters
            written += ["tiny", "same line again\n" * 8 + "one other line\n"]
        if i % 10 == 7:  # PII: kept, scrubbed (a body of its own, or the letters would be near copies)
            body = essay(rng, 48)
            written.append(
                f"Letter {i}: write to ada.l{i}@example.org or call +1 555-123-4567 from 10.0.0.{i}.\n{body}"
            )
            kept.append(f"Letter {i}: write to <EMAIL> or call <PHONE> from <IP_ADDRESS>.\n{body}")
    removed = {"exact_dedup": 6, "near_dedup": 6, "too_short": 6, "repeated_lines": 6}
    return written, kept, removed


def decoded_documents(out, meta, tokenizer) -> dict[str, list[str]]:
    docs = {}
    for split, info in meta["splits"].items():
        ids = np.concatenate(
            [np.fromfile(out / shard["file"], dtype=meta["dtype"]) for shard in info["shards"]]
        )
        ends = np.flatnonzero(ids == tokenizer.eot_id)
        assert len(ids) == 0 or ends[-1] == len(ids) - 1  # every document ends in end-of-text
        docs[split] = [tokenizer.decode(ids[a + 1 : b].tolist()) for a, b in zip([-1, *ends[:-1]], ends)]
    return docs


@pytest.mark.parametrize(("tokenizer", "workers"), [("char", 1), ("bpe", 2)])
def test_every_kept_document_reaches_the_shards_with_all_cleaning_on(tmp_path, tokenizer, workers):
    written, expected, removed = corpus(random.Random(11))
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in written), encoding="utf-8")
    cfg = DataConfig(
        tokenizer=tokenizer, vocab_size=300, near_dedup=True, scrub_pii=True, min_chars=20,
        max_repeated_line_fraction=0.5, val_fraction=0.2, shard_tokens=3000, workers=workers, seed=3,
    )  # fmt: skip
    out = tmp_path / "prepared"
    meta = prepare_data(cfg, [str(source)], out, progress=False)
    report = json.loads((out / "report.json").read_text())

    stages = report["stages"]
    assert stages["read"]["docs_in"] == len(written)
    assert stages["near_dedup"]["docs_out"] == len(expected) == meta["documents"]  # the report's kept count
    assert stages["exact_dedup"]["docs_in"] - stages["exact_dedup"]["docs_out"] == removed["exact_dedup"]
    assert stages["near_dedup"]["docs_in"] - stages["near_dedup"]["docs_out"] == removed["near_dedup"]
    assert report["filter_reasons"] == {"too_short": 6, "repeated_lines": 6}
    assert report["pii_replaced"] == {"<EMAIL>": 6, "<PHONE>": 6, "<IP_ADDRESS>": 6}

    docs = decoded_documents(out, meta, load_tokenizer(out / "tokenizer.json"))
    assert len(meta["splits"]["train"]["shards"]) > 1 and docs["val"]  # several shards, both splits
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)  # each kept document once, byte for byte
    for split in ("train", "val"):  # and in the order they were read
        positions = [expected.index(d) for d in docs[split]]
        assert positions == sorted(positions), split
        assert sum(s["docs"] for s in meta["splits"][split]["shards"]) == len(docs[split])


def test_an_ip_address_ending_a_sentence_is_scrubbed_and_version_numbers_are_not():
    from lmforge.data.clean import scrub_pii

    counts = {}
    assert scrub_pii("served from 10.0.0.7. Then 192.168.1.1, v1.2.3.4.5", counts) == (
        "served from <IP_ADDRESS>. Then <IP_ADDRESS>, v1.2.3.4.5"
    )
    assert counts == {"<IP_ADDRESS>": 2}
