"""A tiny training config on generated text, small enough that a sweep trial takes seconds on a CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

WORDS = "the cat sat on a mat and dog ran to his red hat while she saw it by our old big sun".split()


def write_config(folder: Path, **train) -> Path:
    """``folder/c.yaml``: a 1-layer char model on ~30k characters of seeded text (written beside it)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(900)]
    paragraphs = [
        "\n".join(lines[i : i + 6]) for i in range(0, len(lines), 6)
    ]  # documents: cut at blank lines
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs) + "\n")
    data = {
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "ffn_hidden": 64, "max_seq_len": 32},
        "data": {"sources": [str(corpus)], "tokenizer": "char", "val_fraction": 0.1},
        "train": {
            "steps": 12,
            "seq_len": 32,
            "micro_batch": 8,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "eval_every": 4,
            "eval_batches": 2,
            "log_every": 2,
            "ckpt_every": 1000,
            "sample_prompts": [],
            "trackers": [],
            "device": "cpu",
            "out_dir": str(folder / "unused"),
            **train,
        },
    }
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    """A fresh lmforge cache for this test (prepared data), for the sweep and every trial it starts."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))
    return cache
