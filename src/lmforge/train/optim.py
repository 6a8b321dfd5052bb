"""The optimizer and the learning-rate schedules.

AdamW with weight decay on matrices only (embeddings and projection weights); norms and biases are not
decayed. The schedule is a pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Tensors with 2+ dimensions (decayed) and vectors such as norms and biases (not decayed): two groups.
    A tied head is one parameter, so it appears once. Under tensor parallelism parameters live on different
    device meshes (DTensor shards beside replicated tensors), which one fused or foreach kernel call cannot
    mix: then each kind is split further, one group per mesh."""
    by_key: dict[tuple[bool, object], list[nn.Parameter]] = {(True, None): [], (False, None): []}
    for param in model.parameters():
        if param.requires_grad:
            by_key.setdefault((param.dim() >= 2, getattr(param, "device_mesh", None)), []).append(param)
    if len(by_key) > 2:  # several meshes: drop the placeholders if nothing lives outside a mesh
        by_key = {key: params for key, params in by_key.items() if params}
    order = sorted(by_key, key=lambda key: not key[0])  # decayed groups first, stable within each kind
    return [{"params": by_key[key], "weight_decay": weight_decay if key[0] else 0.0} for key in order]


def fused_supported(device: torch.device) -> bool:
    """PyTorch's fused AdamW kernel runs on CUDA, MPS and (since 2.4) the CPU."""
    return device.type in ("cuda", "cpu", "mps")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters; fused where the device has the kernel, foreach otherwise."""
    fused = fused_supported(device)
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``cfg.steps``.

    Linear warmup from lr/warmup to lr over ``warmup_steps``, then, to ``min_lr`` at the last step:
    cosine (half a cosine), linear, constant (stays at lr), or wsd (warmup-stable-decay: constant, then a
    linear decay over the last ``decay_fraction`` of the steps).
    """
    lr, min_lr, total, warmup = cfg.lr, cfg.min_lr, cfg.steps, cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return lr
        progress = (step - decay_start) / max(1, total - 1 - decay_start)
    else:
        progress = (step - warmup) / max(1, total - 1 - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return lr + (min_lr - lr) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
