"""A small, explicit training step shared by the multi-process worker and the single-process reference.

The batch of step ``s`` is a pure function of ``s`` (the global batch), and each rank trains on its own
contiguous slice of it, so a run on N processes sees exactly the data of the single-process run.
Shape legend: B global batch, b = B / world_size, T sequence length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.distributed.parallelize import World
from lmforge.model.transformer import build_model

MODEL = ModelConfig(vocab_size=97, max_seq_len=16, n_layers=2, d_model=32, n_heads=4, ffn_hidden=64)
GLOBAL_BATCH = 8
SEQ_LEN = 16
STEPS = 20
SAVE_AT = 10


def make_model():
    return build_model(MODEL, device="cpu", seed=0)


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + step)
    starts = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, 1), generator=generator)  # (B, 1)
    tokens = (starts + 3 * torch.arange(SEQ_LEN + 1)) % MODEL.vocab_size  # (B, T+1): a learnable rule
    return tokens[:, :-1], tokens[:, 1:]  # (B, T), (B, T)


def train_steps(model, optimizer, world: World, start: int, stop: int) -> list[float]:
    """Steps ``start..stop-1``; returns the global mean loss of each (all-reduced over ranks)."""
    losses = []
    for step in range(start, stop):
        inputs, targets = global_batch(step)
        inputs = inputs.chunk(world.world_size)[world.rank]  # (b, T)
        targets = targets.chunk(world.world_size)[world.rank]  # (b, T)
        logits = model(inputs)  # (b, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # the mean over this rank's slice
        (loss / world.world_size).backward()  # this rank's share of the global mean; ranks' gradients add up
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world.distributed:
            dist.all_reduce(value)
            value /= world.world_size
        losses.append(value.item())
    return losses


def single_world() -> World:
    return World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
