"""Schedules against their closed forms, and AdamW's parameter groups."""

import math

import pytest
import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model.transformer import build_model
from lmforge.train.optim import build_optimizer, lr_at, param_groups


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 100, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, **kw})


@pytest.mark.parametrize("step", [0, 4, 9])
def test_warmup_is_linear(step):
    for schedule in ("cosine", "linear", "constant", "wsd"):
        assert lr_at(step, cfg(schedule=schedule)) == pytest.approx(1e-3 * (step + 1) / 10, rel=1e-12)


@pytest.mark.parametrize("step", [10, 30, 54, 77, 99])
def test_cosine_closed_form(step):
    progress = (step - 10) / (99 - 10)
    expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
    assert lr_at(step, cfg(schedule="cosine")) == pytest.approx(expected, rel=1e-12)


def test_cosine_and_linear_end_points():
    for schedule in ("cosine", "linear"):
        assert lr_at(10, cfg(schedule=schedule)) == pytest.approx(1e-3)
        assert lr_at(99, cfg(schedule=schedule)) == pytest.approx(1e-4)
    assert lr_at(54, cfg(schedule="linear")) == pytest.approx(1e-3 - 0.9e-3 * 44 / 89)
    assert all(lr_at(s, cfg(schedule="constant")) == 1e-3 for s in range(10, 100))


def test_wsd_is_stable_then_decays_linearly():
    c = cfg(schedule="wsd", decay_fraction=0.2)  # decay over the last 20 steps: 80..99
    assert [lr_at(s, c) for s in (10, 50, 79)] == [1e-3, 1e-3, 1e-3]
    assert lr_at(80, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-4)
    assert lr_at(90, c) == pytest.approx(1e-3 - 0.9e-3 * 10 / 19)


def test_no_warmup_starts_at_lr():
    assert lr_at(0, cfg(warmup_steps=0, schedule="cosine")) == pytest.approx(1e-3)


def test_weight_decay_on_matrices_only():
    model = build_model(ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=2, bias=True, ffn="gelu"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 1
    }
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    # the tied head is the embedding: counted once
    assert sum(1 for p in decay["params"] if p is model.embed_tokens.weight) == 1


def test_fused_adamw_on_cpu_matches_reference_step():
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2))
    ref = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2))
    opt = build_optimizer(model, cfg(weight_decay=0.1), torch.device("cpu"))
    assert opt.defaults["fused"] is True
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for m, o in ((model, opt), (ref, ref_opt)):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.01
        o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
