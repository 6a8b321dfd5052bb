"""Fixtures for the data pipeline tests: small real corpora from ../shared/data and synthetic hard cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.tokenizer import train_bpe
from tests.conftest import SHARED_DATA, require_shared_data

SHARED = SHARED_DATA

# Synthetic documents that stress the round trip: emoji (with joiners and skin tones), code, CRLF and lone CR
# line ends, odd whitespace (tabs, NBSP, ideographic space, zero-width space), combining marks, a 4-byte CJK
# character, a literal special-token spelling, and a real U+FFFD.
SYNTHETIC = [
    "Family: 👨‍👩‍👧‍👦, thumbs 👍🏽, flags 🇫🇷🇯🇵 and a 🦄.\n",
    'def f(x):\r\n\tif x > 0:\r\n\t\treturn {"k": [x ** 2, x // 3]}  # ok\r\n\treturn None\r\n',
    "old\rmac\rline\rends and\u00a0NBSP,\u3000ideographic space,\u200bzero width, trailing   \n\n\n",
    "Cafe\u0301 (combining) vs Café, 𠀀 (U+20000), 中文标点：「你好」。Ελληνικά, русский, עברית, العربية",
    "a document that mentions <|endoftext|> and <|pad|> literally \ufffd\n",
    "    leading spaces, a very long word " + "x" * 3000 + " and done",
]


def needs_shared() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def synthetic() -> list[str]:
    return list(SYNTHETIC)


@pytest.fixture(scope="session")
def shared() -> Path:
    return needs_shared()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, shared) -> Path:
    """A small mixed corpus folder: English (CRLF, BOM), Chinese JSONL and synthetic JSONL."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "en").mkdir()
    for name in ("pg1342_pride_and_prejudice.txt", "pg132_art_of_war.txt"):
        (root / "en" / name).write_bytes((shared / "en" / name).read_bytes()[:60_000])
    with open(shared / "zh" / "tang_poems.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    (root / "tang.jsonl").write_text("".join(lines), encoding="utf-8")
    with open(root / "synthetic.jsonl", "w", encoding="utf-8") as f:
        for text in SYNTHETIC:
            f.write(json.dumps({"text": text, "id": 1}, ensure_ascii=False) + "\n")
    return root


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory, shared) -> Path:
    """A small byte-level BPE trained on English and Chinese, saved as tokenizer.json."""
    texts = [(shared / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]]
    with open(shared / "zh" / "song_ci.jsonl", encoding="utf-8") as f:
        texts += [json.loads(next(f))["text"] for _ in range(500)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(texts, 800).save(path)
    return path
