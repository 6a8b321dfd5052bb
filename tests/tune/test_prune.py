"""Pruning: exact unstructured sparsity; structured pruning shrinks shapes, equals masking, and exports."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config
from lmforge.tune.prune import (
    magnitude_prune,
    plan_structured,
    prunable_weights,
    sparsity,
    structured_prune,
)
from lmforge.tune.sparsity import keep_pruned_at_zero
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
    """The zeros are the smallest-magnitude half (by a global threshold computed here), and after AdamW steps
    exactly those positions are zero, while every kept weight has trained."""
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in prunable_weights(model).items()}
    magnitudes = torch.cat([w.abs().flatten() for w in before.values()])
    threshold = magnitudes.kthvalue(magnitudes.numel() // 2).values  # the largest magnitude to prune
    masks = magnitude_prune(model, 0.5)
    for name, w in before.items():
        assert torch.equal(masks[name], w.abs() > threshold), name  # no ties in random weights
    keep_pruned_at_zero(masks, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(X).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    for name, p in prunable_weights(model).items():
        assert torch.equal(p == 0, ~masks[name]), f"{name}: the zeros moved"
        assert (p[masks[name]] != before[name][masks[name]]).all(), f"{name}: a kept weight did not train"


def scale_heads_and_channels(model, head_scales: list[list[float]], weak_channels: list[list[int]]) -> None:
    """Make importance known by construction: head h of layer l gets its q (and k, v when it owns them) rows
    and o columns multiplied by head_scales[l][h]; the weak channels' up/gate rows and down columns by 0.1."""
    cfg = model.cfg
    hd = cfg.head_dim
    with torch.no_grad():
        for layer, scales, weak in zip(model.layers, head_scales, weak_channels):
            attn = layer.self_attn
            for h, scale in enumerate(scales):
                rows = slice(h * hd, (h + 1) * hd)
                projections = [attn.q_proj] + (
                    [attn.k_proj, attn.v_proj] if cfg.kv_heads == cfg.n_heads else []
                )
                for proj in projections:
                    proj.weight[rows] *= scale
                    if proj.bias is not None:
                        proj.bias[rows] *= scale
                attn.o_proj.weight[:, rows] *= scale
            for proj in (layer.mlp.up_proj, layer.mlp.gate_proj):
                proj.weight[weak] *= 0.1
            layer.mlp.down_proj.weight[:, weak] *= 0.1


@pytest.mark.parametrize(("n_kv_heads", "bias"), [(2, False), (4, False), (2, True)])
def test_structured_pruning_keeps_the_important_shrinks_and_equals_masking(n_kv_heads, bias):
    model = tiny_model(n_kv_heads=n_kv_heads, bias=bias)  # 4 heads of 16, ffn 96
    head_scales = [[0.1, 3.0, 1.0, 0.2], [2.0, 1.5, 0.3, 0.1]]
    weak = [
        sorted(torch.randperm(96, generator=torch.Generator().manual_seed(layer))[:24].tolist())
        for layer in (0, 1)
    ]
    scale_heads_and_channels(model, head_scales, weak)
    plan = plan_structured(model, heads=0.5, channels=0.25)
    # By hand: multi-head attention keeps the two largest heads of the layer; grouped-query attention
    # (query heads 0, 1 share key/value head 0; 2, 3 share 1) keeps the larger head of each group.
    if n_kv_heads == 4:
        assert plan.heads == [[1, 2], [0, 1]]
    else:
        assert plan.heads == [[1, 2], [0, 2]]
    assert plan.channels == [[c for c in range(96) if c not in weak[layer]] for layer in (0, 1)]
    small = structured_prune(model, heads=0.5, channels=0.25)
    cfg = small.cfg
    # 4 -> 2 query heads; key/value heads: multi-head attention drops the removed heads' (4 -> 2), grouped
    # query attention keeps both groups (2 -> 2, one query head each)
    assert (cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim) == (2, 2, 16, 72)
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
    from lmforge.convert import export_model

    model = tiny_model()
    small = structured_prune(model, heads=0.5, channels=0.5)
    config = Config(model=small.cfg)
    save_checkpoint(tmp_path / "ckpt", model_state=small.state_dict(), config=config)
    report = export_model(tmp_path / "ckpt", tmp_path / "hf", verify=True)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["intermediate_size"] == 48
    with torch.no_grad():
        torch.testing.assert_close(hf(X).logits, small(X), rtol=1e-4, atol=1e-4)


def direct_perplexity(model_dir, text: str) -> float:
    """exp(mean next-token cross-entropy) of ``text`` after end-of-text, in one forward pass (the text fits
    the context): an independent reference for the scores the pruning reports."""
    from safetensors.torch import load_file

    from lmforge.checkpoint import load_config_from
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.model.transformer import build_model

    model = build_model(load_config_from(model_dir).model, device="cpu")
    model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=False)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    ids = torch.tensor([[tokenizer.eot_id, *tokenizer.encode(text)]])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model.eval()(ids[:, :-1])[0].float(), ids[0, 1:])
    return float(loss.exp())


def test_prune_model_reports_what_it_saved_and_recovers(base_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from lmforge.errors import DataError
    from lmforge.tune.prune import prune_model

    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 2, encoding="utf-8")
    recover = tmp_path / "sft.jsonl"
    recover.write_text(
        "".join(json.dumps({"prompt": f"say {w}\n", "response": w}) + "\n" for w in ["a", "b"] * 10)
    )
    with pytest.raises(DataError, match="no-such.jsonl: no such recovery data file"):
        prune_model(base_checkpoint, tmp_path / "x", amount=0.5, recover=tmp_path / "no-such.jsonl")
    assert not (tmp_path / "x").exists()  # refused before anything was pruned or written

    result = prune_model(
        base_checkpoint, tmp_path / "pruned", amount=0.3, channels=0.25, eval_text=text, recover=recover,
        recover_steps=2,
    )  # fmt: skip
    saved = load_file(result.out / "model.safetensors")
    projections = [w for name, w in saved.items() if name.endswith("_proj.weight")]
    zeros = sum(int((w == 0).sum()) for w in projections)
    assert (result.zeros, result.total) == (zeros, sum(w.numel() for w in projections))
    assert result.sparsity == zeros / result.total and abs(result.sparsity - 0.3) < 1e-3
    assert result.parameters_after < result.parameters_before  # a quarter of the channels went
    assert result.perplexity_after == pytest.approx(direct_perplexity(result.out, text.read_text()), rel=1e-5)
    assert result.perplexity_before == pytest.approx(
        direct_perplexity(base_checkpoint, text.read_text()), rel=1e-5
    )
    assert result.recovered_dir is not None and result.recovered_dir.parent.name == "pruned-recovered"
    assert result.perplexity_recovered == pytest.approx(
        direct_perplexity(result.recovered_dir, text.read_text()), rel=1e-5
    )
    assert result.perplexity_recovered != result.perplexity_after  # the recovery trained
