"""The plan ``lmforge train`` follows with ``parallel.strategy: auto``: the planner's model (``planner.py``)
applied to the one device kind and process count a run has, and the config that results."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from lmforge.config import Config
from lmforge.errors import ConfigError
from lmforge.plan.hardware import GIB, KNOWN_HARDWARE, Hardware, cpu_hardware
from lmforge.plan.memory import Layout
from lmforge.plan.planner import (
    Cluster,
    exact_split,
    largest_micro_batch,
    predicted_memory,
    step_timing,
)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What the training loop applies: the layout, the batch split, and what the planner expects of it."""

    strategy: Literal["single", "ddp", "fsdp"]
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    cpu_offload: bool
    precision: Literal["fp32", "bf16", "fp16"]
    world_size: int = 1
    seq_len: int = 0
    ep: int = 1  # expert-parallel degree (``parallel.ep``; 1 for a dense model)
    predicted_peak_bytes: int
    predicted_step_seconds: float
    predicted_utilisation: float = 1.0  # busy fraction of the step: the power draw an energy estimate uses
    reason: str = ""

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len * self.world_size

    def describe(self) -> str:
        switches = [f"AC={'on' if self.activation_checkpointing else 'off'}"]
        if self.ep > 1:
            switches.append(f"EP={self.ep}")
        if self.cpu_offload:
            switches.append("CPU offload")
        return (
            f"{self.strategy} x {self.world_size}, micro-batch {self.micro_batch} x {self.grad_accum} "
            f"accumulation ({self.tokens_per_step:,} tokens/step), {self.precision}, {', '.join(switches)}; "
            f"predicted peak {self.predicted_peak_bytes / GIB:.2f} GiB, "
            f"step {self.predicted_step_seconds:.3g} s" + (f" ({self.reason})" if self.reason else "")
        )


def _training_hardware(device_kind: str, device_memory_bytes: int | None) -> Hardware:
    if device_kind == "cuda":
        hw = KNOWN_HARDWARE["H100-80GB"]  # speed figures only matter for the prediction shown in logs
        if device_memory_bytes is not None:
            hw = dataclasses.replace(hw, name="cuda", memory_gib=device_memory_bytes / GIB)
        return hw
    return cpu_hardware(1, device_memory_bytes if device_memory_bytes is not None else 2**60)


