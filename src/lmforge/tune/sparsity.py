"""Which weights pruning acts on, how sparse they are, and keeping pruned zeros at zero while training;
shared by pruning (``prune.py``) and the recovery fine-tune (``sft.py``)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.transformer import Transformer


def prunable_weights(model: Transformer) -> dict[str, nn.Parameter]:
    """The block projection weights (q/k/v/o, gate/up/down), by name."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.startswith("layers.") and name.endswith("_proj.weight")
    }


def sparsity(model: Transformer) -> dict:
    """Exact zero counts over the prunable weights: {zeros, total, sparsity}."""
    zeros = total = 0
    for p in prunable_weights(model).values():
        zeros += int((p == 0).sum())
        total += p.numel()
    return {"zeros": zeros, "total": total, "sparsity": zeros / max(total, 1)}


def keep_pruned_at_zero(masks: dict[str, torch.Tensor], model: Transformer) -> list:
    """Gradient hooks that zero the gradient of pruned weights, so a recovery fine-tune (AdamW, decoupled
    weight decay) leaves them exactly zero. Returns the hook handles."""
    params = dict(model.named_parameters())
    handles = []
    for name, mask in masks.items():
        keep = mask.to(params[name].dtype)
        handles.append(params[name].register_hook(lambda grad, keep=keep: grad * keep.to(grad.device)))
    return handles
