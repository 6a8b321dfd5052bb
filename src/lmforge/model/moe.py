"""The Mixture-of-Experts feed-forward: a switch of the one Transformer (``model.moe.n_experts > 0``).

A block whose index is at least ``model.moe.first_dense_layers`` replaces its dense ``FeedForward`` by a
``MoEFeedForward``, which runs in four steps:

1. **route**: a linear router (``gate``, C -> E, no bias) scores each token; ``route`` picks its top-k
   experts and their weights, by Mixtral's rule (softmax over the top-k logits) or Qwen/DeepSeek's (the top-k
   of the softmax over all experts, renormalised when ``norm_topk_prob``). A per-expert ``expert_bias``
   (DeepSeek-V3's auxiliary-loss-free balancing) is added to the scores for the choice only, never to the
   weights;
2. **permute**: the (token, expert) assignments are sorted by expert, so each expert's tokens are one
   contiguous slice; with ``capacity_factor`` each expert keeps at most ceil(cf * N * K / E) of them in
   training (a token's first choice before anyone's second) and the rest are dropped and counted; evaluation
   and generation stay dropless, so they match the exported model;
3. **dispatch, expert compute, combine**: ``dispatcher.dispatch`` hands the grouped tokens and per-expert
   counts to wherever the experts live and ``combine`` brings the results back in the same order. The
   default ``LocalDispatcher`` does nothing; expert parallelism swaps in an all-to-all dispatcher from
   ``distributed/`` and shards ``experts`` to its local experts, without this file knowing. ``GroupedExperts``
   (``swiglu_experts``) computes any number of experts over tokens already grouped, one grouped matmul per
   projection;
4. **unpermute**: each result is scaled by its routing weight and added back to its token.

Shared experts (every token passes through them, Qwen2-MoE and DeepSeek) add a dense SwiGLU, optionally
scaled by a sigmoid gate (Qwen2-MoE). A training-mode forward with gradients leaves its ``RouterStats``
(the load-balancing and z-losses, tokens per expert, dropped assignments) in ``last_stats``; ``train/`` adds
``router_loss`` to the objective's loss, sums the load per step (``train/experts.py``) and calls
``update_expert_bias`` after each optimizer step. The losses are those of the whole batch: under data
parallelism ``sum_over_batch`` (swapped in from ``distributed/``) adds the statistics of every process before
they are formed.

Parameter names follow Hugging Face transformers 5 (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``
(E, 2F, C), ``mlp.experts.down_proj`` (E, C, F), ``mlp.shared_expert.*``, ``mlp.shared_expert_gate.weight``).

Shape legend: B batch, T length, N = B*T tokens, C d_model, E experts (E_local: those held here), K top_k,
A (token, expert) assignments kept (N*K when dropless), F expert hidden size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


@dataclass
class RouterStats:
    """What one MoE layer's last training forward measured. ``loss`` keeps its graph (training adds it);
    the rest are detached."""

    loss: torch.Tensor  # aux_loss_coef * aux_loss + z_loss_coef * z_loss, the term training adds
    aux_loss: torch.Tensor  # Switch/Mixtral load balance E * sum_i f_i P_i (K when balanced)
    z_loss: torch.Tensor  # mean over tokens of logsumexp(router logits)^2
    tokens_per_expert: torch.Tensor  # (E,) assignments routed to each expert, before any capacity cut
    dropped: torch.Tensor  # () assignments dropped by the capacity limit


def route(
    logits: torch.Tensor, *, top_k: int, router: str, norm_topk_prob: bool, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (N, K) in fp32 and expert ids (N, K) from router ``logits`` (N, E).

    "topk_softmax" (Mixtral): softmax over the K chosen logits. "softmax_topk" (Qwen-MoE, DeepSeek): the
    softmax over all E experts at the K chosen, renormalised to sum 1 when ``norm_topk_prob``. ``bias`` (E,)
    is added to the probabilities for the choice only."""
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    choice = probs if bias is None else probs + bias
    experts = torch.topk(choice, top_k, dim=-1).indices  # (N, K)
    weights = probs.gather(-1, experts)  # (N, K)
    if router == "topk_softmax" or norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes (M, C) x (G, C, F) here: rows of 16-byte multiples, and fp32 or
    bf16 on the CPU (bf16 only under ``torch.compile``), bf16 on a CUDA device of compute capability 9.0+."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # its shape function takes bf16 only
        return False
    if any(n * x.element_size() % 16 for n in (x.shape[-1], *weight.shape[-2:])):  # rows 16-byte aligned
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x`` (M, C) holds ``counts[g]`` consecutive rows for group g; row block g times ``weight[g]`` (C, F)
    gives (M, F). One grouped kernel where supported, else a loop over the groups' contiguous slices."""
    if grouped_mm_supported(x, weight):
        offsets = torch.cumsum(counts, dim=0).to(torch.int32)  # (G,) end row of each group
        return torch._grouped_mm(x, weight, offs=offsets)
    blocks = x.split(counts.tolist())  # unbind, not weight[g]: one gradient for the stack, not one per group
    return torch.cat(
        [block @ w for block, w in zip(blocks, weight.unbind(0))] + [x.new_zeros(0, weight.shape[-1])]
    )


