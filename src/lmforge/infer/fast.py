"""The fast decoding step: one token per row into a static (pre-allocated) KV cache, the same arithmetic as
``Transformer.hidden_states`` without its per-call shape work, optionally compiled with ``torch.compile``.

Shape legend: B batch, M cache length (static), H heads, Hkv key/value heads, hd head dimension, V vocabulary.

The eager path (``Transformer.hidden_states`` with a ``KVCache``) stays the reference: the prompt is still
read by it (prefill), and the tests check that this step continues it to the same greedy tokens. What the
step leaves out per token: the cache-length bookkeeping in Python (the new token's cache index is a tensor),
the choice of attention mask (every step attends over the whole buffer with one boolean mask built from
the index, the padding mask and the sliding window) and the RoPE table look-up through ``KVCache``. Shapes
are therefore the same at every step, which is what ``torch.compile`` needs to compile it once: on a CPU
(inductor's C++ kernels) and on a GPU (``mode="reduce-overhead"``: CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model.transformer import Block, KVCache, Transformer, apply_rope, rope_cos_sin

CACHE_BUCKET = 128  # compiled steps round the cache length up to a multiple of this: fewer recompiles


def cache_length(needed: int, *, compiled: bool) -> int:
    """The static cache length for ``needed`` positions: rounded up to ``CACHE_BUCKET`` when compiled, so
    prompts of different lengths reuse one compiled step."""
    if not compiled:
        return needed
    return -(-needed // CACHE_BUCKET) * CACHE_BUCKET


def _block_step(
    block: Block,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
) -> torch.Tensor:
    """One block for one new token per row: ``x`` (B, 1, C), the cache buffers (B, Hkv, M, hd) written at
    ``index`` (1,), ``mask`` (B, 1, 1, M) True where the token may attend."""
    attn = block.self_attn
    B = x.shape[0]
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(B, 1, attn.n_heads, attn.head_dim)  # (B, 1, H, hd)
    k = attn.k_proj(h).view(B, 1, attn.n_kv_heads, attn.head_dim)  # (B, 1, Hkv, hd)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, 1, hd), (B, Hkv, 1, hd)
    v = attn.v_proj(h).view(B, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (B, Hkv, 1, hd)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    keys.index_copy_(2, index, k)
    values.index_copy_(2, index, v)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=attn.scale, enable_gqa=attn.n_kv_heads != attn.n_heads
    )  # (B, H, 1, hd)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(B, 1, attn.n_heads * attn.head_dim))  # (B, 1, C)
    return x + block.mlp(block.post_attention_layernorm(x))


def decode_step(
    model: Transformer,
    rope_table: tuple[torch.Tensor, torch.Tensor] | None,
    token: torch.Tensor,
    position: torch.Tensor,
    index: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits (B, V) of the next token after ``token`` (B, 1) at ``position`` (B, 1), written at cache index
    ``index`` (1,) into ``keys``/``values`` (one (B, Hkv, M, hd) pair per layer); ``key_mask`` (B, M) is False
    for padding keys. The caller advances ``index``; the model is in eval mode (no dropout)."""
    cfg = model.cfg
    x = model.embed_tokens(token)  # (B, 1, C)
    rope = None
    if cfg.position == "rope":
        cos, sin = rope_table  # (P, hd) each
        rope = (cos[position], sin[position])  # (B, 1, hd) each
    elif cfg.position == "learned":
        x = x + model.embed_positions(position)
    else:
        x = x + model.sinusoidal[position].to(x.dtype)
    slots = torch.arange(key_mask.shape[1], device=key_mask.device)  # (M,)
    visible = slots <= index  # (M,): the cached keys and the new one
    if cfg.sliding_window is not None:  # Hugging Face's rule on cache indices, as ``attention_mask_for``
        visible = visible & (slots > index - cfg.sliding_window)
    mask = (key_mask & visible)[:, None, None, :]  # (B, 1, 1, M)
    for i, block in enumerate(model.layers):
        x = _block_step(block, x, rope, mask, keys[i], values[i], index)
    return model.lm_head(model.norm(x)[:, -1])  # (B, V)


class FastDecoder:
    """The decoding step of one model, eager or compiled once (``compile=True``) and reused by every
    ``generate_ids`` call given this decoder. ``mode`` is passed to ``torch.compile`` (None: its default on
    a CPU, "reduce-overhead", CUDA graphs, on a GPU)."""

    def __init__(self, model: Transformer, *, compile: bool = False, mode: str | None = None):
        self.model = model
        self.compiled = compile
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step = decode_step
        if compile:
            device_type = next(model.parameters()).device.type
            if mode is None and device_type == "cuda":
                mode = "reduce-overhead"
            self._step = torch.compile(decode_step, dynamic=False, fullgraph=False, mode=mode)

    def rope_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin (max_seq_len, hd) for every position, made once (bit-identical to ``KVCache.rope_at``)."""
        model = self.model
        if model.cfg.position != "rope":
            return None
        if device not in self._tables:
            positions = torch.arange(model.cfg.max_seq_len, device=device)[None]  # (1, P)
            cos, sin = rope_cos_sin(positions, model.rope_inv_freq, model.rope_scale)
            self._tables[device] = (cos[0], sin[0])
        return self._tables[device]

    def step(
        self, cache: KVCache, token: torch.Tensor, position: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, V) after feeding ``token`` (B, 1) at ``position`` (B, 1) to cache slot ``index`` (1,)."""
        logits = self._step(
            self.model,
            self.rope_table(token.device),
            token,
            position,
            index,
            cache.keys,
            cache.values,
            cache.key_mask,
        )
        if self.compiled and logits.device.type == "cuda":
            logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
        return logits
