"""A resumable loader over in-memory rows (fine-tuning examples), shared by every fine-tuning variant: a
seeded permutation per epoch, ``collate`` turning a micro-batch of rows into a ``Batch``."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from lmforge.data.batch import Batch
from lmforge.errors import DataError

Row = TypeVar("Row")


class RowLoader(Generic[Row]):
    """Rows in a seeded random order, epoch after epoch, with the ``BatchLoader`` interface."""

    def __init__(
        self,
        rows: list[Row],
        *,
        collate: Callable[[Sequence[Row]], Batch],
        batch_size: int,
        seed: int,
        vocab_size: int,
        tokenizer_path: str | None,
        what: str = "fine-tuning data",
    ):
        if not rows:
            raise DataError(f"no training rows in the {what} (every example was empty or too long)")
        self.rows, self.collate, self.batch_size, self.seed = rows, collate, batch_size, seed
        self.vocab_size, self.tokenizer_path, self.what = vocab_size, tokenizer_path, what
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_index(self) -> int:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index

    def next_batch(self) -> Batch:
        return self.collate([self.rows[self._next_index()] for _ in range(self.batch_size)])

    def skip(self, n_batches: int) -> None:
        for _ in range(n_batches * self.batch_size):
            self._next_index()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows) or state.get("seed", self.seed) != self.seed:
            raise DataError(f"the {self.what} changed since the checkpoint (row count or seed differ)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
