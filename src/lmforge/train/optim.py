"""The optimizer and the learning-rate schedules.

AdamW with weight decay on matrices only (embeddings and projection weights); norms and biases are not
decayed. The schedule is a pure function of the step, so resuming needs nothing but the step number.

Under muP (``model.mup``, width multiplier m = d_model / mup_base_width) the hidden matrices (every matrix
but the token and position embeddings and the output head) form their own group with learning rate lr / m
and weight decay wd * m, so the decoupled decay per step, lr * wd, is the same at every width (as the
``mup`` package's MuAdamW does by default). Each group carries its ``lr_scale``; ``set_lr`` applies it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig

# Matrices whose learning rate muP leaves alone: the input embeddings and the output head (a tied head is
# the token embedding, and ``named_parameters`` names it so); wrappers (DDP, compile) only prefix names.
MUP_VECTOR_LIKE = ("embed_tokens.weight", "embed_positions.weight", "lm_head.weight", "score.weight")


def param_groups(model: nn.Module, weight_decay: float, *, width_mult: float = 1.0) -> list[dict]:
    """Tensors with 2+ dimensions (decayed) and vectors such as norms and biases (not decayed): two groups.
    A tied head is one parameter, so it appears once. Under tensor parallelism parameters live on different
    device meshes (DTensor shards beside replicated tensors), which one fused or foreach kernel call cannot
    mix: then each kind is split further, one group per mesh.

    ``width_mult`` m != 1 (muP) splits the hidden matrices off into a group with ``lr_scale`` 1/m and weight
    decay ``weight_decay * m``. Every group says its ``lr_scale`` (1 but there)."""
    mup = width_mult != 1.0
    kinds = ("hidden", "matrix", "vector") if mup else ("matrix", "vector")
    by_key: dict[tuple[str, object], list[nn.Parameter]] = {(kind, None): [] for kind in kinds}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "matrix" if param.dim() >= 2 else "vector"
        if mup and kind == "matrix" and not name.endswith(MUP_VECTOR_LIKE):
            kind = "hidden"
        by_key.setdefault((kind, getattr(param, "device_mesh", None)), []).append(param)
    if len(by_key) > len(kinds):  # several meshes: drop the placeholders if nothing lives outside a mesh
        by_key = {key: params for key, params in by_key.items() if params}
    order = sorted(by_key, key=lambda key: kinds.index(key[0]))  # decayed groups first, stable within a kind
    settings = {
        "hidden": {"weight_decay": weight_decay * width_mult, "lr_scale": 1.0 / width_mult},
        "matrix": {"weight_decay": weight_decay, "lr_scale": 1.0},
        "vector": {"weight_decay": 0.0, "lr_scale": 1.0},
    }
    return [{"params": by_key[key], **settings[key[0]]} for key in order]


def fused_supported(device: torch.device) -> bool:
    """PyTorch's fused AdamW kernel runs on CUDA, MPS and (since 2.4) the CPU."""
    return device.type in ("cuda", "cpu", "mps")


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, *, width_mult: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters; fused where the device has the kernel, foreach otherwise.
    ``width_mult``: muP's m (``ModelConfig.mup_width_mult``), 1 in the standard parametrisation."""
    fused = fused_supported(device)
    groups = param_groups(model, cfg.weight_decay, width_mult=width_mult)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    return torch.optim.AdamW(
        groups,
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
    """The schedule's ``lr`` times each group's ``lr_scale`` (muP's 1/m for hidden matrices, else 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
