"""``parallel.strategy: auto`` on a GPU: refine the planner's micro-batch by trial on the real device.

The planner (``plan.planner.plan_training``) predicts from its memory model; the allocator, kernels and
fragmentation decide for real, so on CUDA the loop tries steps at growing micro-batches, recovering from
out-of-memory errors (``plan.microbatch.find_max_micro_batch``), and keeps the largest that fits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from lmforge.config import Config
from lmforge.plan.microbatch import find_max_micro_batch
from lmforge.plan.planner import exact_split
from lmforge.plan.training import Plan


def search_micro_batch(
    model: torch.nn.Module,
    *,
    seq_len: int,
    vocab_size: int,
    precision: str,
    start: int,
    limit: int,
) -> int:
    """The largest micro-batch in [1, limit] whose forward and backward fit on the model's device, by trial.

    Each trial runs one step on random tokens with the training precision while buffers the size of the
    AdamW moments are held (the optimizer does not exist yet), then drops its gradients; the weights are not
    changed and the random number generators are restored. Run it on the unwrapped model of one process (no collectives, so one rank running out of
    memory cannot leave the others waiting).
    """
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def try_step(micro_batch: int) -> None:
        moments = [torch.empty_like(p) for p in trainable for _ in range(2)]  # noqa: F841 - held on purpose
        try:
            tokens = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), device=device)  # (B, T+1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(tokens[:, :-1])  # (B, T, V)
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
                )
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            model.zero_grad(set_to_none=True)

    was_training = model.training
    model.train()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # the trials leave the run's random streams untouched
            return find_max_micro_batch(try_step, start, limit)
    finally:
        model.train(was_training)


def refine_plan_by_trial(model: torch.nn.Module, cfg: Config, plan: Plan, world) -> Plan:
    """The plan with the largest micro-batch that trains on this device (all ranks agree on the smallest).

    The search runs up to the sequences each rank processes per step, so it may also grow the planner's
    micro-batch; the micro-batch stays a divisor of them, so the tokens per step do not change."""
    per_rank = plan.micro_batch * plan.grad_accum
    found = search_micro_batch(
        model,
        seq_len=cfg.train.seq_len,
        vocab_size=cfg.model.vocab_size,
        precision=cfg.train.precision,
        start=plan.micro_batch,
        limit=per_rank,
    )
    if world.distributed:
        agreed = torch.tensor([found], device=world.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        found = int(agreed.item())
    micro_batch, grad_accum = exact_split(per_rank, found)
    if (micro_batch, grad_accum) == (plan.micro_batch, plan.grad_accum):
        return plan
    return dataclasses.replace(
        plan,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        reason=f"by trial on this device: micro-batch {found} fits, the planner predicted {plan.micro_batch}",
    )
