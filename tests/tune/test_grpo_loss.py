"""The GRPO-family policy objective against a float64 computation written from the papers' formulas, one
completion and one token at a time (values and gradients), and the group advantages against a hand count."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.tune.grpo import (
    STD_EPS,
    VARIANTS,
    PolicyLoss,
    group_advantages,
    informative_groups,
    policy_terms,
)

P, G, T = 3, 4, 7
N = P * G


def fixed_batch(variant: str, seed: int = 0):
    """Log-probs of N completions of different lengths, the sampling policy's a little off (so that some
    ratios are clipped and some not), a reference, and rewards with one group all equal."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=gen, dtype=torch.float64) * 3  # (N, T)
    spread = 1e-3 if variant == "gspo" else 0.3  # GSPO clips its (per-completion) ratio at 3e-4 / 4e-4
    logps = old + spread * torch.randn(N, T, generator=gen, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(N, T, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, T + 1, (N,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)  # (N, T)
    rewards = torch.randint(0, 3, (P, G), generator=gen).to(torch.float64)
    rewards[1] = 1.0  # a group with no signal
    return logps, old, ref, mask, rewards


def reference_loss(variant, logps, old, ref, mask, advantages, eps_low, eps_high, beta, max_length):
    """The objective written out term by term from each paper (float64 scalars, Python loops)."""
    total, units = 0.0, 0
    all_tokens = int(mask.sum())
    for i in range(N):
        n = int(mask[i].sum())
        A = float(advantages[i])
        if variant == "gspo":  # s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|)
            s = torch.exp(sum(logps[i, t] - old[i, t] for t in range(n)) / n)
            seq = -torch.minimum(s * A, torch.clamp(s, 1 - eps_low, 1 + eps_high) * A)
            kl = sum(torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1 for t in range(n)) / n
            total = total + seq + beta * kl
            units += 1
            continue
        terms = []
        for t in range(n):
            r = torch.exp(logps[i, t] - old[i, t])
            term = -torch.minimum(r * A, torch.clamp(r, 1 - eps_low, 1 + eps_high) * A)
            d = ref[i, t] - logps[i, t]
            terms.append(term + beta * (torch.exp(d) - d - 1))
        if variant == "grpo":  # 1/G sum_i 1/|o_i| sum_t
            total = total + sum(terms) / n
            units += 1
        elif variant == "dr_grpo":  # 1/G sum_i 1/L_max sum_t
            total = total + sum(terms) / max_length
            units += 1
        else:  # dapo: 1/sum_i |o_i| sum_i sum_t
            total = total + sum(terms)
    if variant == "dapo":
        units = all_tokens
    return total, units


def hand_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    out = torch.empty_like(rewards)
    for p in range(rewards.shape[0]):
        group = [float(x) for x in rewards[p]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        for g, x in enumerate(group):
            out[p, g] = (x - mean) / (std + STD_EPS) if scale else x - mean
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_a_hand_count(scale):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards, scale=scale), hand_advantages(rewards, scale))
    assert informative_groups(rewards).tolist() == [True, False, True]


@pytest.mark.parametrize("variant", VARIANTS)
def test_policy_loss_and_its_gradient_equal_the_papers_formula(variant):
    logps, old, ref, mask, rewards = fixed_batch(variant)
    cfg = PolicyLoss(variant=variant, beta=0.04).resolved()  # a KL term in every variant, to check it too
    advantages = group_advantages(rewards, scale=cfg.scale_rewards).reshape(N)
    max_length = T + 3

    ours_in = logps.clone().requires_grad_(True)
    terms = policy_terms(ours_in, old, advantages, mask, cfg, ref_logps=ref, max_length=max_length)
    terms.loss.backward()

    theirs_in = logps.clone().requires_grad_(True)
    expected, units = reference_loss(
        variant,
        theirs_in,
        old,
        ref,
        mask,
        advantages,
        cfg.epsilon_low,
        cfg.epsilon_high,
        cfg.beta,
        max_length,
    )
    expected.backward()

    assert terms.units == units
    torch.testing.assert_close(terms.loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-10, atol=1e-12)
    assert float(ours_in.grad.abs().sum()) > 0
    assert torch.all(ours_in.grad[mask == 0] == 0)  # padding takes no gradient
    # the fixture exercises both sides of the clip: some tokens held back, some not
    assert 0 < float(terms.clipped) / units < 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_defaults(variant):
    cfg = PolicyLoss(variant=variant).resolved()
    expected = {
        "grpo": (0.2, 0.2, 0.04, True, False),
        "dr_grpo": (0.2, 0.2, 0.0, False, False),
        "dapo": (0.2, 0.28, 0.0, True, True),
        "gspo": (3e-4, 4e-4, 0.0, True, False),
    }[variant]
    assert (cfg.epsilon_low, cfg.epsilon_high, cfg.beta, cfg.scale_rewards, cfg.dynamic_sampling) == expected
    assert PolicyLoss(variant=variant).problems() == []


def test_on_policy_first_step_is_the_advantage_weighted_likelihood():
    """On the first optimisation step pi_old = pi: the ratio is 1, nothing is clipped, and the gradient is
    -A_i / |o_i| on each token's log-prob (GRPO): the policy gradient with group-relative advantages."""
    logps, _, _, mask, rewards = fixed_batch("grpo", seed=3)
    advantages = group_advantages(rewards, scale=True).reshape(N)
    x = logps.clone().requires_grad_(True)
    terms = policy_terms(x, logps.detach(), advantages, mask, PolicyLoss(variant="grpo", beta=0.0))
    terms.loss.backward()
    expected = -(advantages[:, None] / mask.sum(-1, keepdim=True)) * mask
    torch.testing.assert_close(x.grad, expected)
    assert float(terms.clipped) == 0.0 and float(terms.kl) == 0.0


def test_a_kl_penalty_without_a_reference_is_refused():
    logps, old, _, mask, rewards = fixed_batch("grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_terms(logps, old, torch.zeros(N, dtype=torch.float64), mask, PolicyLoss(variant="grpo"))


def test_bad_settings_are_named():
    assert "variant='ppo'" in PolicyLoss(variant="ppo").problems()[0]
    assert any("epsilon_low" in p for p in PolicyLoss(epsilon_low=1.5).problems())
    assert any("beta" in p for p in PolicyLoss(beta=-1.0).problems())
