"""``lmforge data train-quality``: a quality model (``data.quality``) trained from example files of good and
bad documents, read and normalised as ``lmforge data prepare`` reads them, with a held-out share measured.

Its own module because it reads sources and normalises as the cleaning stage does (``data.clean``), while the
cleaning stage itself loads quality models: the two stay one-way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmforge.data.clean import normalize
from lmforge.data.quality import fit_quality_model, precision_recall
from lmforge.data.sources import SourceStats, expand_sources, read_documents
from lmforge.errors import DataError


def read_examples(sources: list[str], cfg) -> list[str]:
    """The normalised documents of ``sources`` (files, folders, globs), cut as ``lmforge data prepare`` cuts
    them (``cfg``: a DataConfig), without the empty ones."""
    docs = read_documents(
        expand_sources(sources),
        text_field=cfg.text_field,
        chunk_chars=cfg.text_chunk_chars,
        stats=SourceStats(),
        split=cfg.split,
        max_chars=cfg.max_chars,
        encoding=cfg.encoding,
    )
    return [text for text in (normalize(doc.text) for doc in docs) if text.strip()]


def held_out(text: str, fraction: float, seed: int) -> bool:
    """Whether ``text`` is in the held-out share (by a hash of its text and the seed: exact copies agree)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def train_quality(
    positive: list[str],
    negative: list[str],
    out: str | Path,
    cfg,
    *,
    holdout: float = 0.1,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict:
    """Train a model on the documents of ``positive`` against those of ``negative`` (sources as for
    ``prepare``), keeping a ``holdout`` share of each aside; save it to ``out`` and return the counts and
    the held-out precision and recall at ``threshold``."""
    if not 0.0 <= holdout < 1.0:
        raise DataError(f"--holdout={holdout} must be in [0, 1)")
    pos, neg = read_examples(positive, cfg), read_examples(negative, cfg)
    test_pos = [t for t in pos if held_out(t, holdout, seed)]
    test_neg = [t for t in neg if held_out(t, holdout, seed)]
    train_pos = [t for t in pos if not held_out(t, holdout, seed)]
    train_neg = [t for t in neg if not held_out(t, holdout, seed)]
    model = fit_quality_model(train_pos, train_neg)
    path = model.save(out)
    result = {"model": str(path), "train_positives": len(train_pos), "train_negatives": len(train_neg)}
    result["held_out"] = precision_recall(
        [model.score(t) for t in test_pos], [model.score(t) for t in test_neg], threshold
    )
    return result
