"""Model accounting by arithmetic: parameters, FLOPs and weight sizes without building a tensor.

Kept free of torch so ``lmforge model info 7b`` answers instantly; ``tests/model`` checks these numbers
against a model built on the ``meta`` device.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.config import (
    PRESETS,
    Config,
    ModelConfig,
    apply_overrides,
    build,
    load_yaml,
    resolve_model_dict,
    suggest,
    validate,
)
from lmforge.errors import ConfigError


def count_params(cfg: ModelConfig) -> int:
    """The parameter count of ``Transformer(cfg)``, by arithmetic (no tensors)."""
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layers
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.hidden_dim
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    bias = 0
    if cfg.bias:
        bias = (
            cfg.n_heads * hd
            + 2 * cfg.kv_heads * hd
            + d
            + (2 if cfg.ffn == "swiglu" else 1) * cfg.hidden_dim
            + d
        )
    if cfg.qkv_bias and not cfg.bias:
        bias += (cfg.n_heads + 2 * cfg.kv_heads) * hd
    qk_norm = 2 * hd if cfg.qk_norm else 0
    per_layer = attn + ffn + 2 * norm + bias + qk_norm
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    positions = cfg.max_seq_len * d if cfg.position == "learned" else 0
    return L * per_layer + embeddings + positions + norm


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6N + 12 L d_attn T, with N the parameters that take part in matmuls (not the embedding lookups)."""
    lookup = cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    if cfg.position == "learned":
        lookup += cfg.max_seq_len * cfg.d_model
    matmul_params = count_params(cfg) - lookup
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters, training FLOPs per token and weight sizes of a model shape."""
    seq_len = seq_len or cfg.max_seq_len
    n = count_params(cfg)
    return {
        "preset": cfg.preset,
        "parameters": n,
        "seq_len": seq_len,
        "flops_per_token": model_flops_per_token(cfg, seq_len),
        "bytes_fp32": 4 * n,
        "bytes_bf16": 2 * n,
    }


def model_config_from_arg(arg: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """A preset name or a YAML config file (its ``model`` section), plus dotted overrides."""
    if arg in PRESETS:
        data = {"model": {"preset": arg}}
    elif Path(arg).suffix in (".yaml", ".yml") or Path(arg).exists():
        data = load_yaml(arg)
    else:
        raise ConfigError(
            f"{arg!r} is neither a preset{suggest(arg, PRESETS)} nor a config file; presets: {', '.join(PRESETS)}"
        )
    data = apply_overrides(data, overrides)
    model = resolve_model_dict(dict(data.get("model") or {}))
    cfg = build(Config, {"model": model}, "")
    validate(cfg)
    return cfg.model
