"""Expert parallelism (``parallel.ep``): the routed experts of every MoE layer spread over ``ep`` ranks, the
tokens sent to them and their results brought back with all-to-all.

Layout. ``ep`` consecutive ranks form an expert-parallel group (ranks 0..ep-1, ep..2ep-1, ...): a 2-D
``DeviceMesh`` ("edp", "ep") of shape (world / ep, ep). Every rank stays a data-parallel rank (it reads its
own slice of the batch, exactly as without EP); only the routed experts are split. Rank p of a group holds
experts p * E/ep .. (p+1) * E/ep - 1 of every MoE layer: ``gate_up_proj`` and ``down_proj`` become DTensors
sharded on their expert dimension over "ep", so checkpoints know each shard's global shape and offset and
DCP reshards them between EP sizes. The dense weights (attention, norms, routers, shared experts,
embeddings) are replicated by DDP or sharded by FSDP over all ranks, as without EP. The experts' gradients
are summed over "edp", the ranks that hold the same experts (one rank per group when world = ep, so nothing
to sum): FSDP shards the experts over "edp" (2-D, like FSDP x TP), DDP leaves them out of its buckets and an
all-reduce over "edp" follows each expert gradient.

In the forward pass each MoE layer sorts its (token, expert) assignments by expert, as in one process; the
``AllToAllDispatcher`` exchanges the per-expert counts (``all_to_all_single``), then the tokens (PyTorch's
differentiable functional ``all_to_all_single``, whose backward is the reverse exchange),
regroups the arrivals by local expert for ``swiglu_experts`` and reverses all of it in ``combine``.

Shape legend: A assignments this rank sends, R assignments it receives, C d_model, E experts,
L = E / ep local experts, P = ep ranks of the group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.moe import MoEFeedForward, moe_layers, swiglu_experts


def all_to_all_single(
    tokens: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], group
) -> torch.Tensor:
    """PyTorch's differentiable all-to-all (its backward is the reverse all-to-all), waited for."""
    from torch.distributed._functional_collectives import all_to_all_single as exchange
    from torch.distributed._functional_collectives import wait_tensor

    return wait_tensor(exchange(tokens, output_split_sizes, input_split_sizes, group))


class AllToAllDispatcher:
    """Sends each expert's tokens to the rank holding it and brings the results back (the MoE layer's
    ``dispatcher``). ``group``: the expert-parallel process group; ``n_experts``: E of the layer."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.local_experts = n_experts // self.ranks

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        P, L = self.ranks, self.local_experts
        received = torch.empty_like(counts)  # (E,) = (P, L): row q counts what rank q sends each local expert
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        received = received.view(P, L)
        send_splits = counts.view(P, L).sum(1).tolist()  # tokens for each rank (sorted by expert: contiguous)
        recv_splits = received.sum(1).tolist()
        arrived = all_to_all_single(tokens.contiguous(), recv_splits, send_splits, self.group)  # (R, C)
        # ... in blocks (source rank, local expert)
        block_expert = torch.arange(L, device=counts.device).repeat(P)  # (P*L,) the expert of each block
        order = torch.argsort(block_expert.repeat_interleave(received.flatten()), stable=True)  # (R,)
        return arrived[order], received.sum(0), (order, send_splits, recv_splits)

    def combine(self, outputs: torch.Tensor, handle: Any) -> torch.Tensor:
        order, send_splits, recv_splits = handle
        by_source = outputs[torch.argsort(order)]  # (R, C) back in blocks (source rank, local expert)
        return all_to_all_single(by_source.contiguous(), send_splits, recv_splits, self.group)  # (A, C)


class SumOverGroup:
    """``MoEFeedForward.sum_over_batch`` under data parallelism: an all-reduce (sum) of detached statistics
    over the processes that share the batch. A deep copy keeps the same group."""

    def __init__(self, group):
        self.group = group

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        total = local.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total

    def __deepcopy__(self, memo) -> SumOverGroup:
        return self


def share_router_statistics(model: nn.Module, group) -> None:
    """Make every MoE layer's balancing losses those of the whole data-parallel batch (``group``: the
    data-parallel process group, None for all ranks), so they do not depend on how many processes share it."""
    for layer in moe_layers(model):
        layer.sum_over_batch = SumOverGroup(group)


def check_expert_parallel(model: nn.Module, ep: int, world_size: int) -> None:
    """ConfigError, naming every problem, unless ``ep`` ranks can share the experts of ``model``'s MoE layers
    on ``world_size`` processes."""
    layers = moe_layers(model)
    problems = []
    if world_size % ep:
        problems.append(f"parallel.ep={ep} must divide the number of processes, WORLD_SIZE={world_size}")
    if not layers:
        problems.append(f"parallel.ep={ep} needs a Mixture-of-Experts model (model.moe.n_experts > 0)")
    uneven = sorted({layer.moe.n_experts for layer in layers if layer.moe.n_experts % ep})
    if uneven:
        problems.append(
            f"parallel.ep={ep} must divide model.moe.n_experts={uneven[0]} (whole experts per rank)"
        )
    if problems:
        raise ConfigError("expert parallelism: " + "; ".join(problems))


def apply_expert_parallel(model: nn.Module, mesh) -> None:
    """Split every MoE layer's routed experts over ``mesh["ep"]`` (a 2-D ("edp", "ep") DeviceMesh): the
    stacked expert weights become DTensors sharded on the expert dimension, each rank keeping its E/ep
    experts (taken from its own full, identically initialised copy), and the layer's dispatcher sends
    tokens to them with all-to-all. The weights must be materialised (not on ``meta``)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_mesh = mesh["ep"]
    for layer in moe_layers(model):
        experts = layer.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            sharded = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=full.requires_grad))
        experts.forward = _local_experts_forward(experts)
        layer.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), layer.moe.n_experts)


def _local_experts_forward(experts: nn.Module):
    """``GroupedExperts.forward`` on this rank's shard of the expert weights (gradients flow back to the
    DTensor parameters through ``to_local``)."""

    def forward(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(x, experts.gate_up_proj.to_local(), experts.down_proj.to_local(), counts)

    return forward


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routed experts' parameters by name (those expert parallelism shards)."""
    return {
        f"{name}.experts.{p_name}": p
        for name, module in model.named_modules()
        if isinstance(module, MoEFeedForward)
        for p_name, p in module.experts.named_parameters()
    }


def sum_expert_gradients(parameters: list[nn.Parameter], group, ddp: nn.Module) -> None:
    """Under DDP, which leaves the expert weights out: sum each expert gradient over ``group`` (the ranks
    holding the same experts) once it is accumulated, in the backward passes where ``ddp`` (the wrapper)
    synchronises its own gradients (not inside its ``no_sync``)."""

    def hook(param: nn.Parameter) -> None:
        if ddp.require_backward_grad_sync:
            grad = param.grad
            dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)

    for param in parameters:
        param.register_post_accumulate_grad_hook(hook)
