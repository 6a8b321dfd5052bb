"""Weight-only int8/int4 inference (``lmforge.infer.quantize``): each quantized projection against a float
matmul of the dequantized weights computed here, the error of the quantized model against the float one,
and the fast step on a quantized model against the eager path on the same model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig, MoEConfig
from lmforge.errors import ConfigError
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.quantize import Int4Linear, Int8DynamicLinear, Int8Linear, quantize_model
from lmforge.model.transformer import build_model

CPU = torch.device("cpu")


def linear(n_out: int, n_in: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, n_out)[:, None])  # rows of very different scales
    return layer


@pytest.mark.parametrize("bias, rows", [(False, 3), (True, 3), (True, 20)])
def test_int8_linear_is_the_matmul_of_its_rounded_weights(bias, rows):
    """3 rows per call go through the int8 kernel, 20 (a prompt) through the dequantized weights."""
    layer = linear(40, 64, bias)
    w = layer.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # per output row, symmetric
    dequantized = torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    x = torch.randn(2, rows, 64)
    expected = F.linear(x, dequantized, layer.bias)
    got = Int8Linear(layer)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (dequantized - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding: half a step at most


def test_int4_linear_is_the_matmul_of_its_grouped_weights():
    layer = linear(16, 64, True)
    w = layer.weight.detach().view(16, 2, 32)  # groups of 32 input features
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    dequantized = (torch.round((w - low) / step) * step + low).view(16, 64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(
        Int4Linear(layer)(x), F.linear(x, dequantized, layer.bias), rtol=1e-4, atol=1e-4
    )


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96)
    return ModelConfig(**{**base, "init_std": 0.3, **overrides})


def test_int8_dynamic_linear_rounds_activations_too():
    """fbgemm's dynamic int8: near the float matmul (1-2%), but not the weight-only result (the activations
    are rounded to 7 bits as well)."""
    layer = linear(48, 64, True)
    x = torch.randn(4, 64)
    expected = layer(x)
    got = Int8DynamicLinear(layer)(x)
    weight_only = Int8Linear(layer)(x)
    error = (got - expected).norm() / expected.norm()
    assert 0.001 < error < 0.03
    assert (got - weight_only).abs().max() > 1e-4


@pytest.mark.parametrize("mode, bound", [("int8", 0.015), ("int8-dynamic", 0.05), ("int4", 0.06)])
def test_quantized_model_logits_stay_near_the_float_model(mode, bound):
    """Relative logit error at the default init, random weights: int8 0.5%, int8-dynamic ~2%, int4 2%."""
    cfg = tiny(mup=True, mup_base_width=32, init_std=0.02)  # the head's 1/m multiplier too
    reference = build_model(cfg, seed=1).eval()
    quantized = build_model(cfg, seed=1).eval()
    quantize_model(quantized, mode)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(ids), quantized(ids)
    error = (got - expected).norm() / expected.norm()
    assert 0 < error < bound


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
def test_fast_step_on_quantized_weights_equals_the_eager_path(mode):
    model = quantize_model(build_model(tiny(qkv_bias=True), seed=2).eval(), mode)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34], [4]]
    eager = generate_ids(model, prompts, greedy, device=CPU)
    fast = generate_ids(model, prompts, greedy, device=CPU, decoder=FastDecoder(model))
    assert fast.tokens == eager.tokens


def test_moe_routers_stay_float():
    model = quantize_model(build_model(tiny(moe=MoEConfig(n_experts=4, top_k=2)), seed=0).eval(), "int8")
    gate = model.layers[0].mlp.gate
    assert isinstance(gate, nn.Linear)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)


def test_unknown_mode_is_rejected():
    with pytest.raises(ConfigError, match="int3"):
        quantize_model(build_model(tiny(), seed=0), "int3")