def expert_parallel_problems(cfg: Config, world_size: int) -> list[str]:
    """What is wrong with ``parallel.ep`` for this model and process count (empty when it is usable)."""
    ep, moe = cfg.parallel.ep, cfg.model.moe
    if ep == 1:
        return []
    problems = []
    if not moe.enabled:
        problems.append(f"parallel.ep={ep} needs a Mixture-of-Experts model (model.moe.n_experts is 0)")
    elif moe.n_experts % ep:
        valid = [e for e in range(1, moe.n_experts + 1) if moe.n_experts % e == 0 and world_size % e == 0]
        problems.append(
            f"parallel.ep={ep} must divide model.moe.n_experts={moe.n_experts} (each rank holds "
            f"n_experts / ep experts); valid with {world_size} processes: {', '.join(map(str, valid))}"
        )
    if (world_size // cfg.parallel.tp) % ep:
        problems.append(
            f"parallel.ep={ep} must divide the data-parallel processes ({world_size} processes / "
            f"parallel.tp={cfg.parallel.tp})"
        )
    return problems


def plan_training(
    cfg: Config,
    *,
    device_kind: str,
    world_size: int,
    device_memory_bytes: int | None,
    hardware: Hardware | None = None,
) -> Plan:
    """The layout ``lmforge train`` uses with ``parallel.strategy: auto`` (or checks an explicit one).

    The strategy is ``single`` for one process; otherwise DDP when the replicated training state and a
    micro-batch fit one device, else FSDP (then with CPU offload if nothing else fits). The micro-batch is
    at most ``train.micro_batch``; when it must shrink, gradient accumulation grows so that the tokens per
    step stay those the config asks for. Activation checkpointing is kept if configured and switched on
    when the layout does not fit without it. ``device_memory_bytes=None`` means no memory limit. The
    expert-parallel degree is ``parallel.ep`` as configured (checked here); ``lmforge plan`` compares degrees.
    (Long by choice: one pass over the candidate layouts, in the order of preference it documents.)
    """
    problems = expert_parallel_problems(cfg, world_size)
    if problems:
        raise ConfigError("invalid parallel layout:\n  " + "\n  ".join(problems))
    hw = hardware or _training_hardware(device_kind, device_memory_bytes)
    if device_memory_bytes is not None:
        hw = dataclasses.replace(hw, memory_gib=device_memory_bytes / GIB)
    capacity = float(device_memory_bytes) if device_memory_bytes is not None else math.inf
    train, parallel = cfg.train, cfg.parallel
    seq = train.seq_len
    if train.global_batch_tokens:
        per_rank = max(1, math.ceil(train.global_batch_tokens / (seq * world_size)))
    else:
        per_rank = train.micro_batch
    limit = min(train.micro_batch, per_rank)
    if parallel.strategy != "auto":
        strategies = [parallel.strategy]
    else:
        strategies = ["single"] if world_size == 1 else ["ddp", "fsdp"]
    options = []
    for strategy in strategies:
        offloads = [True] if parallel.cpu_offload else [False] + ([True] if strategy == "fsdp" else [])
        checkpointing = [True] if train.activation_checkpointing else [False, True]
        options += [(strategy, ac, off) for off in offloads for ac in checkpointing]
    cluster = Cluster(hardware=hw, gpus=world_size, gpus_per_node=max(1, world_size))
    leanest = None
    for strategy, ac, offload in options:
        layout = Layout(
            strategy=strategy,
            world_size=world_size,
            ep=parallel.ep,
            seq_len=seq,
            precision=train.precision,
            activation_checkpointing=ac,
            cpu_offload=offload,
            device_kind=device_kind if device_kind in ("cuda", "cpu") else "cpu",
            grad_accum=max(1, math.ceil(per_rank / limit)),
        )
        micro_limit = largest_micro_batch(cfg.model, layout, hw, limit, capacity)
        if micro_limit == 0:
            memory = predicted_memory(cfg.model, dataclasses.replace(layout, micro_batch=1), hw)
            if leanest is None or memory.total < leanest[1].total:
                leanest = (f"{strategy}{' + AC' if ac else ''}{' + offload' if offload else ''}", memory)
            continue
        micro_batch, grad_accum = exact_split(per_rank, micro_limit)
        layout = dataclasses.replace(layout, micro_batch=micro_batch, grad_accum=grad_accum)
        memory = predicted_memory(cfg.model, layout, hw)
        timing = step_timing(cfg.model, layout, cluster)
        reason = "as configured" if parallel.strategy != "auto" else "fits"
        if micro_batch < train.micro_batch and per_rank >= train.micro_batch:
            reason = f"train.micro_batch={train.micro_batch} does not fit"
        return Plan(
            strategy=strategy,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            activation_checkpointing=ac,
            cpu_offload=offload,
            precision=train.precision,
            world_size=world_size,
            seq_len=seq,
            ep=parallel.ep,
            predicted_peak_bytes=memory.total,
            predicted_step_seconds=timing.step_s,
            predicted_utilisation=timing.utilisation,
            reason=reason,
        )
    name, memory = leanest
    over = memory.total - capacity
    raise ConfigError(
        f"the model does not fit: {name} at micro-batch 1 and train.seq_len={seq} needs "
        f"{memory.total / GIB:.2f} GiB per device, the device has {capacity / GIB:.2f} GiB "
        f"(over by {over / GIB:.2f} GiB); use more devices, parallel.strategy=fsdp with "
        f"parallel.cpu_offload, "
        f"or a shorter train.seq_len"
    )


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """``cfg`` as the plan trains it: its micro-batch, accumulation (through ``train.global_batch_tokens``),
    activation checkpointing and CPU offload. The tokens per step stay those of ``cfg``."""
    train = dataclasses.replace(
        cfg.train,
        micro_batch=plan.micro_batch,
        global_batch_tokens=plan.tokens_per_step if plan.grad_accum > 1 else cfg.train.global_batch_tokens,
        activation_checkpointing=plan.activation_checkpointing,
    )
    parallel = dataclasses.replace(cfg.parallel, cpu_offload=plan.cpu_offload)
    return dataclasses.replace(cfg, train=train, parallel=parallel)
