"""The one decoder-only Transformer, switched by ``ModelConfig``.

Shape legend: B batch, T query length, S key length (cache + T), C d_model, H heads, Hkv key/value heads,
hd head dimension, V vocabulary.

Parameter names follow the Hugging Face Llama layout (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ...), so the export key map in ``model/hf.py`` stays short.
The model knows nothing of devices, process groups or training: build it (on ``meta`` if you like),
parallelise it from outside, then call ``init_weights()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.info import model_flops_per_token
from lmforge.model.moe import GroupedExperts, MoEFeedForward


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (as Llama does), scaled by a learned weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The original Transformer's table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    inv_freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (d/2,)
    angles = position * inv_freq  # (P, d/2)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table.float()


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)


def scaled_rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies (hd/2,) with ``cfg.rope_scaling`` applied, as Hugging Face computes them.

    "linear" divides every frequency by ``rope_factor``. "llama3" (Llama 3.1) keeps frequencies whose wavelength
    is below ``rope_original_max_len / rope_high_freq_factor``, divides those above
    ``rope_original_max_len / rope_low_freq_factor`` by ``rope_factor``, and interpolates in between. "yarn"
    keeps the dimensions that turn more than ``rope_beta_fast`` times over ``rope_original_max_len`` positions,
    divides those turning fewer than ``rope_beta_slow`` times by ``rope_factor``, and ramps linearly between.
    """
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        context = cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return torch.where(medium, smoothed, scaled)
    if cfg.rope_scaling == "yarn":
        dim, base = cfg.head_dim, cfg.rope_theta

        def correction_dim(rotations: float) -> float:  # the dimension that turns ``rotations`` times
            return (
                dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
            )

        low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: the original frequency (fast dimensions), 0: interpolated by rope_factor
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        return (1.0 / (cfg.rope_factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor on cos/sin: YaRN's 0.1 ln(factor) + 1 (sharper attention at long range); 1 otherwise."""
    if cfg.rope_scaling == "yarn" and cfg.rope_factor > 1:
        return 0.1 * math.log(cfg.rope_factor) + 1.0
    return 1.0


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for rotate-half RoPE (the Llama convention) at the given positions: each (B, T, hd), times
    ``scale`` (``rope_attention_scale``)."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    if scale != 1.0:
        return emb.cos() * scale, emb.sin() * scale
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) queries or keys by position; cos/sin are (B, T, hd)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding: one (B, Hkv, max_len, hd) pair per layer.

    ``length`` is the number of positions already filled; ``key_mask`` (B, max_len) marks which cached
    positions are real tokens (False for left padding in batched generation); ``padded`` records whether any
    is False, so a decoding step needs no check (and no device sync) to skip the mask.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor
    length: int = 0
    padded: bool = False
    rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, max_len: int, *, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            key_mask=torch.ones(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def rope_at(
        self, position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin (B, T, hd) for ``position_ids`` (B, T), looked up in a table made once per cache
        (bit-identical to ``rope_cos_sin``: the same elementwise operations on the same values)."""
        if self.rope is None:
            positions = torch.arange(self.max_len, device=inv_freq.device)[None]  # (1, max_len)
            self.rope = rope_cos_sin(positions, inv_freq, scale)
        cos, sin = self.rope  # (1, max_len, hd) each
        return cos[0][position_ids], sin[0][position_ids]


def attention_mask_for(
    *,
    batch: int,
    q_len: int,
    start: int,
    device: torch.device,
    doc_ids: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    window: int | None = None,
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True where a query may attend; None means plain causal from position 0.

    ``start`` is the number of cached positions before the queries; ``doc_ids`` (B, S) stops attention
    across packed documents; ``key_mask`` (B, S) is False for padding keys. A query always sees itself, so
    a fully padded row yields finite (ignored) outputs instead of NaN. ``window`` W (sliding-window attention)
    keeps, for the query at cache index i, only keys j with i - W < j (Hugging Face's rule, on cache indices).
    """
    windowed = window is not None and start + q_len > window
    if doc_ids is None and key_mask is None and start == 0 and not windowed:
        return None
    k_len = start + q_len
    q_pos = torch.arange(start, k_len, device=device)  # (T,)
    k_pos = torch.arange(k_len, device=device)  # (S,)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if windowed:
        causal = causal & (k_pos[None, :] > q_pos[:, None] - window)
    mask = causal.expand(batch, 1, q_len, k_len)  # (B, 1, T, S)
    if doc_ids is not None:
        same_doc = doc_ids[:, None, start:, None] == doc_ids[:, None, None, :k_len]  # (B, 1, T, S)
        mask = mask & same_doc
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :k_len]
    diagonal = q_pos[:, None] == k_pos[None, :]  # (T, S)
    return mask | diagonal


def positions_within_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) counted from each packed document's first token: [7,7,7,9,9] -> [0,1,2,0,1]."""
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) index of each document's first token
    return index - first


