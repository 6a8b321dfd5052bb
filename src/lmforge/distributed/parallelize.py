"""Apply parallelism to the model from outside: activation checkpointing, then compile, then data parallelism.

The model knows nothing of this file. ``init_world`` reads the launcher's environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK) and joins the process group; ``parallelize`` wraps the model in a fixed order:
activation checkpointing per block, ``torch.compile`` per block, then DDP, or FSDP2 (``fully_shard``) per
block and at the root.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ParallelConfig
from lmforge.errors import ConfigError

_GROUPS_STARTED = 0  # process groups this process has started (a fresh store key space for each)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``world_size`` processes and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(parallel: ParallelConfig, device: torch.device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a single process otherwise.
    On CUDA each process drives ``cuda:LOCAL_RANK``. Collectives time out after ``parallel.timeout_s``,
    so a lost peer ends the job with an error instead of a hang."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel.world_size is not None and parallel.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={parallel.world_size} but the launcher started WORLD_SIZE={world_size} "
            f"processes; launch {parallel.world_size} processes (nnodes x nproc-per-node) or set "
            f"parallel.world_size={world_size} (or null to accept any)"
        )
    if parallel.strategy == "single" and world_size > 1:
        raise ConfigError(
            f"parallel.strategy='single' but the launcher started WORLD_SIZE={world_size} processes; "
            "use parallel.strategy=auto, ddp or fsdp, or launch one process"
        )
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=parallel.timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # torchrun keeps one store across restarts: each attempt (and each group in one process) gets its
        # own key space, or the new processes would read the dead ones' addresses and wait for them.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        global _GROUPS_STARTED
        _GROUPS_STARTED += 1
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"lmforge/attempt_{attempt}/group_{_GROUPS_STARTED}", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def device_memory_bytes(device: torch.device, world: World) -> int:
    """Memory one process may use: the GPU's, or on the CPU the host's RAM shared by the local processes."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(world.world_size)))
    return psutil.virtual_memory().total // max(1, local_processes)


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's ``forward`` is replaced on the instance, so parameter names (and checkpoints) do not change.
    """
    for block in blocks:
        original = block.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = functools.update_wrapper(forward, original)


def apply_fsdp(model: nn.Module, world: World, *, precision: str, cpu_offload: bool) -> None:
    """FSDP2 per Transformer block, then at the root (embeddings, final norm, head). In bf16 the parameters
    are gathered and computed in bf16 while gradients are reduced in fp32; the sharded master weights and
    the optimizer state stay fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("dp",))
    mp_policy = MixedPrecisionPolicy()
    if precision == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not average: see parallelize
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def sum_gradients(process_group, bucket):  # returns a Future of the reduced bucket
    """DDP communication hook: all-reduce a gradient bucket as a sum (DDP's default averages)."""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def parallelize(
    model: nn.Module,
    parallel: ParallelConfig,
    world: World,
    *,
    precision: str = "fp32",
    activation_checkpointing: bool = False,
    compile: bool = False,
    strategy: str | None = None,
) -> nn.Module:
    """Activation checkpointing, then ``torch.compile`` per block, then data parallelism (DDP or FSDP2),
    in that order. ``strategy`` is the resolved one (``lmforge train`` asks the planner,
    ``plan.planner.plan_training``, for ``parallel.strategy: auto``); by default ``parallel.strategy``, with
    ``auto`` meaning DDP on several processes. Returns the module to train: the same object for a
    single process and for FSDP (whose parameters become sharded DTensors), a DDP wrapper for DDP.

    Gradients are SUMMED over processes, not averaged: each rank backpropagates its share of the global
    loss (its summed token losses divided by the token count over all ranks), which stays exact when ranks
    hold different numbers of unmasked targets."""
    if activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    if compile:
        for block in model.layers:
            block.compile()
    if strategy is None:
        strategy = "ddp" if parallel.strategy == "auto" else parallel.strategy
    if parallel.tp > 1:
        raise ConfigError(
            f"parallel.tp={parallel.tp}: tensor parallelism is not implemented yet; use parallel.tp=1 with "
            "parallel.strategy=fsdp to spread a large model over the processes"
        )
    if parallel.cpu_offload and world.device.type == "cpu":
        raise ConfigError(
            "parallel.cpu_offload=true moves FSDP shards from a GPU to host memory; on the CPU they are "
            "there already: set parallel.cpu_offload=false"
        )
    if strategy == "single" or not world.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device] if world.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        wrapped.register_comm_hook(None, sum_gradients)
        return wrapped
    if strategy == "fsdp":
        apply_fsdp(model, world, precision=precision, cpu_offload=parallel.cpu_offload)
        return model
    raise ConfigError(f"parallel.strategy={strategy!r} must be one of 'auto', 'single', 'ddp', 'fsdp'")


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 and single-process models are returned as they are)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether the parameters are FSDP shards: then only a forward on every rank at once (``model(x)``) can
    run, and single-rank inference paths (sampling, ``hidden_states``) must wait for a consolidated copy."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
