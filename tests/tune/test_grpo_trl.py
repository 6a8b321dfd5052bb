"""The GRPO-family loss against TRL's own: ``GRPOTrainer._compute_loss`` (trl 1.16) called on fixed tensors.

TRL's method is run unbound on a stand-in trainer that holds only the attributes it reads (loss type, clip
range, beta, a one-process accelerator) and whose per-token log-prob hook returns our fixed log-probs, so the
clipping, ratio, KL and aggregation are TRL's code. TRL offers grpo, dr_grpo, dapo and (as grpo with
``importance_sampling_level="sequence"``) GSPO. TRL's loss is a mean over its batch; ours is a sum over units
that the loop divides by the unit count, so ``loss / units`` is compared (values and gradients)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.tune.grpo import VARIANTS, PolicyLoss, group_advantages, policy_terms
from tests.conftest import require_module
from tests.tune.test_grpo_loss import G, P, T, fixed_batch

TRL_SETTINGS = {  # our variant -> (TRL loss_type, importance_sampling_level)
    "grpo": ("grpo", "token"),
    "dr_grpo": ("dr_grpo", "token"),
    "dapo": ("dapo", "token"),
    "gspo": ("grpo", "sequence"),
}


def trl_loss(variant, logps, old, ref, mask, advantages, cfg: PolicyLoss, max_length: int):
    """(loss, metrics) of TRL's ``_compute_loss`` on the fixed batch."""
    grpo_trainer = require_module("trl.trainer.grpo_trainer", "dev", " (TRL, the reference implementation)")
    loss_type, level = TRL_SETTINGS[variant]
    identity = lambda x, **_: x  # noqa: E731  one process: gather and reduce change nothing
    stand_in = SimpleNamespace(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        beta=cfg.beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        top_entropy_quantile=1.0,
        aux_loss_enabled=False,
        off_policy_mask_threshold=None,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_length,
        accelerator=SimpleNamespace(
            gather=identity, reduce=identity, gather_for_metrics=identity, num_processes=1
        ),
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    N = logps.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(N, 1, dtype=torch.long),
        "prompt_mask": torch.ones(N, 1, dtype=torch.long),
        "completion_ids": torch.zeros(N, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = grpo_trainer.GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss, {k: v[-1] for k, v in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_and_gradients_equal_trls(variant, beta):
    logps, old, ref, mask, rewards = fixed_batch(variant, seed=1)
    cfg = PolicyLoss(variant=variant, beta=beta).resolved()
    advantages = group_advantages(rewards, scale=cfg.scale_rewards).reshape(-1)  # (N,)
    max_length = T + 3

    ours_in = logps.clone().requires_grad_(True)
    terms = policy_terms(ours_in, old, advantages, mask, cfg, ref_logps=ref, max_length=max_length)
    (terms.loss / terms.units).backward()

    theirs_in = logps.clone().requires_grad_(True)
    loss, metrics = trl_loss(variant, theirs_in, old, ref, mask, advantages, cfg, max_length)
    loss.backward()

    assert terms.units == (int(mask.sum()) if variant == "dapo" else P * G)
    assert torch.allclose(terms.loss / terms.units, loss, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=1e-10, atol=1e-14)
    assert ours_in.grad.abs().sum() > 0  # a gradient that is zero everywhere would prove nothing
    if variant == "dapo":  # token-level aggregation: the same means as TRL's global token means
        assert (
            abs(terms.clipped.item() / terms.units - metrics["clip_ratio/region_mean"]) < 1e-7
        )  # TRL counts in float32
        assert metrics["clip_ratio/region_mean"] > 0  # some ratios are clipped in the fixed batch
        if beta:
            assert abs(terms.kl.item() / terms.units - metrics["kl"]) < 1e-7
