"""What every training loader yields and what the training loop asks of a loader.

Pre-training (``data.loader.TokenLoader``), supervised fine-tuning and classification all hand the loop the
same ``Batch``; the objective (``train.objectives``) decides how a batch becomes a loss.

Shape legend: B micro-batch, T sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

IGNORE_INDEX = -100  # a target that takes no loss (prompt tokens, padding): cross_entropy's ignore_index


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64 token ids
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE_INDEX where no loss; (B,) class ids to classify
    doc_ids: torch.Tensor | None = None  # (B, T) document index within a packed row (document masking)
    attention_mask: torch.Tensor | None = None  # (B, T) 1 on real tokens, 0 on right padding

    def to(self, device: torch.device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return replace(
            self,
            inputs=move(self.inputs),
            targets=move(self.targets),
            doc_ids=move(self.doc_ids),
            attention_mask=move(self.attention_mask),
        )


class BatchLoader(Protocol):
    """A resumable, infinite stream of micro-batches: the training loop needs nothing else from its data."""

    batch_size: int  # sequences per micro-batch
    vocab_size: int  # the largest token id + 1 the batches may hold
    tokenizer_path: str | None  # the tokenizer.json the ids come from (None: no text samples)

    def next_batch(self) -> Batch: ...

    def skip(self, n_batches: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
