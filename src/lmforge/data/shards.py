"""Pieces shared by both ways of preparing data (``prepare.py``'s stream and ``partitioned.py``'s stages):
the train/val draw, the document encoder, the shard writer and atomic JSON files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.tokenizer import Tokenizer, load_tokenizer, tiktoken_encoding
from lmforge.errors import DataError
from lmforge.files import write_text_atomic

TIKTOKEN_SAMPLE_CHARS = 100_000  # kept text on which tiktoken must match tokenizers before it is used
CHECK_EVERY = 100  # with tiktoken: check one document in this many against tokenizers


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); delete the folder and prepare it again") from None


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def split_score(key: bytes, seed: int) -> float:
    h = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") / 2**64


class DocumentEncoder:
    """Documents -> id arrays ending in end-of-text, through ``tokenizers`` or, where it gives exactly the
    same ids, ``tiktoken``. One document at a time, single-threaded: the parallelism is the processes.
    Every ``CHECK_EVERY``-th document encoded by tiktoken is checked against ``tokenizers`` as well."""

    def __init__(self, tokenizer_path: str, use_tiktoken: bool):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.fast = tiktoken_encoding(self.tokenizer, []) if use_tiktoken else None
        self.count = 0

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            if self.fast is None:
                ids = self.tokenizer.encode(text)
            else:
                ids = self.fast.encode_ordinary(text)
                if self.count % CHECK_EVERY == 0 and ids != self.tokenizer.encode(text):
                    raise DataError(
                        f"tiktoken and tokenizers disagree on a document starting {text[:60]!r}; "
                        f"set data.encoder=tokenizers"
                    )
            self.count += 1
            row = np.empty(len(ids) + 1, dtype=np.uint32)
            row[:-1] = ids
            row[-1] = self.tokenizer.eot_id
            out.append(row)
        return out


def choose_encoder(cfg: DataConfig, tokenizer: Tokenizer, sample: list[str]) -> bool:
    """True when tiktoken encodes exactly like the tokenizer on ``sample`` (the first kept documents)."""
    return cfg.encoder == "auto" and tokenizer.tiktoken_encoder(sample) is not None


class ShardWriter:
    """Appends documents to ``{split}_{index:05d}.bin``; a shard is renamed from ``.tmp`` once full."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int, done: list[dict]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.done = done
        self.file = None
        self.tokens = self.docs = self.max_id = 0

    def add(self, ids: np.ndarray) -> bool:
        """Write one document's ids (separator included); True when this closed a shard."""
        if self.file is None:
            self.file = open(self._path(".tmp"), "wb")
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        self.tokens += len(ids)
        self.docs += 1
        if self.tokens >= self.shard_tokens:
            self.close()
            return True
        return False

    def _path(self, suffix: str = "") -> Path:
        return self.out / f"{self.split}_{len(self.done):05d}.bin{suffix}"

    def close(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self._path(".tmp"), self._path())
        entry = {"file": self._path().name, "tokens": self.tokens, "docs": self.docs, "max_id": self.max_id}
        self.done.append(entry)  # max_id: checked against the vocabulary when training opens the shard
        self.tokens = self.docs = self.max_id = 0
