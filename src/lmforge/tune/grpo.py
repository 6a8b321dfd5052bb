"""Reinforcement learning with verifiable rewards: the policy objective of GRPO and its successors.

For each prompt a group of G completions is sampled; a program scores each one (a reward), and each
completion's advantage is its reward relative to its own group's (no value model). The policy is then moved
by a clipped importance-ratio objective (PPO's), with an optional KL penalty toward a reference model:

    loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t,
    r_t = pi(y_t) / pi_old(y_t),  KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (the "k3" estimator)

where pi_old is the policy that sampled the completions (equal to pi on the first optimisation step of a
generation batch). The variants differ in four switches, each with its paper's default:

| variant | advantage | ratio | loss over tokens | eps_low / eps_high | beta |
|---|---|---|---|---|---|
| ``grpo`` (DeepSeekMath, Shao et al. 2024) | (r - mean) / std | per token | mean per completion, then mean | 0.2 / 0.2 | 0.04 |
| ``dr_grpo`` (Liu et al. 2025, "GRPO done right") | r - mean | per token | sum per completion / max length | 0.2 / 0.2 | 0 |
| ``dapo`` (Yu et al. 2025) | (r - mean) / std | per token | mean over every token of the batch | 0.2 / 0.28 | 0 |
| ``gspo`` (Zheng et al. 2025) | (r - mean) / std | per completion: exp(mean log-ratio) | per completion | 3e-4 / 4e-4 | 0 |

DAPO also drops groups whose rewards are all equal (zero advantage: no signal), ``dynamic_sampling``.

Units (what the training loop averages over, see ``train.objectives``): completions for ``grpo``, ``dr_grpo``
and ``gspo``, tokens for ``dapo``. ``policy_terms`` returns sums over units, so micro-batches and processes
add up to the same gradient as one large batch.

Shape legend: P prompts, G completions per prompt, N = P x G completions, T completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batch import IGNORE_INDEX, Batch

Variant = Literal["grpo", "dr_grpo", "dapo", "gspo"]
VARIANTS: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "gspo")

# (scale advantages by the group's std, ratio level, aggregation, eps_low, eps_high, beta, dynamic sampling)
_PAPER_DEFAULTS: dict[str, tuple[bool, str, str, float, float, float, bool]] = {
    "grpo": (True, "token", "sequence", 0.2, 0.2, 0.04, False),
    "dr_grpo": (False, "token", "constant", 0.2, 0.2, 0.0, False),
    "dapo": (True, "token", "token", 0.2, 0.28, 0.0, True),
    "gspo": (True, "sequence", "sequence", 3e-4, 4e-4, 0.0, False),
}
STD_EPS = 1e-4  # added to a group's reward std before dividing (a group of near-equal rewards stays finite)


@dataclass(frozen=True, kw_only=True)
class PolicyLoss:
    """How completions and their advantages become a loss; ``None`` fields take the variant's default."""

    variant: Variant = "grpo"
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float | None = None  # weight of the KL penalty to the reference; 0: no reference needed
    scale_rewards: bool | None = None  # divide advantages by the group's reward std
    dynamic_sampling: bool | None = None  # drop groups whose rewards are all equal

    def problems(self) -> list[str]:
        out = []
        if self.variant not in VARIANTS:
            out.append(f"variant={self.variant!r} must be one of {', '.join(VARIANTS)}")
            return out
        r = self.resolved()
        if not 0 <= r.epsilon_low < 1:
            out.append(f"epsilon_low={r.epsilon_low} must be in [0, 1)")
        if r.epsilon_high < 0:
            out.append(f"epsilon_high={r.epsilon_high} must be >= 0")
        if r.beta < 0:
            out.append(f"beta={r.beta} must be >= 0 (0: no KL penalty)")
        return out

    def resolved(self) -> PolicyLoss:
        """Every ``None`` replaced by the variant's paper default."""
        scale, _, _, low, high, beta, dynamic = _PAPER_DEFAULTS[self.variant]
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return replace(
            self,
            epsilon_low=pick(self.epsilon_low, low),
            epsilon_high=pick(self.epsilon_high, high),
            beta=pick(self.beta, beta),
            scale_rewards=pick(self.scale_rewards, scale),
            dynamic_sampling=pick(self.dynamic_sampling, dynamic),
        )

    @property
    def ratio_level(self) -> str:  # "token" or "sequence"
        return _PAPER_DEFAULTS[self.variant][1]

    @property
    def aggregation(self) -> str:  # "sequence", "constant" or "token"
        return _PAPER_DEFAULTS[self.variant][2]


