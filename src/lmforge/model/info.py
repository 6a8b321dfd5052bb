"""Model accounting by arithmetic: parameters, FLOPs and weight sizes without building a tensor.

Kept free of torch so ``lmforge model info 7b`` answers instantly; ``tests/model`` checks these numbers
against a model built on the ``meta`` device.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _block_base_params(cfg: ModelConfig) -> int:
    """One block without its feed-forward: attention (with its biases), q/k norms and the two norms."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    bias = 0
    if cfg.bias:
        bias = cfg.n_heads * hd + 2 * cfg.kv_heads * hd + d
    elif cfg.qkv_bias:
        bias = (cfg.n_heads + 2 * cfg.kv_heads) * hd
    qk_norm = 2 * hd if cfg.qk_norm else 0
    return attn + 2 * norm + bias + qk_norm


def _dense_ffn_params(cfg: ModelConfig, hidden: int | None = None) -> int:
    """A dense feed-forward of ``hidden`` (default ``model.hidden_dim``; SwiGLU: three matrices, GELU: two),
    with its biases when ``model.bias``."""
    d, F = cfg.d_model, hidden or cfg.hidden_dim
    weights = (3 if cfg.ffn == "swiglu" else 2) * d * F
    bias = (2 if cfg.ffn == "swiglu" else 1) * F + d if cfg.bias else 0
    return weights + bias


def expert_hidden(cfg: ModelConfig) -> int:
    """Hidden size of one routed expert (``model.moe.expert_hidden``, else ``model.hidden_dim``)."""
    return cfg.moe.expert_hidden if cfg.moe.expert_hidden is not None else cfg.hidden_dim


def shared_expert_hidden(cfg: ModelConfig) -> int:
    """Hidden size of the shared-expert SwiGLU (0: none): ``shared_expert_hidden``, else
    ``n_shared_experts x expert_hidden``; no shared experts means no shared block."""
    moe = cfg.moe
    if moe.n_shared_experts == 0:
        return 0
    return (
        moe.shared_expert_hidden
        if moe.shared_expert_hidden is not None
        else moe.n_shared_experts * expert_hidden(cfg)
    )


def moe_layers(cfg: ModelConfig) -> int:
    """How many blocks have a Mixture-of-Experts feed-forward (the first ``first_dense_layers`` stay dense)."""
    return cfg.n_layers - cfg.moe.first_dense_layers if cfg.moe.enabled else 0


@dataclass(frozen=True)
class MoEParams:
    """The parameters of one MoE feed-forward: the routed experts (what expert parallelism divides) and
    the rest that every token passes through (router, shared experts, shared gate). The routed experts are
    SwiGLU without biases (as Mixtral, Qwen-MoE and DeepSeek); the shared block is the model's own
    feed-forward kind (``model.ffn``, ``model.bias``) at ``shared_expert_hidden``."""

    one_expert: int  # one SwiGLU(d, expert_hidden): w_gate and w_up [d, h], w_down [h, d]
    routed: int  # n_experts of them, stacked: w_gate, w_up [E, d, h], w_down [E, h, d]
    router: int  # [E, d]
    shared: int  # one feed-forward of shared_expert_hidden, plus the [1, d] sigmoid gate when enabled


def moe_params(cfg: ModelConfig) -> MoEParams:
    d, moe = cfg.d_model, cfg.moe
    one = 3 * d * expert_hidden(cfg)
    shared_hidden = shared_expert_hidden(cfg)
    shared = (
        _dense_ffn_params(cfg, shared_hidden) + (d if moe.shared_expert_gate else 0) if shared_hidden else 0
    )
    return MoEParams(one_expert=one, routed=moe.n_experts * one, router=moe.n_experts * d, shared=shared)


def count_params(cfg: ModelConfig) -> int:
    """The parameter count of ``Transformer(cfg)``, by arithmetic (no tensors); MoE blocks count every
    routed expert (the total, not the active parameters: see ``count_active_params``)."""
    d, L = cfg.d_model, cfg.n_layers
    n_moe = moe_layers(cfg)
    blocks = L * _block_base_params(cfg) + (L - n_moe) * _dense_ffn_params(cfg)
    if n_moe:
        moe = moe_params(cfg)
        blocks += n_moe * (moe.routed + moe.router + moe.shared)
    norm = d if cfg.norm == "rmsnorm" else 2 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    positions = cfg.max_seq_len * d if cfg.position == "learned" else 0
    return blocks + embeddings + positions + norm


def count_expert_params(cfg: ModelConfig) -> int:
    """The routed experts of every MoE block: the parameters expert parallelism spreads over ranks."""
    return moe_layers(cfg) * moe_params(cfg).routed


def count_active_params(cfg: ModelConfig) -> int:
    """Parameters one token uses: everything but the routed experts, plus ``top_k`` routed experts per MoE
    block (embeddings included, as Mixtral's "12.9B active" counts them). Equals ``count_params`` if dense."""
    if not cfg.moe.enabled:
        return count_params(cfg)
    active_experts = moe_layers(cfg) * cfg.moe.top_k * moe_params(cfg).one_expert
    return count_params(cfg) - count_expert_params(cfg) + active_experts


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6N + 12 L d_attn T, with N the parameters that take part in one token's matmuls: the active ones (a
    token meets only ``top_k`` routed experts), without the embedding lookups."""
    lookup = cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    if cfg.position == "learned":
        lookup += cfg.max_seq_len * cfg.d_model
    matmul_params = count_active_params(cfg) - lookup
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters (total and active per token), training FLOPs per token and weight sizes of a shape."""
    seq_len = seq_len or cfg.max_seq_len
    n = count_params(cfg)
    experts = count_expert_params(cfg)
    return {
        "preset": cfg.preset,
        "parameters": n,
        "active_parameters": count_active_params(cfg),
        "expert_parameters": experts,  # the routed experts (0 for a dense model)
        "expert_share": experts / n,
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
