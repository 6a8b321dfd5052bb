"""A tiny base checkpoint with a char tokenizer, for fine-tuning tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.model.transformer import build_model
from tests.conftest import SHARED_DATA, require_shared_data

ALPACA = SHARED_DATA / "sft" / "alpaca_5000.jsonl"


def alpaca_records(n: int) -> list[dict]:
    with open(require_shared_data("sft/alpaca_5000.jsonl"), encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture
def base_checkpoint(tmp_path) -> Path:
    """A random-initialised 2-layer model and a char tokenizer over printable ASCII, saved as a checkpoint."""
    from lmforge.data.tokenizer import char_tokenizer

    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    model_cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        max_seq_len=256,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        tie_embeddings=True,
    )
    model = build_model(model_cfg, seed=0)
    return save_checkpoint(
        tmp_path / "base",
        model_state=model.state_dict(),
        config=Config(model=model_cfg),
        tokenizer_file=tok_file,
    )
