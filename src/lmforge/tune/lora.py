"""LoRA adapters (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update B A, scaled by
alpha / rank, merged back into the weight for export.

Shape legend: N any leading dimensions, I input features, O output features, r rank.

A ``LoRALinear`` keeps the wrapped layer's ``weight`` and ``bias`` under the same names, so checkpoints of
an adapted model still carry the base weights where the plain model expects them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import ConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"lora rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            out.append(f"lora alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            out.append(f"lora targets {list(self.targets)}: choose among {', '.join(PROJECTIONS)}")
        return out

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """``base(x) + scaling * B(A(dropout(x)))`` with A (r, I) random and B (O, r) zero, so training starts
    from the base model exactly."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scaling = cfg.scaling
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(cfg.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()  # (N, I) -> (N, r) -> (N, O)
        return super().forward(x) + self.scaling * update

    def merged(self) -> nn.Linear:
        """A plain linear layer whose weight includes the low-rank update."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Swap every targeted projection for a LoRALinear and freeze everything but the adapters."""
    problems = cfg.problems()
    if problems:
        raise ConfigError("invalid LoRA settings:\n  " + "\n  ".join(problems))
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in cfg.targets and isinstance(child, nn.Linear) and not isinstance(child, LoRALinear):
                setattr(module, name, LoRALinear(child, cfg))
                swapped += 1
    if not swapped:
        raise ConfigError(f"no layer named {list(cfg.targets)} in the model to adapt")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the result has the plain model's parameter names."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
