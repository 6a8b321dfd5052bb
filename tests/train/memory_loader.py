"""A loader over an in-memory token array with the ``TokenLoader`` interface, for loop tests that need no
prepared data (the loop accepts any such loader, as fine-tuning does)."""

from __future__ import annotations

import torch

from lmforge.data.batch import Batch


class MemoryLoader:
    """Random windows of ``tokens`` from a seeded generator; the state is the number of batches drawn."""

    def __init__(
        self, tokens: torch.Tensor, *, seq_len: int, batch_size: int, vocab_size: int, seed: int = 0
    ):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.vocab_size, self.seed, self.tokenizer_path = vocab_size, seed, None
        self.batches = 0

    def _batch(self, index: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=gen)
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return Batch(rows[:, :-1].clone(), rows[:, 1:].clone())

    def next_batch(self) -> Batch:
        batch = self._batch(self.batches)
        self.batches += 1
        return batch

    def skip(self, n_batches: int) -> None:
        self.batches += n_batches

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


def pattern_tokens(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a fixed random sequence of 97 tokens repeated."""
    period = torch.randint(0, vocab_size, (97,), generator=torch.Generator().manual_seed(seed))
    return period.repeat(n // 97 + 1)[:n]


def tiny_config(out_dir, *overrides: str):
    """A 2-layer, 32-wide model and a short run: seconds on a CPU."""
    from lmforge.config import load_config

    base = [
        "model.vocab_size=64",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_seq_len=32",
        f"train.out_dir={out_dir}",
        "train.steps=30",
        "train.seq_len=16",
        "train.micro_batch=4",
        "train.log_every=1",
        "train.eval_every=10",
        "train.ckpt_every=10",
        "train.warmup_steps=5",
        "train.lr=1e-2",
        "train.device=cpu",
    ]
    return load_config(None, [*base, *overrides])


def loaders(seed: int = 0):
    """A training loader and a validation-batch factory over the same pattern."""
    tokens = pattern_tokens(5000, 64)
    train = MemoryLoader(tokens, seq_len=16, batch_size=4, vocab_size=64, seed=seed)
    val = MemoryLoader(tokens, seq_len=16, batch_size=4, vocab_size=64, seed=seed + 99)
    return train, (lambda: [val._batch(i) for i in range(2)])
