"""Objectives: how one batch becomes a loss. The training loop knows only this protocol, so pre-training,
supervised fine-tuning, classification and preference tuning share one loop.

An objective returns the loss SUMMED over its units (target tokens, sequences, pairs) and counts those units;
the loop divides by the count over the whole accumulated batch and all processes, so k micro-batches on
n processes give the gradient of one batch k x n times larger, however the units fall.

An objective may also define ``metrics(model, batch) -> {name: tensor summed over the units}``: figures of its
own (preference tuning: rewards, reward accuracy) that the loop logs per unit at log steps and validation.

Shape legend: B micro-batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batch import IGNORE_INDEX, Batch


class Objective(Protocol):
    def units(self, batch: Batch) -> int:
        """How many terms the batch adds to the loss's average (e.g. target tokens that are not ignored)."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The summed loss of the batch's units, a scalar (fp32 where the model computes in lower precision)."""
        ...


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the targets that are not IGNORE_INDEX."""
    V = logits.shape[-1]
    return F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )  # logits (B*T, V), targets (B*T,)


class LanguageModeling:
    """Next-token prediction; packed rows with ``doc_ids`` attend within their document only."""

    def units(self, batch: Batch) -> int:
        return int((batch.targets != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if batch.doc_ids is not None:
            logits = model(batch.inputs, doc_ids=batch.doc_ids)  # (B, T, V)
        else:
            logits = model(batch.inputs)  # (B, T, V)
        return token_cross_entropy(logits, batch.targets)


LANGUAGE_MODELING = LanguageModeling()
