"""Apply parallelism and speed-ups to the model from outside, in a fixed order.

The model knows nothing of this file. ``init_world`` reads the launcher's environment (torchrun's RANK,
WORLD_SIZE, LOCAL_RANK) and joins the process group; ``parallelize`` changes the model in a fixed order:
tensor or expert parallelism (``distributed/experts.py``), the fused block (fp32 on the CPU), activation
checkpointing per block, ``torch.compile`` per block, then DDP, or FSDP2 (``fully_shard``) per block and
at the root.
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
from lmforge.distributed.experts import (
    apply_expert_parallel,
    check_expert_parallel,
    expert_parameters,
    share_router_statistics,
    sum_expert_gradients,
)
from lmforge.errors import ConfigError
from lmforge.model.fused import apply_fused_blocks
from lmforge.model.moe import moe_layers

_GROUPS_STARTED = 0  # process groups this process has started (a fresh store key space for each)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``world_size`` processes and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int = 1  # tensor-parallel degree: consecutive ranks form one tensor-parallel group
    mesh: object = None  # the ("dp", "tp") DeviceMesh when tp > 1
    ep: int = 1  # expert-parallel degree: consecutive ranks share the routed experts (distributed/experts.py)
    expert_mesh: object = None  # the ("edp", "ep") DeviceMesh when ep > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the ranks that see different batches."""
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_group(self):
        """The process group over which batches differ (losses and token counts are summed over it);
        None (the default group) without tensor parallelism."""
        return self.mesh["dp"].get_group() if self.mesh is not None else None


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
    if world_size % parallel.tp:
        raise ConfigError(
            f"parallel.tp={parallel.tp} must divide the number of processes, WORLD_SIZE={world_size}; "
            f"launch a multiple of {parallel.tp} processes or lower parallel.tp"
        )
    if world_size % parallel.ep:
        raise ConfigError(
            f"parallel.ep={parallel.ep} must divide the number of processes, WORLD_SIZE={world_size}; "
            f"launch a multiple of {parallel.ep} processes or lower parallel.ep"
        )
    if parallel.ep > 1 and parallel.tp > 1:
        raise ConfigError(
            f"parallel.ep={parallel.ep} with parallel.tp={parallel.tp} is not supported: choose one of them"
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
    from torch.distributed.device_mesh import init_device_mesh

    mesh = expert_mesh = None
    if parallel.tp > 1:
        mesh = init_device_mesh(
            device.type, (world_size // parallel.tp, parallel.tp), mesh_dim_names=("dp", "tp")
        )
    if parallel.ep > 1:  # every rank reads its own data; ep consecutive ranks share the experts
        expert_mesh = init_device_mesh(
            device.type, (world_size // parallel.ep, parallel.ep), mesh_dim_names=("edp", "ep")
        )
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp=parallel.tp,
        mesh=mesh,
        ep=parallel.ep,
        expert_mesh=expert_mesh,
    )


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

    if world.mesh is not None:
        mesh = world.mesh["dp"]  # 2-D: shard over the data-parallel dimension, tensor parallelism inside
    else:
        mesh = init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("dp",))
    mp_policy = MixedPrecisionPolicy()
    if precision == "bf16":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Pinned host memory needs an accelerator; on the CPU (gloo) the policy still runs, with plain memory.
    offload = CPUOffloadPolicy(pin_memory=world.device.type != "cpu") if cpu_offload else OffloadPolicy()
    if world.ep > 1:  # the experts (sharded over "ep") are sharded again over "edp", as 2-D FSDP x TP
        for layer in moe_layers(model):
            fully_shard(
                layer.experts, mesh=world.expert_mesh["edp"], mp_policy=mp_policy, offload_policy=offload
            )
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not average: see parallelize
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Megatron-style tensor parallelism over ``mesh`` (the ``tp`` dimension), with
    ``torch.distributed.tensor.parallel``: in every block q/k/v and the feed-forward's gate/up projections
    are split by output columns (whole heads, hidden channels) and o_proj/down_proj by input rows, so the
    forward needs one all-reduce after attention and one after the feed-forward. An untied output head is
    split by vocabulary and its logits gathered; embeddings and norms stay replicated. The attention modules
    are told how many heads they hold locally; the model's code is unchanged."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg, tp = model.cfg, mesh.size()
    sizes = {
        "model.n_heads": cfg.n_heads,
        "model.n_kv_heads": cfg.kv_heads,
        "model.ffn_hidden": cfg.hidden_dim,
    }
    if not cfg.tie_embeddings:
        sizes["model.vocab_size"] = cfg.vocab_size
    uneven = [f"{key}={value}" for key, value in sizes.items() if value % tp]
    if uneven:
        raise ConfigError(
            f"parallel.tp={tp} must divide {', '.join(uneven)}: each rank holds whole heads and an equal "
            "share of the feed-forward; choose a tp degree that divides them"
        )
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    if cfg.ffn == "swiglu":
        plan["mlp.gate_proj"] = ColwiseParallel()
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.self_attn.n_heads //= tp
        block.self_attn.n_kv_heads //= tp
    if not cfg.tie_embeddings:
        parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})


