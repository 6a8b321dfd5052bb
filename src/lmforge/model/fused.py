"""The two pre-norm sublayers of a Llama block with a hand-written backward, for eager fp32 training on the CPU.

Autograd over the plain modules records about fifteen nodes per sublayer and allocates a new
activation-sized tensor for nearly every elementwise step (norm, RoPE, SwiGLU, residual add, and as many
again in the backward). On a CPU, where each such pass costs as much as a small matmul, that is a large
part of the step. Here each sublayer is one ``autograd.Function`` with the same parameters and the same
math, arranged so that little but the matmuls touches activations:

- the RMSNorm weight ``w`` is folded into the projection that follows (``(xhat * w) @ W.T`` is
  ``xhat @ (W * w).T``), so the normalised activations are never scaled, and its gradient comes from the
  weight-sized product ``dY.T @ xhat`` that the projection's gradient needs anyway;
- q, k, v (and gate, up) are one matmul on the concatenated weights; the parameters stay separate;
- RoPE rotates queries and keys together, with sign-folded sine tables, in three passes;
- the residual add rides in the output projection (``addmm``); the backward works in place.

The fused block is applied from outside the model, as ``torch.compile`` and FSDP are:
``apply_fused_blocks(model)`` checks once which blocks qualify (RMSNorm, a dense SwiGLU feed-forward (a
Mixture-of-Experts block stays plain), RoPE, no bias, no qk_norm, plain ``nn.Linear`` projections with fp32
``nn.Parameter`` weights on the CPU, so neither LoRA's wrappers nor tensor-parallel DTensor shards, no dropout) and turns those into ``FusedBlock``s; the state_dict does not
change. ``distributed.parallelize`` calls it for fp32 training on the CPU without ``torch.compile`` (inductor
fuses the plain modules itself) and without tensor parallelism. The one decision left for each call is the
one that must be made there: the fused path needs gradients, no KV cache and a causal or (B, 1, T, T) mask;
otherwise a ``FusedBlock`` runs the plain ``Block`` math, so evaluation and export checks (without
gradients) stay as fast and bit-identical to transformers.

Shape legend: B batch, T length, N = B*T tokens, C d_model, H heads, Hkv key/value heads, hd head dimension,
F hidden dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.transformer import Block, FeedForward, KVCache, RMSNorm

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class FusedBlock(Block):
    """A ``Block`` whose training forward and backward run through the two fused sublayers below."""

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        T = x.shape[1]
        if torch.is_grad_enabled() and cache is None and (mask is None or tuple(mask.shape[-2:]) == (T, T)):
            return fused_block(self, x, rope, mask)
        return super().forward(x, rope, mask, cache, layer)  # evaluation, decoding: the plain math


def fused_block_qualifies(block: nn.Module, cfg: ModelConfig) -> bool:
    """Whether ``block`` (of a model with ``cfg``) has exactly what ``fused_block`` computes."""
    if type(block) is not Block or cfg.position != "rope":
        return False
    if type(block.mlp) is not FeedForward or not block.mlp.swiglu:  # a Mixture-of-Experts block stays plain
        return False
    if cfg.qk_norm:  # the fused attention has no per-head norm of queries and keys
        return False
    attn, mlp = block.self_attn, block.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return (
        attn.dropout == 0
        and block.resid_dropout.p == 0
        and type(block.input_layernorm) is RMSNorm
        and type(block.post_attention_layernorm) is RMSNorm
        and all(type(m) is nn.Linear and m.bias is None for m in linears)  # LoRA wraps: not plain
        and all(type(m.weight) is nn.Parameter for m in linears)  # tensor-parallel shards are DTensors
        and all(m.weight.dtype == torch.float32 and m.weight.device.type in ("cpu", "meta") for m in linears)
    )


def apply_fused_blocks(model: nn.Module) -> int:
    """Turn every qualifying block of ``model.layers`` into a ``FusedBlock`` (in place: the same parameters
    and state_dict keys); return how many. Apply before activation checkpointing, ``torch.compile`` and data
    parallelism, which wrap the block's forward as it is then; only for fp32 training without autocast."""
    fused = 0
    for block in model.layers:
        if fused_block_qualifies(block, model.cfg):
            block.__class__ = FusedBlock
            fused += 1
    return fused