def swiglu_experts(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """SwiGLU experts over grouped tokens: ``x`` (A, C) holds ``counts[g]`` consecutive rows for expert g,
    whose weights are ``gate_up[g]`` (2F, C) and ``down[g]`` (C, F) -> (A, C)."""
    if torch.is_autocast_enabled(x.device.type):  # as nn.Linear would, compute in the autocast dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    gate, up = grouped_mm(x, gate_up.transpose(1, 2), counts).chunk(2, dim=-1)  # (A, F) each
    return grouped_mm(F.silu(gate) * up, down.transpose(1, 2), counts)  # (A, C)


class GroupedExperts(nn.Module):
    """E_local SwiGLU experts as stacked weights: ``gate_up_proj`` (E_local, 2F, C) holds each expert's gate
    rows then its up rows, ``down_proj`` (E_local, C, F); both in ``nn.Linear``'s (out, in) order."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` (A, C) grouped by expert, ``counts`` (E_local,) rows per expert -> (A, C)."""
        return swiglu_experts(x, self.gate_up_proj, self.down_proj, counts)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float, generator: torch.Generator | None) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, std, generator=generator)
        nn.init.normal_(self.down_proj, 0.0, residual_std, generator=generator)


class Dispatcher(Protocol):
    """Moves grouped tokens to the experts and their results back (``MoEFeedForward.dispatcher``)."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``tokens`` (A, C) sorted by expert, ``counts`` (E,) per expert of all E -> the tokens of the
        local experts grouped by local expert, their counts (E_local,), and a handle for ``combine``."""
        ...

    def combine(self, outputs: torch.Tensor, handle: Any) -> torch.Tensor:
        """The local experts' outputs -> (A, C) in the order ``dispatch`` received the tokens."""
        ...