def group_advantages(rewards: torch.Tensor, *, scale: bool) -> torch.Tensor:
    """Each completion's reward relative to its group's: (P, G) -> (P, G). With ``scale``, divided by the
    group's standard deviation (unbiased, + STD_EPS), as DeepSeekMath's GRPO; without, Dr. GRPO's."""
    centred = rewards - rewards.mean(dim=-1, keepdim=True)  # (P, G)
    if scale:
        centred = centred / (rewards.std(dim=-1, keepdim=True) + STD_EPS)
    return centred


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(P,) True for the groups whose rewards are not all equal (DAPO's dynamic sampling keeps only those)."""
    return (rewards.max(dim=-1).values - rewards.min(dim=-1).values) > 0


class PolicyTerms(NamedTuple):
    """Sums over the batch's units (see the module docstring) and the unit count."""

    loss: torch.Tensor  # scalar
    units: int
    kl: torch.Tensor  # the KL estimate, aggregated as the loss is
    clipped: torch.Tensor  # fraction of tokens whose ratio the clip held back, aggregated as the loss is
    ratio: torch.Tensor  # the importance ratio, aggregated as the loss is


def policy_terms(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLoss,
    *,
    ref_logps: torch.Tensor | None = None,
    max_length: int | None = None,
) -> PolicyTerms:
    """The clipped policy objective of N completions.

    ``logps`` (N, T): log-probabilities of the sampled tokens under the policy being trained (with grad);
    ``old_logps`` (N, T): under the policy that sampled them; ``ref_logps`` (N, T): under the reference (needed
    when beta > 0); ``advantages`` (N,); ``mask`` (N, T): 1 on completion tokens, 0 on padding;
    ``max_length``: Dr. GRPO's constant normaliser (the generation budget), T when None.
    """
    cfg = cfg.resolved()
    mask = mask.to(logps.dtype)
    lengths = mask.sum(dim=-1).clamp(min=1)  # (N,)
    log_ratio = (logps - old_logps) * mask  # (N, T)
    if (
        cfg.ratio_level == "sequence"
    ):  # GSPO: one ratio per completion, its length-normalised likelihood ratio
        ratio = (log_ratio.sum(dim=-1) / lengths).exp()[:, None].expand_as(logps)  # (N, T)
    else:
        ratio = log_ratio.exp()  # (N, T)
    A = advantages[:, None].to(logps.dtype)  # (N, 1)
    clipped_ratio = ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -torch.minimum(ratio * A, clipped_ratio * A)  # (N, T)
    held = ((ratio < 1 - cfg.epsilon_low) & (A < 0)) | ((ratio > 1 + cfg.epsilon_high) & (A > 0))  # (N, T)
    if cfg.beta > 0:
        if ref_logps is None:
            raise ValueError(f"beta={cfg.beta} needs the reference's log-probabilities (ref_logps)")
        d = ref_logps - logps
        kl = d.exp() - d - 1  # (N, T), k3: unbiased, >= 0
        per_token = per_token + cfg.beta * kl
    else:
        kl = (
            torch.zeros_like(logps)
            if ref_logps is None
            else (ref_logps - logps).exp() - (ref_logps - logps) - 1
        )

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        x = x * mask
        if cfg.aggregation == "token":
            return x.sum()
        if cfg.aggregation == "constant":
            return (x.sum(dim=-1) / (max_length or logps.shape[-1])).sum()
        return (x.sum(dim=-1) / lengths).sum()

    units = int(mask.sum()) if cfg.aggregation == "token" else logps.shape[0]
    return PolicyTerms(
        loss=aggregate(per_token),
        units=units,
        kl=aggregate(kl.detach()),
        clipped=aggregate(held.to(logps.dtype)),
        ratio=aggregate(ratio.detach()),
    )


# -- the objective of the one training loop ----------------------------------------------------------------


@dataclass
class RolloutBatch(Batch):
    """A micro-batch of completions: ``inputs`` (B, T) prompt + completion, right-padded; ``targets`` (B, T)
    the completion's tokens (its end-of-text included), IGNORE_INDEX on the prompt and padding. Beside them
    what the rollout recorded: the advantages (B,), the sampling policy's token log-probs when the batch is
    optimised more than once (else None: the policy's own, detached), the reference's when beta > 0, and
    the figures of the generation the batch comes from (logged by the loop)."""

    advantages: torch.Tensor | None = None  # (B,)
    old_logps: torch.Tensor | None = None  # (B, T)
    ref_logps: torch.Tensor | None = None  # (B, T)
    stats: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device) -> RolloutBatch:
        moved = super().to(device)
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        moved.advantages = move(self.advantages)
        moved.old_logps, moved.ref_logps = move(self.old_logps), move(self.ref_logps)
        return moved


