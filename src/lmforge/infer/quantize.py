"""Quantized projections for inference: every ``nn.Linear`` of the blocks and the head is replaced by an int8
(or int4) copy whose matmul is one of PyTorch's own CPU kernels; norms, embeddings and the KV cache stay
in float.

int8: weight-only, symmetric, one scale per output channel (w ~ q * scale, q in [-127, 127]), through
``aten._weight_int8pack_mm``: activations stay float. That kernel is vectorised for AVX-512 only; on an
AVX2 CPU it is slower than the float matmul (measured in docs/inference.md).
int8-dynamic: the same int8 weights through fbgemm's ``quantized::linear_dynamic``, which also rounds each
row of activations to int8 on the fly (per tensor, 7 bits: ``reduce_range``), as llama.cpp's q8_0 rounds its
activations to 8 bits: fast on AVX2, at a larger quality cost.
int4: asymmetric, one scale and zero per output channel and group of ``INT4_GROUP`` input features
(w ~ (q - 8) * scale + zero, q in [0, 15]), the layout the int4 kernel reads.
A projection whose input size is not a multiple of the group (or output size not a multiple of
``INT4_ROWS``) stays int8 under int4. The experts of an MoE
layer (3-d ``GroupedExperts`` weights) and its routers stay float. Quantizing changes the model in place, for inference
only: there is no way back to the float weights, and the quantized model is not saved.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.moe import MoEFeedForward
from lmforge.model.transformer import Readout, Transformer

QUANTIZE_MODES = ("int8", "int8-dynamic", "int4")
INT4_GROUP = 32  # input features sharing one int4 scale and zero
INT4_INNER_K_TILES = 2  # the packing the int4 CPU kernel expects
INT4_ROWS = 16  # the int4 kernel packs output channels by 16
# From this many rows (a prompt being read) the int8 weight-only layer multiplies by its dequantized weights:
# the int8 kernel is tuned for decoding's few rows (and scalar on AVX2), a float matmul for many.
DEQUANTIZE_ROWS = 16


def check_quantize(mode: str | None) -> None:
    if mode is not None and mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize={mode!r} is not known: use one of {', '.join(QUANTIZE_MODES)}")


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T * multiplier + bias`` with int8 ``q`` (N, K) and float ``scale`` (N,)."""

    def __init__(self, linear: nn.Linear, multiplier: float = 1.0):
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.multiplier = multiplier  # muP's 1/m on the head's input (``Readout``)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.multiplier != 1.0:
            x = x * self.multiplier
        flat = x.reshape(-1, self.in_features).to(self.scale.dtype)  # (N_rows, K)
        if flat.shape[0] >= DEQUANTIZE_ROWS:
            out = flat @ (self.weight_int8.to(flat.dtype) * self.scale[:, None]).T  # (N_rows, N)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)  # (N_rows, N)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


class Int8DynamicLinear(nn.Module):
    """``y = dequant(quant(x) @ q.T) * scale + bias``: int8 weights per output channel and activations
    quantized per call (fbgemm). The packed weight is not a buffer: the module is for inference only."""

    def __init__(self, linear: nn.Linear, multiplier: float = 1.0):
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        zero = torch.zeros_like(scale, dtype=torch.long)
        q = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(q, bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        if self.multiplier != 1.0:
            x = x * self.multiplier
        flat = x.reshape(-1, self.in_features).float()  # (N_rows, K)
        out = torch.ops.quantized.linear_dynamic(flat, self.packed, True)  # (N_rows, N)
        return out.to(dtype).view(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """``y = x @ W4.T * multiplier + bias`` with W4 group-wise int4 (packed for the CPU kernel)."""

    def __init__(self, linear: nn.Linear, multiplier: float = 1.0, group: int = INT4_GROUP):
        super().__init__()
        weight = linear.weight.detach().float()  # (N, K)
        N, K = weight.shape
        grouped = weight.view(N, K // group, group)  # (N, G, g)
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)  # (N, G, 1)
        scale = (high - low).clamp(min=1e-12) / 15.0
        zero = low + 8.0 * scale  # so that w = (q - 8) * scale + zero
        q = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.int32).view(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        scales_and_zeros = torch.cat([scale, zero], dim=2).transpose(0, 1).contiguous()  # (G, N, 2)
        self.in_features, self.out_features, self.group = K, N, group
        self.multiplier = multiplier
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.multiplier != 1.0:
            x = x * self.multiplier
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)  # (N_rows, K)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.weight_int4, self.group, self.scales_and_zeros
        )  # (N_rows, N)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


def _quantized(linear: nn.Linear, mode: str) -> nn.Module:
    multiplier = linear.multiplier if isinstance(linear, Readout) else 1.0
    if mode == "int4" and linear.in_features % INT4_GROUP == 0 and linear.out_features % INT4_ROWS == 0:
        return Int4Linear(linear, multiplier)
    if mode == "int8-dynamic":
        return Int8DynamicLinear(linear, multiplier)
    return Int8Linear(linear, multiplier)


@torch.no_grad()
def quantize_model(model: Transformer, mode: str) -> Transformer:
    """Replace the projections of every block and the head by ``mode`` (``QUANTIZE_MODES``) copies, in place.
    CPU only: the kernels are PyTorch's CPU ones."""
    check_quantize(mode)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ConfigError(
            f"quantize={mode} runs on the CPU only (the model is on {device}): use --device cpu"
        )
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and not isinstance(parent, MoEFeedForward)  # routers stay float
    ]
    for parent, name, child in targets:
        setattr(parent, name, _quantized(child, mode))
    return model.eval()