class LocalDispatcher:
    """Every expert lives on this device: the grouped tokens go to them as they are."""

    def dispatch(self, tokens: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return tokens, counts, None

    def combine(self, outputs: torch.Tensor, handle: Any) -> torch.Tensor:
        return outputs


def whole_batch_here(local: torch.Tensor) -> torch.Tensor:
    """``MoEFeedForward.sum_over_batch`` in one process: its statistics are the batch's."""
    return local


class MoEFeedForward(nn.Module):
    """The Mixture-of-Experts feed-forward of one block: route, permute, dispatch, experts, combine.

    ``shared_expert`` (a dense SwiGLU ``FeedForward`` the block builds, or None) runs on every token;
    ``layer`` is the block's index (for the logged load)."""

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None = None, layer: int = 0):
        super().__init__()
        moe = cfg.moe
        self.moe, self.layer = moe, layer
        self.gate = nn.Linear(cfg.d_model, moe.n_experts, bias=False)
        self.experts = GroupedExperts(moe.n_experts, cfg.d_model, moe.expert_hidden or cfg.hidden_dim)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            nn.Linear(cfg.d_model, 1, bias=False)
            if shared_expert is not None and moe.shared_expert_gate
            else None
        )
        # DeepSeek-V3 balancing: added to the scores for the top-k choice only; saved with the weights
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts))
        self.dispatcher: Dispatcher = LocalDispatcher()
        # adds per-process statistics over the processes sharing the batch (data parallelism swaps in an
        # all-reduce from distributed/); one process holds the whole batch
        self.sum_over_batch: Callable[[torch.Tensor], torch.Tensor] = whole_batch_here
        self.last_stats: RouterStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)  # (N, C)
        logits = self.gate(tokens)  # (N, E)
        bias = self.expert_bias if self.moe.bias_update_rate > 0 else None
        weights, experts = route(
            logits,
            top_k=self.moe.top_k,
            router=self.moe.router,
            norm_topk_prob=self.moe.norm_topk_prob,
            bias=bias,
        )  # (N, K) each
        out, tokens_per_expert, dropped = self.routed(tokens, weights, experts)  # (N, C)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)  # (N, C)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():  # not a no-grad pass (a frozen reference, a probe)
            self.last_stats = self.measure(logits, tokens_per_expert, dropped)
        return out.view(B, T, C)

    def routed(
        self, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed experts' weighted sum (N, C) for ``tokens`` (N, C), plus the assignments per expert
        (E,) and the number dropped by the capacity limit."""
        N, K = experts.shape
        n_experts = self.moe.n_experts
        flat_experts = experts.t().reshape(-1)  # (K*N,) slot-major: every first choice before any second
        tokens_per_expert = torch.bincount(flat_experts, minlength=n_experts)  # (E,)
        order = torch.argsort(flat_experts, stable=True)  # (K*N,) assignments grouped by expert
        counts = tokens_per_expert
        dropped = torch.zeros((), dtype=torch.long, device=tokens.device)
        if self.moe.capacity_factor is not None and self.training:  # evaluation and generation: dropless
            capacity = math.ceil(self.moe.capacity_factor * N * K / n_experts)
            starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
            rank = torch.arange(N * K, device=tokens.device) - starts[flat_experts[order]]  # (K*N,)
            keep = rank < capacity
            dropped = (~keep).sum()
            order, counts = order[keep], counts.clamp(max=capacity)  # (A,), (E,)
        token_index = order % N  # (A,) the token of each kept assignment
        grouped = tokens[token_index]  # (A, C)
        local, local_counts, handle = self.dispatcher.dispatch(grouped, counts)
        expert_out = self.dispatcher.combine(self.experts(local, local_counts), handle)  # (A, C)
        expert_out = expert_out * weights.t().reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
        # summed in the tokens' dtype (fp32 under autocast), as the top-k results of a token add up
        out = torch.zeros_like(tokens).index_add_(0, token_index, expert_out.to(tokens.dtype))  # (N, C)
        return out, tokens_per_expert, dropped

    def measure(
        self, logits: torch.Tensor, tokens_per_expert: torch.Tensor, dropped: torch.Tensor
    ) -> RouterStats:
        """The balancing losses of the whole batch (with their graph) and this forward's load (detached).

        ``sum_over_batch`` adds the load, the router probabilities and the token count over the processes
        that share the batch (nothing to add in one process), so ``aux_loss`` and ``z_loss`` are those of
        the whole batch, as one process holding it would compute them, and ``loss`` is this process's share
        of their weighted sum: the shares add up to it and each one's gradient reaches its own tokens."""
        logits = logits.float()  # (N, E)
        N, E = logits.shape
        prob_sum = torch.softmax(logits, dim=-1).sum(0)  # (E,) this process's part of N * P_i
        lse_sq_sum = torch.logsumexp(logits, dim=-1).pow(2).sum()  # ()
        local = torch.cat(
            [
                tokens_per_expert.to(logits.dtype),
                prob_sum.detach(),
                lse_sq_sum.detach()[None],
                logits.new_ones(1) * N,
            ]
        )  # (2E+2,)
        batch_tokens, batch_probs, batch_lse_sq, n = self.sum_over_batch(local).split([E, E, 1, 1])
        n = n.squeeze().clamp(min=1)
        fraction = batch_tokens / n  # (E,) f_i over the batch, summing to K
        aux_share = E * (fraction * prob_sum).sum() / n  # this process's part of E * sum_i f_i P_i
        z_share = lse_sq_sum / n  # its part of the mean over tokens of logsumexp^2
        return RouterStats(
            loss=self.moe.aux_loss_coef * aux_share + self.moe.z_loss_coef * z_share,
            aux_loss=E * (fraction * batch_probs).sum() / n,
            z_loss=batch_lse_sq.squeeze() / n,
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=dropped.detach(),
        )

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """DeepSeek-V3's auxiliary-loss-free step, after an optimizer step: each expert's bias moves by
        ``bias_update_rate`` towards balance, sign(mean load - its load), from the step's load (E,)."""
        rate = self.moe.bias_update_rate
        if rate > 0:
            load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
            self.expert_bias += rate * torch.sign(load.mean() - load)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    """The MoE feed-forwards of ``model`` in block order, through any wrapper (DDP, compile, FSDP)."""
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def router_loss(layers: list[MoEFeedForward]) -> torch.Tensor | None:
    """The sum of the layers' balancing terms from their last training forward (None: nothing to add, as
    without MoE layers or with both coefficients 0)."""
    losses = [
        layer.last_stats.loss
        for layer in layers
        if layer.last_stats is not None and (layer.moe.aux_loss_coef > 0 or layer.moe.z_loss_coef > 0)
    ]
    return torch.stack(losses).sum() if losses else None