def token_logps(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each target token under the sampling distribution, fp32, 0 where ignored; the logits
    divided by ``temperature``), (B, T) and (B, T, V)."""
    logits = model(inputs)  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    B, T, V = logits.shape
    logps = -F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(B, T)
    return logps, logits


@dataclass(frozen=True)
class GRPOObjective:
    """The policy objective as an ``Objective``: sums over the variant's units (completions, or tokens for
    DAPO); ``max_length`` is Dr. GRPO's constant normaliser (the generation budget). Log-probs are taken at
    the sampling temperature (logits / T), for the policy, the sampling policy and the reference alike, as
    TRL does."""

    cfg: PolicyLoss
    max_length: int
    temperature: float = 1.0  # the sampling temperature: log-probs are those of the distribution sampled

    def units(self, batch: Batch) -> int:
        if self.cfg.aggregation == "token":
            return int((batch.targets != IGNORE_INDEX).sum())
        return batch.inputs.shape[0]

    def terms(self, model: nn.Module, batch: RolloutBatch) -> tuple[PolicyTerms, torch.Tensor, torch.Tensor]:
        logps, logits = token_logps(model, batch.inputs, batch.targets, self.temperature)  # (B, T), (B, T, V)
        mask = batch.targets != IGNORE_INDEX  # (B, T)
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        terms = policy_terms(
            logps,
            old,
            batch.advantages,
            mask,
            self.cfg,
            ref_logps=batch.ref_logps,
            max_length=self.max_length,
        )
        return terms, logits, mask

    def loss(self, model: nn.Module, batch: RolloutBatch) -> torch.Tensor:
        return self.terms(model, batch)[0].loss

    def metrics(self, model: nn.Module, batch: RolloutBatch) -> dict[str, torch.Tensor]:
        """Sums over the batch's units (the loop divides by them): KL to the reference, the fraction of
        tokens clipped, the ratio, the policy's entropy per token (each aggregated as the loss is), and the
        figures of the batch's generation (rewards, zero-variance groups, lengths, times)."""
        terms, logits, mask = self.terms(model, batch)
        logp_all = logits.float().log_softmax(dim=-1)  # (B, T, V)
        entropy = -(logp_all.exp() * logp_all).sum(dim=-1)  # (B, T)
        m = mask.to(entropy.dtype)
        if self.cfg.aggregation == "token":
            entropy_sum = (entropy * m).sum()
        else:
            entropy_sum = ((entropy * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
        units = self.units(batch)
        out = {"kl": terms.kl, "clip_fraction": terms.clipped, "ratio": terms.ratio, "entropy": entropy_sum}
        out.update({name: torch.tensor(value * units) for name, value in batch.stats.items()})
        return out