def clip_grad_norm_(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm), also when gradients mix plain tensors and DTensors on
    different meshes (tensor parallelism: replicated norms beside sharded weights; with FSDP, 1-D and 2-D
    meshes). Returns the total norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    if len(groups) <= 1:
        return nn.utils.clip_grad_norm_(parameters, max_norm)
    squares = []
    for grads in groups.values():
        norm = nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # a sharded gradient's norm is partial on each rank: sum it
        squares.append(norm.float().square())
    total = torch.stack(squares).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grads in groups.values():
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], coef)
    return total


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
    fused_blocks: bool = True,
) -> nn.Module:
    """Tensor or expert parallelism, the fused block, activation checkpointing, ``torch.compile`` per block,
    then data parallelism (DDP or FSDP2), in that order. Under data parallelism the MoE layers' balancing
    losses are taken over the whole batch (``distributed.experts.share_router_statistics``). The fused
    block (``model/fused.py``, off with ``fused_blocks=False``) replaces the qualifying blocks' training math for fp32 on the CPU without compile
    or tensor parallelism; it goes before activation checkpointing, which wraps the block's forward as it is.
    ``strategy`` is the resolved one (``train.run.strategy_of``: the planner's choice for
    ``parallel.strategy: auto``); by default ``parallel.strategy``, where ``auto`` is only accepted for one
    process. Returns the module to train: the same object for a single process and for FSDP (whose
    parameters become sharded DTensors), a DDP wrapper for DDP.

    Gradients are SUMMED over processes, not averaged: each rank backpropagates its share of the global
    loss (its summed token losses divided by the token count over all ranks), which stays exact when ranks
    hold different numbers of unmasked targets."""
    strategy = strategy or parallel.strategy
    if world.tp > 1:
        if strategy == "ddp" and parallel.strategy == "ddp":
            raise ConfigError(
                f"parallel.tp={world.tp} combines with FSDP over the data-parallel dimension, not DDP: "
                "set parallel.strategy=fsdp (or auto)"
            )
        apply_tensor_parallel(model, world.mesh["tp"])
        strategy = "fsdp" if world.dp_size > 1 else "single"
    if parallel.ep > 1:
        check_expert_parallel(model, parallel.ep, world.world_size)
        apply_expert_parallel(model, world.expert_mesh)
    if world.distributed:
        share_router_statistics(model, world.dp_group)  # balancing losses over the whole batch
    if strategy == "auto":
        if world.distributed:
            raise ConfigError(
                "parallel.strategy=auto reached parallelize unresolved on several processes: pass the "
                "planner's choice (train.run.strategy_of)"
            )
        strategy = "single"
    if fused_blocks and precision == "fp32" and world.device.type == "cpu" and not compile and world.tp == 1:
        apply_fused_blocks(model)
    if activation_checkpointing:
        apply_activation_checkpointing(model.layers)
    if compile:
        for block in model.layers:
            block.compile()
    if strategy == "single" or not world.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device] if world.device.type == "cuda" else None
        experts = expert_parameters(model) if world.ep > 1 else {}
        if experts:  # sharded over "ep": summed over "edp" by their own hook, not by DDP
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(experts))
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        wrapped.register_comm_hook(None, sum_gradients)
        if experts and world.expert_mesh["edp"].size() > 1:
            sum_expert_gradients(list(experts.values()), world.expert_mesh["edp"].get_group(), wrapped)
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
