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


def test_adamw_follows_the_configs_betas_eps_and_decay_over_several_steps():
    """Against AdamW written out by hand. Random gradients over several scales and six steps: Adam's first
    step with equal gradients is lr * sign(g) whatever betas and eps, so one such step proves nothing."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2))
    c = cfg(weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-6)  # none of them the defaults
    opt = build_optimizer(model, c, torch.device("cpu"))
    assert opt.defaults["fused"] is True
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in range(1, 7):
        for p in model.parameters():  # |g| from 1e-8 to 1e-2: eps matters for the small ones
            scale = 10.0 ** torch.empty(p.shape).uniform_(-8, -2)
            p.grad = (torch.randn(p.shape) * scale).to(p.dtype)
        for n, p in model.named_parameters():
            g = p.grad.double()
            decay = c.weight_decay if p.dim() >= 2 else 0.0  # matrices only
            params[n] *= 1 - c.lr * decay
            m[n] = c.beta1 * m[n] + (1 - c.beta1) * g
            v[n] = c.beta2 * v[n] + (1 - c.beta2) * g * g
            m_hat, v_hat = m[n] / (1 - c.beta1**t), v[n] / (1 - c.beta2**t)
            params[n] -= c.lr * m_hat / (v_hat.sqrt() + c.eps)
        opt.step()
        for n, p in zip(names, model.parameters()):
            torch.testing.assert_close(p.double(), params[n], rtol=1e-5, atol=1e-7, msg=f"step {t}: {n}")
