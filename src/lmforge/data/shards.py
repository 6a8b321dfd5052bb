"""Pieces shared by both ways of preparing data (``prepare.py``'s stream and ``partitioned.py``'s stages):
the train/val draw, the document encoder, the shard writer and atomic JSON files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.tokenizer import Tokenizer, load_tokenizer, text_pieces, tiktoken_encoding
from lmforge.errors import DataError
from lmforge.files import write_text_atomic

TIKTOKEN_SAMPLE_CHARS = 100_000  # kept text on which tiktoken must match tokenizers before it is used
CHECK_EVERY = 100  # with tiktoken: check one document in this many against tokenizers
PIECE_CHARS = 1 << 16  # a longer document is encoded in pieces of about this many characters


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
    Every ``CHECK_EVERY``-th document encoded by tiktoken is checked against ``tokenizers`` as well.

    A document longer than ``piece_chars`` is encoded in pieces cut where the tokenizer splits anyway
    (``tokenizer.text_pieces``; the same ids as encoding it whole), so a worker's memory follows the piece,
    not the document: both engines keep several bytes per token of bookkeeping while they encode (a 10 MB
    document took a worker to 1.9 GB). A tokenizer that cannot be cut safely (``cuts_safely``) encodes whole.
    ``piece_chars=0`` encodes every document whole."""

    def __init__(self, tokenizer_path: str, use_tiktoken: bool, piece_chars: int = PIECE_CHARS):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.fast = tiktoken_encoding(self.tokenizer, []) if use_tiktoken else None
        self.piece_chars = piece_chars if piece_chars > 0 and self.tokenizer.cuts_safely else 0
        self.count = 0

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            check = self.fast is not None and self.count % CHECK_EVERY == 0
            pieces = text_pieces(text, self.piece_chars) if self.piece_chars else [text]
            rows = [self._encode(piece, check) for piece in pieces]
            self.count += 1
            rows.append(np.array([self.tokenizer.eot_id], dtype=np.uint32))
            out.append(np.concatenate(rows) if len(rows) > 1 else rows[0])
        return out

    def _encode(self, text: str, check: bool) -> np.ndarray:
        if self.fast is None:
            return np.asarray(self.tokenizer.encode(text), dtype=np.uint32)
        ids = self.fast.encode_ordinary(text)
        if check and ids != self.tokenizer.encode(text):
            raise DataError(
                f"tiktoken and tokenizers disagree on a document piece starting {text[:60]!r}; "
                f"set data.encoder=tokenizers"
            )
        return np.asarray(ids, dtype=np.uint32)


def choose_encoder(cfg: DataConfig, tokenizer: Tokenizer, sample: list[str]) -> bool:
    """True when tiktoken encodes exactly like the tokenizer on ``sample`` (the first kept documents)."""
    return cfg.encoder == "auto" and tokenizer.tiktoken_encoder(sample) is not None


class ShardWriter:
    """Appends documents to ``{split}_{index:05d}.bin``; a shard is renamed from ``.tmp`` once full. Its entry
    in meta.json records its tokens, documents, largest id and SHA-256 (hashed as it is written), locally as
    on object storage."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int, done: list[dict]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.done = done
        self.file = None
        self.digest = hashlib.sha256()
        self.tokens = self.docs = self.max_id = 0

    def add(self, ids: np.ndarray) -> bool:
        """Write one document's ids (separator included); True when this closed a shard."""
        if self.file is None:
            self.file = open(self._path(".tmp"), "wb")
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.digest.update(data)
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
        entry["sha256"] = self.digest.hexdigest()
        self.done.append(entry)  # max_id: checked against the vocabulary when training opens the shard
        self.digest = hashlib.sha256()
        self.tokens = self.docs = self.max_id = 0
