"""Mixture-of-Experts bookkeeping for the training loop: the load of each MoE layer over one optimizer step
(all micro-batches, all data-parallel processes), the DeepSeek-V3 bias update that follows the step, and
the figures the loop logs (tokens per expert max/mean, dropped assignments, balancing losses).

The MoE layers themselves (``model/moe.py``) leave one ``RouterStats`` per training forward; the loop adds
their ``loss`` to the objective's (``forward_backward``) and hands each micro-batch's stats to ``ExpertLoad``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.distributed.parallelize import World
from lmforge.model.moe import MoEFeedForward, moe_layers


class ExpertLoad:
    """The summed router stats of one optimizer step, per MoE layer; None from ``of`` for a dense model."""

    def __init__(self, layers: list[MoEFeedForward]):
        self.layers = layers
        self.tokens = [torch.zeros(layer.moe.n_experts, dtype=torch.float64) for layer in layers]  # (E,) each
        self.dropped = [0.0] * len(layers)
        self.aux_loss = [0.0] * len(layers)
        self.z_loss = [0.0] * len(layers)
        self.forwards = 0

    @classmethod
    def of(cls, model: nn.Module) -> ExpertLoad | None:
        layers = moe_layers(model)
        return cls(layers) if layers else None

    def add(self) -> None:
        """Take in the stats the layers left from the micro-batch just run."""
        self.forwards += 1
        for i, layer in enumerate(self.layers):
            stats = layer.last_stats
            if stats is None:
                continue
            self.tokens[i] += stats.tokens_per_expert.detach().to("cpu", torch.float64)
            self.dropped[i] += float(stats.dropped)
            self.aux_loss[i] += float(stats.aux_loss)
            self.z_loss[i] += float(stats.z_loss)

    def all_reduce(self, world: World) -> None:
        """Sum the load over the data-parallel processes, so every replica moves its biases alike."""
        if not world.distributed:
            return
        flat = torch.cat(
            [
                torch.cat(self.tokens),
                torch.tensor(self.dropped + self.aux_loss + self.z_loss + [self.forwards]),
            ]
        ).to(world.device)
        dist.all_reduce(flat, group=world.dp_group)
        flat = flat.cpu()
        sizes = [t.numel() for t in self.tokens]
        self.tokens = list(flat[: sum(sizes)].split(sizes))
        rest = flat[sum(sizes) :].tolist()
        n = len(self.layers)
        self.dropped, self.aux_loss, self.z_loss = rest[:n], rest[n : 2 * n], rest[2 * n : 3 * n]
        self.forwards = int(rest[-1])

    def update_expert_bias(self) -> None:
        """DeepSeek-V3's step for every layer with ``bias_update_rate > 0`` (after the optimizer step)."""
        for layer, tokens in zip(self.layers, self.tokens, strict=True):
            layer.update_expert_bias(tokens)

    def metrics(self) -> dict[str, Any]:
        """``moe_load_max_mean`` (the most loaded expert over the mean, worst layer; 1 is balanced),
        ``moe_dropped_frac`` (dropped assignments over all), mean ``moe_aux_loss`` / ``moe_z_loss``, the same
        per layer (``.../layer{i}``), and ``moe_tokens_per_expert`` (one list per layer; metrics.jsonl only)."""
        out: dict[str, Any] = {}
        forwards = max(self.forwards, 1)
        ratios, dropped, assigned = [], 0.0, 0.0
        for i, layer in enumerate(self.layers):
            tokens, index = self.tokens[i], layer.layer
            total = float(tokens.sum())
            ratio = float(tokens.max() / tokens.mean()) if total > 0 else 1.0
            ratios.append(ratio)
            dropped += self.dropped[i]
            assigned += total
            out[f"moe_load_max_mean/layer{index}"] = ratio
            out[f"moe_dropped/layer{index}"] = self.dropped[i]
            out[f"moe_aux_loss/layer{index}"] = self.aux_loss[i] / forwards
        out["moe_load_max_mean"] = max(ratios)
        out["moe_dropped_frac"] = dropped / assigned if assigned else 0.0
        out["moe_aux_loss"] = sum(self.aux_loss) / forwards / len(self.layers)
        out["moe_z_loss"] = sum(self.z_loss) / forwards / len(self.layers)
        out["moe_tokens_per_expert"] = [[int(v) for v in t.tolist()] for t in self.tokens]
        return out