def fused_block(
    block: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
) -> torch.Tensor:
    """``block(x, rope, mask)`` through the two fused sublayers; cos/sin are (B, T, hd), ``mask`` None
    (causal) or boolean (B, 1, T, T), True where a query may attend."""
    if mask is not None:  # the CPU flash kernel takes an additive mask of the queries' dtype
        mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
    attn, mlp = block.self_attn, block.mlp
    cos, sin = rope
    half = cos.shape[-1] // 2
    # rotate_half(x) * sin == swap_halves(x) * signed_sin; the backward multiplies by it swapped
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    swapped_sin = torch.cat((signed_sin[..., half:], signed_sin[..., :half]), dim=-1)
    x = _AttentionSublayer.apply(
        x,
        block.input_layernorm.weight,
        attn.q_proj.weight,
        attn.k_proj.weight,
        attn.v_proj.weight,
        attn.o_proj.weight,
        cos.unsqueeze(2),  # (B, T, 1, hd): one table for every head
        signed_sin.unsqueeze(2),
        swapped_sin.unsqueeze(2),
        mask,
        block.input_layernorm.eps,
        attn.n_heads,
        attn.n_kv_heads,
        attn.scale,
    )
    return _MLPSublayer.apply(
        x,
        block.post_attention_layernorm.weight,
        mlp.gate_proj.weight,
        mlp.up_proj.weight,
        mlp.down_proj.weight,
        block.post_attention_layernorm.eps,
    )


# -- shared pieces -----------------------------------------------------------------------------------------


