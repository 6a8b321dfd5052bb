"""Shared pieces for the inference tests: tiny random models, the same weights in transformers, a byte tokenizer."""

from __future__ import annotations

import pytest

from lmforge.config import ModelConfig
from lmforge.model.transformer import Transformer, build_model
from tests.conftest import require_transformers


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, with 256 as end-of-text: an independent, exact tokenizer for tests."""

    eot_id = 256
    pad_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=257,
        max_seq_len=64,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=96,
        tie_embeddings=False,
        init_std=0.2,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    return build_model(tiny_config(**overrides), seed=seed).eval()


def hf_llama(model: Transformer):
    """The same weights as a transformers LlamaForCausalLM, built here with an explicit key map so these tests
    stay independent of lmforge's own export code."""
    transformers = require_transformers()
    cfg = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        pad_token_id=256,
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # our names are Llama's without the "model." prefix (lm_head aside)
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()
