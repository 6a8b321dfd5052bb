"""The model's shape: ``ModelConfig`` (the switches of the one Transformer) and the named presets, as plain
data each citing where its shape comes from. ``lmforge.config`` builds on this module and re-exports both."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward (``model.moe.*``); ``n_experts=0`` keeps every layer dense."""

    n_experts: int = 0  # routed experts per MoE layer; 0: dense feed-forward everywhere
    top_k: int = 2  # experts each token is sent to
    n_shared_experts: int = 0  # experts every token passes through (Qwen2-MoE, DeepSeek)
    expert_hidden: int | None = None  # hidden size of one routed expert; None: model.hidden_dim
    shared_expert_hidden: int | None = None  # hidden size of the shared block; None: n_shared * expert_hidden
    shared_expert_gate: bool = False  # a sigmoid gate scales the shared experts' output (Qwen2-MoE)
    first_dense_layers: int = 0  # the first k layers keep a dense feed-forward (DeepSeek's first_k_dense)
    # "topk_softmax": softmax over the top-k logits (Mixtral); "softmax_topk": softmax over all experts,
    # then the top-k probabilities (Qwen-MoE, DeepSeek), renormalised to sum 1 when norm_topk_prob.
    router: Literal["topk_softmax", "softmax_topk"] = "topk_softmax"
    norm_topk_prob: bool = False
    aux_loss_coef: float = 0.0  # Switch/Mixtral load-balancing loss coefficient (0: off)
    bias_update_rate: float = 0.0  # DeepSeek-V3 auxiliary-loss-free balancing: per-expert bias step (0: off)
    z_loss_coef: float = 0.0  # router z-loss coefficient (ST-MoE; 0: off)
    capacity_factor: float | None = None  # None: dropless; else tokens per expert capped, drops counted

    @property
    def enabled(self) -> bool:
        return self.n_experts > 0

    def problems(self) -> list[str]:
        out = []
        if self.n_experts < 0:
            out.append(f"model.moe.n_experts={self.n_experts} must be >= 0")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            out.append(
                f"model.moe.top_k={self.top_k} must be between 1 and model.moe.n_experts={self.n_experts}"
            )
        for name in ("n_shared_experts", "first_dense_layers"):
            if getattr(self, name) < 0:
                out.append(f"model.moe.{name}={getattr(self, name)} must be >= 0")
        for name in ("expert_hidden", "shared_expert_hidden"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"model.moe.{name}={getattr(self, name)} must be >= 1 (or null for the default)")
        for name in ("aux_loss_coef", "bias_update_rate", "z_loss_coef"):
            if getattr(self, name) < 0:
                out.append(f"model.moe.{name}={getattr(self, name)} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            out.append(f"model.moe.capacity_factor={self.capacity_factor} must be > 0 (or null for dropless)")
        return out


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The shape of the one decoder-only Transformer. Every switch is named for the idea it turns on."""

    preset: str | None = None  # the preset these values started from (informational once resolved)
    vocab_size: int = 256
    max_seq_len: int = 256
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head); 1: multi-query
    ffn_hidden: int | None = None  # None: 4*d_model for gelu, Llama's 2/3*4*d_model rounded to 256 for swiglu
    position: Literal["rope", "learned", "sinusoidal"] = "rope"
    rope_theta: float = 10000.0
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    bias: bool = False  # biases on attention and feed-forward projections (GPT-2 has them, Llama not)
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    head_size: int | None = None  # None: d_model // n_heads; set when attention heads were pruned away
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2); ``bias`` covers every projection
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    sliding_window: int | None = None  # a query at i attends keys j with i - W < j <= i (Mistral); None: all
    # RoPE frequency scaling for long contexts (Hugging Face ``rope_scaling`` / ``rope_parameters``):
    # "linear" divides every frequency by rope_factor; "llama3" divides the low frequencies by rope_factor,
    # keeps the high ones and interpolates between, by wavelength against rope_original_max_len; "yarn"
    # (Peng et al. 2023) blends interpolated and original frequencies by dimension between the rope_beta_fast
    # and rope_beta_slow rotation counts, and scales cos/sin by 0.1 ln(rope_factor) + 1.
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_beta_fast: float = 32.0  # yarn only
    rope_beta_slow: float = 1.0  # yarn only
    rope_original_max_len: int | None = None  # llama3 and yarn: the context the model was pretrained with
    moe: MoEConfig = field(default_factory=MoEConfig)  # Mixture-of-Experts feed-forward (off by default)
    # Maximal-update parametrisation (muP, Yang et al. 2022, Tensor Programs V): initialisation, per-layer
    # learning rates, 1/d attention scale and output multiplier set relative to ``mup_base_width`` so that
    # hyperparameters tuned at the base width transfer to wider models. None: the base is d_model itself.
    mup: bool = False
    mup_base_width: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.d_model // self.n_heads

    @property
    def mup_width_mult(self) -> float:
        """muP's width multiplier m = d_model / mup_base_width: 1.0 without muP or at the base width."""
        if not self.mup or self.mup_base_width is None:
            return 1.0
        return self.d_model / self.mup_base_width

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn == "gelu":
            return 4 * self.d_model
        hidden = int(2 * (4 * self.d_model) / 3)
        return 256 * ((hidden + 255) // 256)

    def problems(self) -> list[str]:
        out = []
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads"):
            if getattr(self, name) < 1:
                out.append(f"model.{name}={getattr(self, name)} must be >= 1")
        if self.head_size is not None and self.head_size < 1:
            out.append(f"model.head_size={self.head_size} must be >= 1 (or null for d_model // n_heads)")
        if self.head_size is None and self.n_heads >= 1 and self.d_model % self.n_heads:
            out.append(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            out.append(f"model.n_kv_heads={self.n_kv_heads} must be >= 1 (or null for n_heads)")
        elif self.n_heads >= 1 and self.n_heads % self.kv_heads:
            out.append(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")
        exact_heads = self.head_size is not None or (self.n_heads >= 1 and self.d_model % self.n_heads == 0)
        if self.position == "rope" and exact_heads and self.head_dim >= 1:
            if self.head_dim % 2:
                out.append(f"model.position=rope needs an even head dimension, got {self.head_dim}")
        if self.position == "sinusoidal" and self.d_model % 2:
            out.append(f"model.position=sinusoidal needs an even model.d_model, got {self.d_model}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            out.append(f"model.ffn_hidden={self.ffn_hidden} must be >= 1 (or null for the default)")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0:
            out.append(f"model.rope_theta={self.rope_theta} must be > 0")
        if self.norm_eps <= 0:
            out.append(f"model.norm_eps={self.norm_eps} must be > 0")
        if self.init_std <= 0:
            out.append(f"model.init_std={self.init_std} must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            out.append(
                f"model.sliding_window={self.sliding_window} must be >= 1 (or null for full attention)"
            )
        if self.qk_norm and self.norm != "rmsnorm":
            out.append(f"model.qk_norm=true needs model.norm=rmsnorm, got {self.norm}")
        if self.rope_scaling != "none":
            if self.position != "rope":
                out.append(f"model.rope_scaling={self.rope_scaling} needs model.position=rope")
            if self.rope_factor <= 0:
                out.append(f"model.rope_factor={self.rope_factor} must be > 0")
        if self.rope_scaling in ("llama3", "yarn"):
            if self.rope_original_max_len is None or self.rope_original_max_len < 1:
                out.append(
                    f"model.rope_scaling={self.rope_scaling} needs model.rope_original_max_len >= 1 (e.g. 8192)"
                )
        if self.rope_scaling == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                out.append(
                    f"model.rope_low_freq_factor={self.rope_low_freq_factor} and model.rope_high_freq_factor="
                    f"{self.rope_high_freq_factor} must satisfy 0 < low < high"
                )
        if self.mup_base_width is not None and self.mup_base_width < 1:
            out.append(f"model.mup_base_width={self.mup_base_width} must be >= 1 (or null for d_model)")
        out.extend(self.moe.problems())
        if self.moe.enabled and self.ffn != "swiglu":
            out.append(
                f"model.moe.n_experts={self.moe.n_experts} needs model.ffn=swiglu (experts are SwiGLU)"
            )
        if self.moe.enabled and self.moe.first_dense_layers > self.n_layers:
            out.append(
                f"model.moe.first_dense_layers={self.moe.first_dense_layers} exceeds model.n_layers={self.n_layers}"
            )
        return out


# -- presets: named model shapes as plain data, each citing where its shape comes from ---------------------
# ``vocab_size`` is the preset's own; a run that trains its own tokenizer takes the tokenizer's size unless
# ``model.vocab_size`` is set explicitly. They live here, beside ModelConfig, because ``model.preset`` is
# resolved while a config is built (``resolve_model_dict``).

# A ~1M-parameter Llama-style model that trains on a laptop CPU in minutes (our own choice).
TINY = ModelConfig(
    preset="tiny", vocab_size=2048, max_seq_len=256, n_layers=4, d_model=128, n_heads=4, ffn_hidden=384
)

# GPT-2 small (Radford et al. 2019; Hugging Face `gpt2` config.json): 124,439,808 parameters.
GPT2_124M = ModelConfig(
    preset="gpt2-124m",
    vocab_size=50257,
    max_seq_len=1024,
    n_layers=12,
    d_model=768,
    n_heads=12,
    ffn_hidden=3072,
    position="learned",
    ffn="gelu",
    norm="layernorm",
    bias=True,
    tie_embeddings=True,
)

# JackFram/llama-160m (the small Llama used for speculative decoding research): 12 x 768, 3072 SwiGLU.
LLAMA_160M = ModelConfig(
    preset="llama-160m",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=12,
    d_model=768,
    n_heads=12,
    ffn_hidden=3072,
    norm_eps=1e-6,
    tie_embeddings=False,
)

# TinyLlama-1.1B (Zhang et al. 2024): 22 layers, 2048 wide, 32 heads with 4 key/value heads (GQA).
LLAMA_1B = ModelConfig(
    preset="1b",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=22,
    d_model=2048,
    n_heads=32,
    n_kv_heads=4,
    ffn_hidden=5632,
    tie_embeddings=False,
)

# OpenLLaMA 3B (Geng & Liu 2023, the Llama architecture at 3B): 26 layers, 3200 wide, 32 heads.
LLAMA_3B = ModelConfig(
    preset="3b",
    vocab_size=32000,
    max_seq_len=2048,
    n_layers=26,
    d_model=3200,
    n_heads=32,
    ffn_hidden=8640,
    norm_eps=1e-6,
    tie_embeddings=False,
)

# Llama-2-7B (Touvron et al. 2023; meta-llama/Llama-2-7b-hf config.json): 6,738,415,616 parameters.
LLAMA_7B = ModelConfig(
    preset="7b",
    vocab_size=32000,
    max_seq_len=4096,
    n_layers=32,
    d_model=4096,
    n_heads=32,
    ffn_hidden=11008,
    tie_embeddings=False,
)

# Qwen2.5-0.5B (Qwen team 2024; Qwen/Qwen2.5-0.5B config.json): biases on q/k/v, GQA 14/2, tied head.
QWEN25_05B = ModelConfig(
    preset="qwen2.5-0.5b",
    vocab_size=151936,
    max_seq_len=32768,
    n_layers=24,
    d_model=896,
    n_heads=14,
    n_kv_heads=2,
    ffn_hidden=4864,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=True,
)

# Qwen3-0.6B (Qwen team 2025; Qwen/Qwen3-0.6B config.json): RMSNorm on q and k, head_dim 128 > d_model/heads.
QWEN3_06B = ModelConfig(
    preset="qwen3-0.6b",
    vocab_size=151936,
    max_seq_len=40960,
    n_layers=28,
    d_model=1024,
    n_heads=16,
    n_kv_heads=8,
    head_size=128,
    ffn_hidden=3072,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    tie_embeddings=True,
)

# Mistral-7B-v0.1 (Jiang et al. 2023; mistralai/Mistral-7B-v0.1 config.json): sliding window 4096, GQA 32/8.
MISTRAL_7B = ModelConfig(
    preset="mistral-7b",
    vocab_size=32000,
    max_seq_len=32768,
    n_layers=32,
    d_model=4096,
    n_heads=32,
    n_kv_heads=8,
    ffn_hidden=14336,
    sliding_window=4096,
    tie_embeddings=False,
)

# Llama-3.2-1B (Meta 2024; meta-llama/Llama-3.2-1B config.json): llama3 RoPE scaling x32 from 8192 positions.
LLAMA32_1B = ModelConfig(
    preset="llama3.2-1b",
    vocab_size=128256,
    max_seq_len=131072,
    n_layers=16,
    d_model=2048,
    n_heads=32,
    n_kv_heads=8,
    ffn_hidden=8192,
    rope_theta=500000.0,
    rope_scaling="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
    tie_embeddings=True,
)

# Mixtral-8x7B-v0.1 (Jiang et al. 2024; mistralai/Mixtral-8x7B-v0.1 config.json): Mistral-7B's attention with
# 8 SwiGLU experts of 14336 per layer, top-2, softmax over the two chosen logits; no sliding window;
# 46,702,792,704 parameters (as MixtralForCausalLM on meta), 12,879,925,248 active per token.
MIXTRAL_8X7B = ModelConfig(
    preset="mixtral-8x7b",
    vocab_size=32000,
    max_seq_len=32768,
    n_layers=32,
    d_model=4096,
    n_heads=32,
    n_kv_heads=8,
    ffn_hidden=14336,
    rope_theta=1000000.0,
    tie_embeddings=False,
    moe=MoEConfig(n_experts=8, top_k=2, router="topk_softmax", aux_loss_coef=0.02),
)

# Qwen1.5-MoE-A2.7B (Qwen team 2024; Qwen/Qwen1.5-MoE-A2.7B config.json): 60 experts of 1408, top-4 of a
# softmax over all 60 (not renormalised), 4 shared experts as one SwiGLU of 5632 behind a sigmoid gate, q/k/v
# biases; 14,315,784,192 parameters (as Qwen2MoeForCausalLM on meta).
QWEN15_MOE_A27B = ModelConfig(
    preset="qwen1.5-moe-a2.7b",
    vocab_size=151936,
    max_seq_len=8192,
    n_layers=24,
    d_model=2048,
    n_heads=16,
    n_kv_heads=16,
    ffn_hidden=5632,
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qkv_bias=True,
    tie_embeddings=False,
    moe=MoEConfig(
        n_experts=60,
        top_k=4,
        n_shared_experts=4,
        expert_hidden=1408,
        shared_expert_hidden=5632,
        shared_expert_gate=True,
        router="softmax_topk",
        norm_topk_prob=False,
        aux_loss_coef=0.001,
    ),
)

# Qwen3-30B-A3B (Qwen team 2025; Qwen/Qwen3-30B-A3B config.json): 48 layers, 128 experts of 768, top-8 of a
# softmax over all, renormalised; RMSNorm on q and k; 30,532,122,624 parameters (as Qwen3MoeForCausalLM on meta).
QWEN3_30B_A3B = ModelConfig(
    preset="qwen3-30b-a3b",
    vocab_size=151936,
    max_seq_len=40960,
    n_layers=48,
    d_model=2048,
    n_heads=32,
    n_kv_heads=4,
    head_size=128,
    ffn_hidden=6144,  # config.json's intermediate_size: unused, every layer is MoE
    rope_theta=1000000.0,
    norm_eps=1e-6,
    qk_norm=True,
    tie_embeddings=False,
    moe=MoEConfig(
        n_experts=128,
        top_k=8,
        expert_hidden=768,
        router="softmax_topk",
        norm_topk_prob=True,
        aux_loss_coef=0.001,
    ),
)

# A ~1T-parameter sparse shape of the Kimi K2 / DeepSeek-V3 class, our own: Kimi K2's sizes
# (moonshotai/Kimi-K2-Base config.json: 61 layers, d 7168, 384 experts of 2048 top-8, 1 shared expert, the
# first layer dense with 18432, vocab 163840, 64 heads) with lmforge's GQA attention (64 heads of 128, 8
# key/value heads) in place of K2's multi-head latent attention, and a softmax router with DeepSeek-V3's
# bias balancing in place of K2's sigmoid scores. 1,028,298,994,688 parameters, 34,752,263,168 active per
# token (Kimi K2 itself: 1,026,408,209,408 as DeepseekV3ForCausalLM on meta; MLA is 0.2% smaller). Context
# 4096: K2's pre-training length before its long-context stage.
MOE_1T = ModelConfig(
    preset="moe-1t",
    vocab_size=163840,
    max_seq_len=4096,
    n_layers=61,
    d_model=7168,
    n_heads=64,
    n_kv_heads=8,
    head_size=128,
    ffn_hidden=18432,
    rope_theta=50000.0,
    norm_eps=1e-6,
    tie_embeddings=False,
    moe=MoEConfig(
        n_experts=384,
        top_k=8,
        n_shared_experts=1,
        expert_hidden=2048,
        first_dense_layers=1,
        router="softmax_topk",
        norm_topk_prob=True,
        bias_update_rate=0.001,
    ),
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": TINY,
    "gpt2-124m": GPT2_124M,
    "llama-160m": LLAMA_160M,
    "1b": LLAMA_1B,
    "3b": LLAMA_3B,
    "7b": LLAMA_7B,
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen3-0.6b": QWEN3_06B,
    "mistral-7b": MISTRAL_7B,
    "llama3.2-1b": LLAMA32_1B,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen1.5-moe-a2.7b": QWEN15_MOE_A27B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "moe-1t": MOE_1T,
}
