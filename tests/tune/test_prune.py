"""Pruning: exact unstructured sparsity; structured pruning shrinks shapes, equals masking, and exports."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config
from lmforge.tune.prune import (
    keep_pruned_at_zero,
    magnitude_prune,
    plan_structured,
    prunable_weights,
    sparsity,
    structured_prune,
)
from tests.conftest import require_transformers
from tests.infer.conftest import tiny_model

X = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_half_sparsity_is_exact_and_removes_the_smallest(scope):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in prunable_weights(model).items()}
    magnitude_prune(model, 0.5, scope=scope)
    report = sparsity(model)
    assert report["zeros"] * 2 == report["total"] and report["sparsity"] == 0.5
    if scope == "layer":  # every matrix loses exactly half, and only entries no larger than any it keeps
        for name, p in prunable_weights(model).items():
            assert int((p == 0).sum()) * 2 == p.numel()
            pruned, kept = before[name][p == 0].abs(), before[name][p != 0].abs()
            assert pruned.max() <= kept.min()
    else:
        everything = torch.cat([w.flatten() for w in before.values()]).abs()
        threshold = everything.kthvalue(everything.numel() // 2).values
        for name, p in prunable_weights(model).items():
            assert (before[name][p == 0].abs() <= threshold).all() and (
                before[name][p != 0].abs() >= threshold
            ).all()
    # embeddings and norms are untouched
    assert int((model.embed_tokens.weight == 0).sum()) == 0


def test_pruned_weights_stay_zero_through_adamw():
    model = tiny_model()
    masks = magnitude_prune(model, 0.5)
    keep_pruned_at_zero(masks, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(X).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert sparsity(model)["sparsity"] == 0.5


@pytest.mark.parametrize(("n_kv_heads", "bias"), [(2, False), (4, False), (2, True)])
def test_structured_pruning_shrinks_and_equals_masking(n_kv_heads, bias):
    model = tiny_model(n_kv_heads=n_kv_heads, bias=bias)  # 4 heads of 16, ffn 96
    plan = plan_structured(model, heads=0.5, channels=0.25)
    small = structured_prune(model, heads=0.5, channels=0.25)
    cfg = small.cfg
    assert (cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim) == (
        2,
        2 if n_kv_heads == 4 else 2,
        16,
        72,
    )
    attn = small.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 32)
    assert small.layers[0].mlp.down_proj.weight.shape == (64, 72)
    assert small.num_params() < model.num_params()
    # the reference: the full model with the removed heads' and channels' output columns zeroed
    with torch.no_grad():
        for layer, heads, channels in zip(model.layers, plan.heads, plan.channels):
            drop_heads = [h for h in range(4) if h not in heads]
            for h in drop_heads:
                layer.self_attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
            drop = [c for c in range(96) if c not in channels]
            layer.mlp.down_proj.weight[:, drop] = 0
    torch.testing.assert_close(small(X), model(X), rtol=1e-5, atol=1e-5)


def test_structured_pruned_model_exports_and_loads_in_transformers(tmp_path):
    transformers = require_transformers()
    from lmforge.model.hf import export_checkpoint

    model = tiny_model()
    small = structured_prune(model, heads=0.5, channels=0.5)
    config = Config(model=small.cfg)
    save_checkpoint(tmp_path / "ckpt", model_state=small.state_dict(), config=config)
    report = export_checkpoint(tmp_path / "ckpt", tmp_path / "hf", verify=True)
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 48
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, small(X), rtol=1e-4, atol=1e-4)