def _normalise(x2: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm without its weight: (xhat, rstd) for rows x2 (N, C); rstd is (N, 1)."""
    norm = torch.linalg.vector_norm(x2, dim=-1, keepdim=True)  # (N, 1): one pass, no squared copy
    rstd = norm.square_().div_(x2.shape[-1]).add_(eps).rsqrt_()  # 1 / sqrt(mean(x^2) + eps)
    return x2 * rstd, rstd


def _normalise_backward(
    dxhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, residual_grad: torch.Tensor
) -> torch.Tensor:
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) + residual_grad, in place in ``dxhat`` (N, C)."""
    mean = (dxhat * xhat).mean(-1, keepdim=True)  # (N, 1)
    dxhat.addcmul_(xhat, mean, value=-1.0)
    return torch.addcmul(residual_grad, dxhat, rstd, out=dxhat)


def _fold(weights: tuple[torch.Tensor, ...], norm_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated projection weights (out, C) and the same scaled by the norm weight (columns)."""
    stacked = torch.cat(weights)  # (out, C)
    return stacked, stacked * norm_weight


def _folded_grads(
    dy: torch.Tensor, xhat: torch.Tensor, stacked: torch.Tensor, norm_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For y = (xhat * w) @ stacked.T: the gradients of ``stacked`` (out, C) and of the norm weight ``w``."""
    product = dy.t() @ xhat  # (out, C)
    return product * norm_weight, (product * stacked).sum(0)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = x * cos + swap_halves(x) * sin (last dimension), written into ``out`` without a swapped copy."""
    half = x.shape[-1] // 2
    torch.mul(x[..., half:], sin[..., :half], out=out[..., :half])
    torch.mul(x[..., :half], sin[..., half:], out=out[..., half:])
    return out.addcmul_(x, cos)


# -- the sublayers -----------------------------------------------------------------------------------------


class _AttentionSublayer(torch.autograd.Function):
    """x + o_proj(causal_attention(rope(q), rope(k), v)) with q, k, v = proj(rmsnorm(x)); Hkv <= H heads."""

    @staticmethod
    def forward(
        ctx,
        x,
        norm_w,
        wq,
        wk,
        wv,
        wo,
        cos,
        signed_sin,
        swapped_sin,
        mask,
        eps: float,
        n_heads: int,
        n_kv_heads: int,
        scale: float | None,
    ):
        B, T, C = x.shape
        H, qk_heads, hd = n_heads, n_heads + n_kv_heads, wq.shape[0] // n_heads
        x2 = x.reshape(B * T, C)  # (N, C)
        xhat, rstd = _normalise(x2, eps)
        stacked, folded = _fold((wq, wk, wv), norm_w)  # ((H + 2Hkv) hd, C)
        qkv = (xhat @ folded.t()).view(B, T, qk_heads + n_kv_heads, hd)  # (B, T, H + 2Hkv, hd)
        qk = qkv[:, :, :qk_heads]  # (B, T, H + Hkv, hd): queries and keys rotate together
        rotated = _rotate(qk, cos, signed_sin, torch.empty_like(qk))  # (B, T, H + Hkv, hd)
        q = rotated[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = rotated[:, :, H:].transpose(1, 2)  # (B, Hkv, T, hd)
        v = qkv[:, :, qk_heads:].transpose(1, 2)  # (B, Hkv, T, hd)
        # (B, H, T, hd) laid out as (B, T, H, hd); scale None: 1/sqrt(hd), else muP's (``Attention.scale``)
        out, logsumexp = _flash(q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
        heads = out.transpose(1, 2).reshape(B * T, H * hd)  # (N, H hd)
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)  # not a view: see _MLPSublayer
        torch.addmm(x2, heads, wo.t(), out=y.view(B * T, C))  # the residual add inside the output projection
        ctx.save_for_backward(
            xhat, rstd, norm_w, stacked, folded, wo, q, k, v, out, logsumexp, heads, cos, swapped_sin, mask
        )
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, norm_w, stacked, folded, wo, q, k, v, out, logsumexp, heads, cos, swapped_sin, mask = (
            ctx.saved_tensors
        )
        B, H, T, hd = q.shape
        qk_heads = H + k.shape[1]
        dy2 = dy.reshape(B * T, -1)  # (N, C)
        dwo = dy2.t() @ heads if ctx.needs_input_grad[5] else None  # (C, H hd)
        dout = (dy2 @ wo).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        dq, dk, dv = _flash_backward(
            dout, q, k, v, out, logsumexp, 0.0, mask is None, attn_mask=mask, scale=ctx.scale
        )
        dqkv = torch.empty(
            B, T, qk_heads + k.shape[1], hd, dtype=dy.dtype, device=dy.device
        )  # (B, T, H + 2Hkv, hd)
        _rotate(dq.transpose(1, 2), cos, swapped_sin, dqkv[:, :, :H])  # RoPE's transpose
        _rotate(dk.transpose(1, 2), cos, swapped_sin, dqkv[:, :, H:qk_heads])
        dqkv[:, :, qk_heads:].copy_(dv.transpose(1, 2))
        dqkv = dqkv.view(B * T, -1)  # (N, (H + 2Hkv) hd)
        dstacked, dnorm_w = _folded_grads(dqkv, xhat, stacked, norm_w)
        dx = _normalise_backward(dqkv @ folded, xhat, rstd, dy2)  # (N, C)
        dwq, dwk, dwv = dstacked.split((H * hd, k.shape[1] * hd, k.shape[1] * hd))
        return dx.view(B, T, -1), dnorm_w, dwq, dwk, dwv, dwo, None, None, None, None, None, None, None, None


class _MLPSublayer(torch.autograd.Function):
    """x + down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))."""

    @staticmethod
    def forward(ctx, x, norm_w, wg, wu, wd, eps: float):
        B, T, C = x.shape
        hidden = wg.shape[0]
        x2 = x.reshape(B * T, C)  # (N, C)
        xhat, rstd = _normalise(x2, eps)
        stacked, folded = _fold((wg, wu), norm_w)  # (2F, C)
        h = xhat @ folded.t()  # (N, 2F): gate | up
        gate, up = h[:, :hidden], h[:, hidden:]
        activated = F.silu(gate)  # (N, F)
        product = activated * up  # (N, F)
        # Written through a (N, C) view into a (B, T, C) tensor that is returned as it is: the block's output
        # is then no view, which FSDP2 needs to keep its pre-backward hook (it warns on a view).
        y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
        torch.addmm(x2, product, wd.t(), out=y.view(B * T, C))
        ctx.save_for_backward(xhat, rstd, norm_w, stacked, folded, wd, h, activated, product)
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, norm_w, stacked, folded, wd, h, activated, product = ctx.saved_tensors
        hidden = wd.shape[1]
        B, T, C = dy.shape
        dy2 = dy.reshape(B * T, C)  # (N, C)
        dwd = dy2.t() @ product if ctx.needs_input_grad[4] else None  # (C, F)
        dproduct = dy2 @ wd  # (N, F)
        dh = torch.empty_like(h)  # (N, 2F)
        torch.mul(dproduct, activated, out=dh[:, hidden:])
        torch.ops.aten.silu_backward(dproduct.mul_(h[:, hidden:]), h[:, :hidden], grad_input=dh[:, :hidden])
        dstacked, dnorm_w = _folded_grads(dh, xhat, stacked, norm_w)
        dx = _normalise_backward(dh @ folded, xhat, rstd, dy2)  # (N, C)
        dwg, dwu = dstacked.split(hidden)
        return dx.view(B, T, C), dnorm_w, dwg, dwu, dwd, None
