"""muP in the model (model.mup): the forward pass against a hand-written reference, the initialisation, the
base width being exactly the standard model, the fused CPU block, and exports that fold the multipliers so
`transformers` reproduces the logits."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge import convert
from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.errors import ExportError
from lmforge.model import hf
from lmforge.model.fused import apply_fused_blocks
from lmforge.model.mup import fold_mup
from lmforge.model.transformer import apply_rope, build_model, rope_cos_sin
from tests.conftest import require_module, require_transformers

VOCAB = 61


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=32, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    return ModelConfig(**{**base, **overrides})


def tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norm weights and biases (initialisation leaves them at 1 and 0, hiding mix-ups)."""
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "norm" in name or "bias" in name:
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model


@pytest.mark.parametrize("base_width", [None, 64])
def test_at_the_base_width_mup_is_exactly_the_standard_model(base_width):
    standard = build_model(tiny(), seed=0)
    mup = build_model(tiny(mup=True, mup_base_width=base_width), seed=0)
    assert mup.cfg.mup_width_mult == 1.0
    for (name, a), b in zip(standard.state_dict().items(), mup.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(standard(tokens()), mup(tokens()))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def reference_logits(model, idx: torch.Tensor, base_width: int) -> torch.Tensor:
    """muP's forward written out: attention scores q.k * sqrt(base head dim) / hd, logits times base/d."""
    cfg, p = model.cfg, dict(model.named_parameters())
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    base_hd = base_width // cfg.n_heads  # the base model has the same heads, each base_width / H wide
    B, T = idx.shape
    cos, sin = rope_cos_sin(torch.arange(T)[None], model.rope_inv_freq)
    x = p["embed_tokens.weight"][idx]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in p.items() if k.startswith(f"layers.{i}.")}
        h = rmsnorm(x, w["input_layernorm.weight"], cfg.norm_eps)
        q = (h @ w["self_attn.q_proj.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ w["self_attn.k_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        v = (h @ w["self_attn.v_proj.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) * math.sqrt(base_hd) / hd  # (B, H, T, T)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + att.transpose(1, 2).reshape(B, T, H * hd) @ w["self_attn.o_proj.weight"].T
        h = rmsnorm(x, w["post_attention_layernorm.weight"], cfg.norm_eps)
        gated = F.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
        x = x + gated @ w["mlp.down_proj.weight"].T
    head = p["embed_tokens.weight"] if cfg.tie_embeddings else p["lm_head.weight"]
    return rmsnorm(x, p["norm.weight"], cfg.norm_eps) @ head.T * (base_width / cfg.d_model)


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_mup_forward_matches_a_hand_written_reference(kv_heads, tied):
    cfg = tiny(d_model=128, n_kv_heads=kv_heads, tie_embeddings=tied, mup=True, mup_base_width=32)  # m = 4
    model = perturb(build_model(cfg, seed=1))
    assert model.cfg.mup_width_mult == 4.0
    ours = model(tokens())
    assert (ours - reference_logits(model, tokens(), 32)).abs().max() <= 1e-5
    standard = dataclasses.replace(cfg, mup=False)
    plain = build_model(standard, seed=1)
    plain.load_state_dict(model.state_dict())
    assert (plain(tokens()) - ours).abs().max() > 1e-2  # the multipliers do change the logits


def test_mup_initialisation_scales_hidden_matrices_only():
    n_layers, std = 2, 0.02
    standard = build_model(tiny(d_model=256, n_layers=n_layers, ffn_hidden=512), seed=0)
    mup = build_model(
        tiny(d_model=256, n_layers=n_layers, ffn_hidden=512, mup=True, mup_base_width=64), seed=0
    )
    for name, p in mup.named_parameters():
        if name.endswith("proj.weight"):
            wanted = (
                std / math.sqrt(4) / (math.sqrt(2 * n_layers) if ("o_proj" in name or "down" in name) else 1)
            )
        elif p.dim() == 2:  # embedding and head keep init_std
            wanted = std
        else:
            continue
        assert p.std().item() == pytest.approx(wanted, rel=0.05), name
        assert dict(standard.named_parameters())[name].std().item() == pytest.approx(
            std if p.dim() == 2 and "proj" not in name else wanted * 2, rel=0.05
        ), name
    assert mup.lm_head.multiplier == 0.25 and standard.lm_head.multiplier == 1.0
    assert mup.layers[0].self_attn.scale == pytest.approx(1 / math.sqrt(64 * 4))  # hd 64, m 4
    assert standard.layers[0].self_attn.scale is None


def loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), idx[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_fused_cpu_block_honours_the_mup_attention_scale(kv_heads):
    model = perturb(build_model(tiny(d_model=128, n_kv_heads=kv_heads, mup=True, mup_base_width=32), seed=1))
    fused = build_model(model.cfg, seed=1)
    fused.load_state_dict(model.state_dict())
    assert apply_fused_blocks(fused) == model.cfg.n_layers
    logits, grads = loss_and_grads(model.train(), tokens())
    fused_logits, fused_grads = loss_and_grads(fused.train(), tokens())
    assert (fused_logits - logits).abs().max() <= 1e-5
    for name, ref in grads.items():
        assert (fused_grads[name] - ref).abs().max() <= 1e-5 * ref.abs().max(), name


# -- export: the multipliers folded into the weights ---------------------------------------------------------

EXPORT_CASES = {
    "llama-untied": tiny(d_model=128, mup=True, mup_base_width=32, tie_embeddings=False),
    "llama-gqa-tied": tiny(d_model=128, n_kv_heads=2, mup=True, mup_base_width=32, tie_embeddings=True),
    "qwen3-qk-norm": tiny(d_model=128, mup=True, mup_base_width=64, qk_norm=True, tie_embeddings=False),
    "gpt2-bias": tiny(
        d_model=128, mup=True, mup_base_width=32, position="learned", ffn="gelu", norm="layernorm", bias=True
    ),
}


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_folding_keeps_the_logits_and_transformers_reproduces_them(name):
    require_transformers()
    model = perturb(build_model(EXPORT_CASES[name], seed=1)).eval()
    folded = fold_mup(model)
    assert not folded.cfg.mup and folded.cfg.tie_embeddings is False
    with torch.no_grad():
        ours = model(tokens())
        assert (folded(tokens()) - ours).abs().max() <= 1e-5
        theirs = hf.to_hf_model(model)(input_ids=tokens()).logits
    assert (theirs - ours).abs().max() <= 1e-4
    with pytest.raises(ExportError, match="fold muP"):
        hf.hf_config(model.cfg)


def test_export_of_a_mup_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    transformers = require_transformers()
    cfg = EXPORT_CASES["llama-gqa-tied"]
    model = perturb(build_model(cfg, seed=1)).eval()
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
    )
    report = convert.export_model(run, tmp_path / "hf")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings is False  # the head carries the 1/m the embedding must not
    with torch.no_grad():
        assert (loaded(input_ids=tokens()).logits - model(tokens())).abs().max() <= 1e-4


def test_gguf_export_of_a_mup_model_holds_the_folded_weights(tmp_path):
    require_module("gguf", "gguf")
    from lmforge.model.gguf import unpermute_rotary
    from tests.model.test_gguf import read_tensors

    cfg = EXPORT_CASES["llama-gqa-tied"]  # m = 4: queries x 1/2, head = embedding / 4 (untied in the file)
    model = perturb(build_model(cfg, seed=1)).eval()
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
    )
    convert.export_model(run, tmp_path / "model.gguf", format="gguf", verify=False)
    tensors = read_tensors(tmp_path / "model.gguf")
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    for i in range(cfg.n_layers):
        q = unpermute_rotary(torch.from_numpy(tensors[f"blk.{i}.attn_q.weight"]), cfg.n_heads)
        torch.testing.assert_close(q, ours[f"layers.{i}.self_attn.q_proj.weight"] / 2, rtol=1e-6, atol=0)
        k = unpermute_rotary(torch.from_numpy(tensors[f"blk.{i}.attn_k.weight"]), cfg.kv_heads)
        assert torch.equal(k, ours[f"layers.{i}.self_attn.k_proj.weight"])
    assert np.array_equal(tensors["token_embd.weight"], ours["embed_tokens.weight"].numpy())
    torch.testing.assert_close(
        torch.from_numpy(tensors["output.weight"]), ours["embed_tokens.weight"] / 4, rtol=1e-6, atol=0
    )


def test_folding_a_model_narrower_than_its_base_width():
    # m = 1/2: queries x sqrt(2), head x 2
    model = perturb(build_model(tiny(d_model=32, n_heads=2, mup=True, mup_base_width=64), seed=2)).eval()
    assert model.cfg.mup_width_mult == 0.5
    folded = fold_mup(model)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    for i in range(model.cfg.n_layers):
        q = folded.state_dict()[f"layers.{i}.self_attn.q_proj.weight"]
        torch.testing.assert_close(q, ours[f"layers.{i}.self_attn.q_proj.weight"] * math.sqrt(2))
    torch.testing.assert_close(folded.state_dict()["lm_head.weight"], ours["lm_head.weight"] * 2)
    with torch.no_grad():
        assert (folded(tokens()) - model(tokens())).abs().max() <= 1e-5


def test_folding_keeps_the_dtype_the_mode_and_at_the_base_width_the_tied_head():
    model = build_model(tiny(d_model=128, mup=True, mup_base_width=32, tie_embeddings=False), seed=1)
    model = perturb(model).to(torch.bfloat16).train()
    folded = fold_mup(model)
    assert folded.training and not fold_mup(model.eval()).training
    q = folded.state_dict()["layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16  # the factor 1/2 is exact in bfloat16
    assert torch.equal(q, model.state_dict()["layers.0.self_attn.q_proj.weight"] / 2)
    base = build_model(tiny(mup=True, mup_base_width=64, tie_embeddings=True), seed=1)  # m = 1
    same = fold_mup(base)
    assert same.cfg.tie_embeddings and not same.cfg.mup
    assert same.lm_head.weight is same.embed_tokens.weight  # still one tensor, as in the model folded
    assert torch.equal(same(tokens()), base(tokens()))