def attention_scale(cfg: ModelConfig) -> float | None:
    """The factor on q.k before the softmax: None (SDPA's 1/sqrt(hd)) in the standard parametrisation.

    muP scales attention by 1/hd instead, times sqrt(base hd) so that it equals 1/sqrt(hd) at the base width.
    muP widens a model at a fixed head count, so the base head dimension is hd / m and the scale is
    sqrt(hd / m) / hd = 1 / sqrt(hd * m), m = ``cfg.mup_width_mult``.
    """
    m = cfg.mup_width_mult
    return None if m == 1.0 else 1.0 / math.sqrt(cfg.head_dim * m)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.scale = attention_scale(cfg)  # muP's 1/d attention; None: 1/sqrt(hd)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        if cfg.qk_norm:  # one weight of size hd shared by every head
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            start = cache.length
            cache.keys[layer][:, :, start : start + T] = k
            cache.values[layer][:, :, start : start + T] = v
            k = cache.keys[layer][:, :, : start + T]  # (B, Hkv, S, hd)
            v = cache.values[layer][:, :, : start + T]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
            scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu_tanh(up(x)))``, as GPT-2)."""

    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.hidden_dim
        self.swiglu = cfg.ffn == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_feed_forward(cfg: ModelConfig, layer: int) -> nn.Module:
    """The dense feed-forward, or the Mixture-of-Experts one from ``moe.first_dense_layers`` on."""
    moe = cfg.moe
    if not moe.enabled or layer < moe.first_dense_layers:
        return FeedForward(cfg)
    shared = None
    if moe.n_shared_experts > 0:
        hidden = moe.shared_expert_hidden or moe.n_shared_experts * (moe.expert_hidden or cfg.hidden_dim)
        shared = FeedForward(cfg, hidden)
    return MoEFeedForward(cfg, shared, layer)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); ``layer`` is its index."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = make_feed_forward(cfg, layer)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), rope, mask, cache, layer))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class Readout(nn.Linear):
    """The output layer (lm_head): logits = multiplier * (x @ W.T), with no bias.

    The multiplier is muP's 1/m on the logits (``MuReadout`` in Yang et al.'s ``mup`` package); it is 1 in
    the standard parametrisation, where this is a plain ``nn.Linear``. Generation and evaluation call
    ``model.lm_head(hidden)`` directly, so the multiplier lives here rather than in ``forward``."""

    def __init__(self, in_features: int, out_features: int, *, multiplier: float = 1.0):
        super().__init__(in_features, out_features, bias=False)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multiplier == 1.0:
            return super().forward(x)
        return super().forward(x * self.multiplier)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.position == "learned":
            self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Readout(cfg.d_model, cfg.vocab_size, multiplier=1.0 / cfg.mup_width_mult)
        self.tie_weights()
        # Derived tables are non-persistent buffers: never saved, recomputed by init_weights() after `meta`.
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("sinusoidal", torch.empty(0), persistent=False)
        self.rope_scale = rope_attention_scale(cfg)
        self.init_buffers()

    # -- initialisation ----------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the head with the token embedding when ``tie_embeddings``. ``to_empty`` (leaving ``meta``)
        gives each module its own new tensor, so callers re-tie after it (``init_weights`` does)."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute the derived position tables (after ``to_empty`` or loading weights)."""
        if self.rope_inv_freq.is_meta:
            return
        with torch.no_grad():
            self.rope_inv_freq.copy_(scaled_rope_inv_freq(self.cfg))
            if self.cfg.position == "sinusoidal":
                self.sinusoidal = sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model).to(
                    self.rope_inv_freq.device
                )

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2/Llama initialisation: N(0, init_std) for weights, zero biases, unit norms, and the residual
        output projections (``o_proj``, ``down_proj``) scaled by 1/sqrt(2 * n_layers) so the residual stream
        keeps unit scale at any depth. Call after moving off ``meta`` (``model.to_empty(device=...)``).

        muP (``cfg.mup``) divides the std of the hidden matrices (every ``nn.Linear`` but the head) by
        sqrt(m): variance ~ 1/fan_in relative to the base width. Embeddings and the head keep ``init_std``;
        the head's 1/m multiplier (``Readout``) makes its effective init variance ~ 1/fan_in^2."""
        self.tie_weights()
        std = self.cfg.init_std
        hidden_std = std / math.sqrt(self.cfg.mup_width_mult)
        residual_std = hidden_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, Readout):  # a tied head draws the embedding again, at the same std
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, nn.Linear):
                is_residual = name.endswith("o_proj") or name.endswith("down_proj")
                wanted = residual_std if is_residual else hidden_std
                nn.init.normal_(module.weight, 0.0, wanted, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
            elif isinstance(module, RMSNorm | nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, GroupedExperts):
                module.init_weights(std, residual_std, generator)
            elif isinstance(module, MoEFeedForward):
                module.expert_bias.zero_()
        self.init_buffers()

    # -- forward -----------------------------------------------------------------------------------------

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for token ids ``idx`` (B, T).

        ``doc_ids`` (B, T): packed-document ids; attention stays inside a document and, unless
        ``position_ids`` is given, positions restart at 0 in each document (as if it ran alone). Not with a cache.
        ``attention_mask`` (B, T): 1 for real tokens, 0 for padding; with a cache it covers cache + new tokens.
        ``position_ids`` (B, T): explicit positions (defaults to cache length + 0..T-1).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (packed training sequences) cannot be combined with a KV cache")
        if position_ids is None and doc_ids is not None:
            position_ids = positions_within_documents(doc_ids)
        elif position_ids is None:
            position_ids = torch.arange(start, start + T, device=idx.device).expand(B, T)  # (B, T)
        x = self.embed_tokens(idx)  # (B, T, C)
        rope = None
        if self.cfg.position == "rope":
            rope = (
                cache.rope_at(position_ids, self.rope_inv_freq, self.rope_scale)
                if cache is not None
                else rope_cos_sin(position_ids, self.rope_inv_freq, self.rope_scale)
            )
        elif self.cfg.position == "learned":
            x = x + self.embed_positions(position_ids)
        else:
            x = x + self.sinusoidal[position_ids].to(x.dtype)
        x = self.drop(x)
        key_mask = None
        if cache is not None:
            if attention_mask is not None:
                cache.key_mask[:, : start + T] = attention_mask[:, -(start + T) :].bool()
                cache.padded = not bool(cache.key_mask[:, : start + T].all())
            if cache.padded:
                key_mask = cache.key_mask[:, : start + T]
        elif attention_mask is not None:
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):
                key_mask = None
        window = self.cfg.sliding_window
        windowed = window is not None and start + T > window  # some key falls out of some query's window
        if T == 1 and doc_ids is None and key_mask is None and not windowed:
            mask = None  # one new token sees every cached key: no mask needed
        elif T == 1 and doc_ids is None and cache is not None and attention_mask is None and not windowed:
            # a decoding step: the new key is real (the cache starts all True), so the padding mask is all
            mask = key_mask[:, None, None, :]  # (B, 1, 1, S), a view: nothing built per step
        else:
            mask = attention_mask_for(
                batch=B,
                q_len=T,
                start=start,
                device=idx.device,
                doc_ids=doc_ids,
                key_mask=key_mask,
                window=window,
            )
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        if cache is not None:
            cache.length = start + T
        return self.norm(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T). Keyword arguments as in ``hidden_states``."""
        return self.lm_head(self.hidden_states(idx, **kwargs))

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The representation (B, C) of each row's last non-pad token (right padding)."""
        B, T, _ = hidden.shape
        if attention_mask is None:
            return hidden[:, -1]
        positions = torch.arange(T, device=hidden.device).expand(B, T)  # (B, T)
        last = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values.clamp(min=0)  # (B,)
        return hidden[torch.arange(B, device=hidden.device), last]

    # -- accounting --------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Every distinct parameter (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (parameters used in matmuls) + attention scores and values,
        6 x 2 x n_layers x d_attn x seq_len (the PaLM appendix B formula, causal masking not discounted)."""
        return model_flops_per_token(self.cfg, seq_len)


class SequenceClassifier(nn.Module):
    """A classification head on the Transformer's last-token ``pool`` (semantic analysis, labels...)."""

    def __init__(self, backbone: Transformer, n_classes: int):
        super().__init__()
        backbone.lm_head = None  # only the hidden states are used; a tied head would be saved twice
        self.backbone = backbone
        self.score = nn.Linear(backbone.cfg.d_model, n_classes, bias=False)
        self.cfg = backbone.cfg  # the backbone's shape, as for the Transformer (planner, parallelize)

    @property
    def layers(self) -> nn.ModuleList:
        """The blocks, the unit that activation checkpointing, compile and FSDP wrap."""
        return self.backbone.layers

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone.hidden_states(idx, attention_mask=attention_mask)  # (B, T, C)
        return self.score(Transformer.pool(hidden, attention_mask))  # (B, n_classes)


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu", seed: int | None = 0) -> Transformer:
    """Build the model on ``device``. On ``meta`` nothing is allocated and nothing initialised; elsewhere the
    weights are initialised (from ``seed`` when given, for reproducible runs)."""
    device = torch.device(device)
    with torch.device(device):
        model = Transformer(cfg)
    if device.type != "meta":
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    return model
