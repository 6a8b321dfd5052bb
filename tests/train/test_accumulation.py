"""Gradient accumulation: k micro-batches give the gradient of one batch k times larger, masked targets
included (the loss is normalised by the target count over the whole accumulated batch)."""

import torch
from memory_loader import Batch

from lmforge.config import ModelConfig
from lmforge.distributed.parallelize import World
from lmforge.model.transformer import build_model
from lmforge.train.loop import IGNORE_INDEX, forward_backward

CPU = torch.device("cpu")
WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)


def grads_for(batches: list[Batch]) -> dict[str, torch.Tensor]:
    model = build_model(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=16), seed=3)
    loss = forward_backward(model, batches, device=CPU, precision="fp32", scaler=None, world=WORLD)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss, grads


def make_batch(mask_counts: list[int]) -> Batch:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 64, (8, 12), generator=gen)  # (B, T)
    targets = torch.randint(0, 64, (8, 12), generator=gen)
    for row, count in enumerate(mask_counts):  # mask the first `count` targets of each row (as SFT prompts)
        targets[row, :count] = IGNORE_INDEX
    return Batch(inputs, targets)


def assert_same(one: Batch):
    micro = [Batch(one.inputs[i : i + 2], one.targets[i : i + 2]) for i in range(0, 8, 2)]
    loss_big, grads_big = grads_for([one])
    loss_acc, grads_acc = grads_for(micro)
    assert torch.allclose(loss_big, loss_acc, rtol=1e-6, atol=0)
    for name, g in grads_big.items():
        rel = (grads_acc[name] - g).norm() / g.norm()
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
    assert_same(make_batch([0] * 8))


def test_unequal_masked_targets_per_micro_batch():
    # micro-batches hold 24-0, 24-17, 24-3, 24-20 target tokens: a per-micro-batch mean would weight them wrong
    batch = make_batch([0, 0, 11, 6, 3, 0, 12, 8])
    assert_same(batch)
    # and the loss is the plain mean over the 24*4 - 40 = 56 target tokens of the whole batch
    model = build_model(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=16), seed=3)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            model(batch.inputs).reshape(-1, 64), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
    loss, _ = grads_for([Batch(batch.inputs[i : i + 2], batch.targets[i : i + 2]) for i in range(0, 8, 2)])
    assert torch.allclose(loss, expected, rtol=1e-6)
