"""The memory model: bytes per device for training a ModelConfig under one parallel layout.

Persistent state (weights, gradients, AdamW moments) follows from the parameter count and the layout.
Activations are the tensors autograd saves for the backward pass, counted op by op for lmforge's own
Transformer (model/transformer.py): RMSNorm/LayerNorm, q/k/v projections, RoPE, SDPA (flash / memory-
efficient kernels save q, k, v, the output and a log-sum-exp, never the T x T scores), the SwiGLU or GELU
feed-forward, the output head and a cross-entropy computed in fp32. ``tests/plan`` checks the total against
a measured peak on the CPU.

The peak is the largest of three moments of a step:
  loss          weights + optimizer + activations + logits and loss buffers + the head's gradient
  backward      weights + optimizer + gradients so far + activations not yet freed + one layer's buffers
  optimizer     weights + optimizer + all gradients + the optimizer's temporaries
(with gradient accumulation the gradients stay allocated between micro-batches, so they join the first two).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.config import ModelConfig
from lmforge.model.info import (
    count_active_params,
    count_expert_params,
    count_params,
    expert_hidden,
    moe_layers,
    moe_params,
    shared_expert_hidden,
)

Strategy = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True, kw_only=True)
class Layout:
    """How one training process holds the model: the strategy, the batch it runs and the switches."""

    strategy: Strategy = "single"
    world_size: int = 1  # processes (one per GPU)
    tp: int = 1  # tensor-parallel degree (inside the FSDP layout)
    ep: int = 1  # expert-parallel degree: each rank of an EP group holds n_experts / ep routed experts
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    device_kind: str = "cuda"

    @property
    def dp(self) -> int:
        """Data-parallel degree: the processes that hold different batches (and share FSDP shards)."""
        return max(1, self.world_size // self.tp)

    @property
    def shards(self) -> int:
        """How many ways the training state is split: FSDP over every process, otherwise not at all."""
        return self.world_size if self.strategy == "fsdp" else 1

    @property
    def expert_shards(self) -> int:
        """How many ways the routed experts' training state is split. Expert parallelism gives each rank
        ``n_experts / ep`` experts; under FSDP the ``dp / ep`` ranks that hold the same experts shard them
        further (torchtitan's layout), so the experts end up split over every process like the rest."""
        return self.world_size if self.strategy == "fsdp" else self.tp * self.ep

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class ParamCounts:
    total: int
    per_block: int  # one Transformer block (the average block when some are MoE and some dense)
    embedding: int  # token (and learned position) embeddings
    head: int  # the output projection when not tied to the embedding (else 0) plus the final norm
    largest: int  # the largest single tensor (the optimizer's per-tensor temporaries)
    experts: int = 0  # the routed experts of every MoE block (what expert parallelism divides)
    active: int = 0  # parameters one token uses (= total for a dense model)
    dense_block: int = 0  # one block with the dense feed-forward (0 when every block is MoE)
    moe_block_shared: int = 0  # one MoE block without its routed experts: attention, router, shared experts
    moe_block_experts: int = 0  # the routed experts of one MoE block

    def per_rank(self, layout: Layout) -> float:
        """Parameters whose training state one process holds: the dense part split by FSDP (or TP), the
        routed experts by ``Layout.expert_shards``."""
        shard = layout.shards if layout.strategy == "fsdp" else layout.tp
        return (self.total - self.experts) / shard + self.experts / layout.expert_shards

    def gathered_block(self, ep: int) -> int:
        """The largest block one process gathers under FSDP: its dense part and its ``1/ep`` of the experts."""
        moe = self.moe_block_shared + self.moe_block_experts // ep if self.moe_block_experts else 0
        return max(self.dense_block, moe) if self.experts else self.per_block


def param_counts(cfg: ModelConfig) -> ParamCounts:
    total = count_params(cfg)
    embedding = cfg.vocab_size * cfg.d_model + (
        cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
    )
    norm = cfg.d_model * (2 if cfg.norm == "layernorm" else 1)
    head = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model) + norm
    per_block = (total - embedding - head) // cfg.n_layers
    largest = max(cfg.vocab_size * cfg.d_model, cfg.d_model * cfg.hidden_dim, cfg.d_model * cfg.d_model)
    n_moe = moe_layers(cfg)
    if not n_moe:
        return ParamCounts(
            total=total, per_block=per_block, embedding=embedding, head=head, largest=largest, active=total
        )
    moe = moe_params(cfg)
    dense = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, n_experts=0))
    dense_block = (count_params(dense) - embedding - head) // cfg.n_layers
    moe_block = (total - embedding - head - (cfg.n_layers - n_moe) * dense_block) // n_moe
    return ParamCounts(
        total=total,
        per_block=per_block,
        embedding=embedding,
        head=head,
        largest=max(largest, moe.routed // 3),  # the stacked w_gate [E, d, h]
        experts=count_expert_params(cfg),
        active=count_active_params(cfg),
        dense_block=dense_block if n_moe < cfg.n_layers else 0,
        moe_block_shared=moe_block - moe.routed,
        moe_block_experts=moe.routed,
    )


@dataclass(frozen=True)
class Activations:
    """Bytes saved for backward by one micro-batch on one process, and the transient buffers around them."""

    per_layer: int  # one block without checkpointing
    per_layer_stored: int  # what one block keeps until its backward (its input only, with checkpointing)
    rest: int  # token ids, position tables, final norm, log-softmax output
    rest_backward: int  # what of ``rest`` is still alive once the loss and head are done (ids, tables)
    head_transient: int  # logits, and the loss gradients at the start of backward
    backward_transient: int  # gradient buffers inside one block's backward

    def saved(self, n_layers: int) -> int:
        return n_layers * self.per_layer_stored + self.rest


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def activation_bytes(cfg: ModelConfig, layout: Layout) -> Activations:
    """Saved-activation bytes per micro-batch, following the kernels of model/transformer.py.

    Three dtype regimes: fp32; ``autocast`` (fp32 weights and residual stream, bf16/fp16 matmuls: every
    linear casts its input, so q/k/v keep three half-precision copies of the normed input); and FSDP mixed
    precision (bf16 parameters, a bf16 residual stream). Tensor parallelism (with sequence parallelism)
    divides every per-token tensor by the TP degree.
    """
    C, F, V = cfg.d_model, cfg.hidden_dim, cfg.vocab_size
    kv = cfg.kv_heads * cfg.head_dim  # width of k and v
    hd, H = cfg.head_dim, cfg.n_heads
    tokens = layout.tokens_per_micro_batch
    fp32 = layout.precision == "fp32"
    autocast = not fp32 and layout.strategy != "fsdp"
    half = 2
    rms = cfg.norm == "rmsnorm"
    swiglu = cfg.ffn == "swiglu"

    # Per token and layer, in bytes. Norm statistics (rsqrt, mean) are fp32 scalars per token.
    stats = 4 if rms else 8
    if fp32:
        # RMSNorm keeps x, x*rsqrt, and the scaled output (read by the projections); LayerNorm keeps x and y.
        norm_attn = norm_mlp = (3 if rms else 2) * C * 4 + stats
        attn = (C + kv + kv + C) * 4 + H * 4  # rotated q, rotated k, v, output (+ log-sum-exp)
        mlp = (4 * F if swiglu else 2 * F) * 4
        rope = 0
        residual = 4
    elif autocast:
        # fp32 residual; the norm keeps x (and x*rsqrt); each projection keeps its own half-precision cast.
        norm_attn = (8 if rms else 4) * C + 3 * C * half + stats
        norm_mlp = (8 if rms else 4) * C + (2 if swiglu else 1) * C * half + stats
        attn = (C + kv + kv + C) * half + H * 4
        mlp = (4 * F if swiglu else 2 * F) * half
        rope = 4 * hd * half if cfg.position == "rope" else 0  # cos/sin cast to half for q and k
        residual = 4
    else:
        # bf16 residual; RMSNorm upcasts to fp32 (kept), casts back (kept) and scales (kept by projections).
        norm_attn = norm_mlp = ((4 + 2 + 2) * C if rms else 2 * C * half) + stats
        attn = (C + kv + kv + C) * half + H * 4
        mlp = (4 * F if swiglu else 2 * F) * half
        rope = 4 * hd * half if cfg.position == "rope" else 0
        residual = half
    dropout = 2 * C if cfg.dropout > 0 else 0  # one bool mask per residual dropout
    layer_per_token = norm_attn + attn + norm_mlp + mlp + rope + dropout
    backward_per_token = (3 * F + 2 * C) * (4 if fp32 else half) + C * residual
    n_moe = moe_layers(cfg)
    stored_per_token = layer_per_token  # averaged over the blocks when MoE and dense blocks mix
    if n_moe:
        moe_norm, moe_mlp, moe_backward = _moe_bytes_per_token(
            cfg, layout, norm_mlp, 4 if fp32 else half, autocast
        )
        moe_layer = norm_attn + attn + moe_norm + moe_mlp + rope + dropout
        n_dense = cfg.n_layers - n_moe
        stored_per_token = (n_dense * layer_per_token + n_moe * moe_layer) / cfg.n_layers
        layer_per_token = max(layer_per_token if n_dense else 0, moe_layer)
        backward_per_token = max(backward_per_token if n_dense else 0, moe_backward + C * residual)

    act = 4 if fp32 else half
    # Outside the blocks: token ids (int64), fp32 RoPE tables, the final norm, the fp32 log-softmax output.
    rope_tables = 2 * hd * 4 if cfg.position == "rope" else 0
    if fp32:
        final_norm = (3 if rms else 2) * C * 4 + stats
    elif autocast:
        final_norm = (8 if rms else 4) * C + C * half + stats
    else:
        final_norm = ((4 + 2 + 2) * C if rms else 2 * C * half) + stats
    rest_per_token = 8 + rope_tables + final_norm + 4 * V
    # Logits stay referenced by the loop; the loss backward makes the fp32 gradient of the log-probabilities
    # and of the logits before casting back: logits + 2 fp32 vocabulary-wide buffers at once.
    head_per_token = act * V + 2 * 4 * V

    tp = layout.tp
    per_layer = tokens * layer_per_token // tp
    stored = int(tokens * stored_per_token) // tp
    if layout.activation_checkpointing:
        stored = tokens * C * residual // tp
    weight_copies = 0
    if autocast:  # autocast's half-precision copies of the weights stay saved until each layer's backward
        weight_copies = 2 * param_counts(cfg).gathered_block(layout.ep) // tp
    return Activations(
        per_layer=per_layer + weight_copies,
        per_layer_stored=stored + (0 if layout.activation_checkpointing else weight_copies),
        rest=tokens * rest_per_token // tp + (2 * V * C if autocast else 0),
        rest_backward=tokens * (8 + rope_tables) // tp,
        head_transient=tokens * head_per_token // tp,
        backward_transient=tokens * backward_per_token // tp,
    )


def _moe_bytes_per_token(
    cfg: ModelConfig, layout: Layout, norm_mlp: int, mm: int, autocast: bool
) -> tuple[int, int, int]:
    """Bytes per token of one MoE feed-forward: (its norm, what it saves for backward, its backward buffers).

    Not yet checked against a measured peak (no MoE layer was on main when this was written). Counted as
    a dropless, balanced token-choice layer: the router's fp32 probabilities and its top-k indices and
    weights; per chosen expert the token's gathered input, SwiGLU's gate, up, activation and product, and
    the expert's output (kept for the weighted combine); the shared feed-forward and its gate. A capacity factor
    pads each expert's buffer to ``capacity_factor x`` its fair share. Expert parallelism moves tokens but
    not how many each rank holds on average; its all-to-all send/receive buffers count as backward buffers.
    """
    C, moe = cfg.d_model, cfg.moe
    h_e, h_s = expert_hidden(cfg), shared_expert_hidden(cfg)
    routed = moe.top_k * (moe.capacity_factor or 1.0)
    norm = norm_mlp
    if autocast:  # the norm output is cast once for the router and once per shared projection, not twice
        norm += (1 + (2 if h_s else 0) - (2 if cfg.ffn == "swiglu" else 1)) * C * mm
    saved = moe.n_experts * 4 + moe.top_k * (8 + 4)  # router probabilities; top-k indices and weights
    saved += routed * (2 * C + 4 * h_e) * mm
    if h_s:
        saved += (4 if cfg.ffn == "swiglu" else 2) * h_s * mm + (
            (C * mm + 4) if moe.shared_expert_gate else 0
        )
    backward = (routed * (3 * h_e + 2 * C) + (3 * h_s + 2 * C if h_s else 0)) * mm
    if layout.ep > 1:
        backward += 2 * moe.top_k * C * mm  # all-to-all send and receive buffers of the routed gradients
    return int(norm), int(saved), int(backward)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device at the predicted peak; the parts add up to ``total``."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved activations still alive at the peak
    temporary: int  # logits and loss buffers, FSDP all-gather / reduce-scatter buffers, optimizer temporaries
    overhead: int  # CUDA context, library workspaces, allocator slack
    peak_phase: str  # loss, backward or optimizer
    activations_per_micro_batch: int  # everything one micro-batch saves (the figure AC reduces)
    host_bytes: int  # CPU memory per process for the offloaded state (0 without offload)

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.activations + self.temporary + self.overhead
        )

    @property
    def tensors(self) -> int:
        """The training tensors alone (what an allocator or the CPU's resident set grows by)."""
        return self.total - self.overhead

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "temporary": self.temporary,
            "overhead": self.overhead,
            "total": self.total,
            "peak_phase": self.peak_phase,
            "activations_per_micro_batch": self.activations_per_micro_batch,
            "host_bytes": self.host_bytes,
        }


def memory_breakdown(
    cfg: ModelConfig, layout: Layout, *, overhead_bytes: int = 0, slack: float = 0.0
) -> MemoryBreakdown:
    """The predicted peak memory of one training process.

    Weights are fp32 master copies in every precision (autocast, or FSDP's fp32 shards with bf16 compute);
    gradients are fp32 (FSDP reduces in fp32); AdamW keeps two fp32 moments: 16 bytes per parameter in all,
    divided over the processes by FSDP (and TP), moved to the CPU by offload. ``overhead_bytes`` and
    ``slack`` (a fraction of the tensor peak, for allocator fragmentation) come from the hardware entry.
    """
    params = param_counts(cfg)
    act = activation_bytes(cfg, layout)
    L, tp = cfg.n_layers, layout.tp
    shard = layout.shards  # FSDP splits the state over every process (TP included), DDP/single not at all
    if layout.strategy != "fsdp":
        shard = tp  # TP alone still splits the matmul weights
    state_params = params.per_rank(layout)
    weights, gradients, optimizer = 4 * state_params, 4 * state_params, 8 * state_params
    host = 0
    if layout.cpu_offload:
        host = int(weights + gradients + optimizer)
        weights = gradients = optimizer = 0

    # Gradients appear layer by layer during backward: the head's first, then each block's.
    block_grad = 4 * params.per_block / shard
    if params.experts:  # the average block's share on this process (MoE and dense blocks mixed)
        block_grad = 4 * (state_params - (params.embedding + params.head) / shard) / L
    head_grad = 4 * (params.head + (params.embedding if cfg.tie_embeddings else 0)) / shard
    if layout.cpu_offload:
        block_grad = head_grad = 0
    keep_grads = layout.grad_accum > 1 and not layout.cpu_offload  # accumulated across micro-batches

    # Buffers that live through forward and backward.
    comm = 0.0
    compute_bytes = 4 if layout.precision == "fp32" else 2
    if layout.strategy == "fsdp":
        # The root (embeddings, final norm, head) stays gathered; two blocks are gathered at a time (the
        # current one and the prefetched next), plus an unsharded gradient and its fp32 reduce-scatter input.
        root = (params.embedding + params.head) / tp
        block = params.gathered_block(layout.ep) / tp  # with EP a process gathers only its own experts
        comm = root * compute_bytes + block * (3 * compute_bytes + compute_bytes + 4)
    elif layout.strategy == "ddp" and layout.world_size > 1:
        comm = gradients  # DDP's gradient buckets: a second copy of the gradients
    if layout.device_kind == "cuda":
        optimizer_temp = 4 * state_params if not layout.cpu_offload else 0  # foreach AdamW: one sqrt buffer
    else:
        optimizer_temp = 2 * 4 * params.largest / shard  # the per-tensor loop: a few tensor-sized buffers

    saved = act.saved(L)
    recompute = act.per_layer if layout.activation_checkpointing else 0
    fixed = weights + optimizer
    phases: dict[str, tuple[float, float, float]] = {}  # name -> (gradients, activations, temporary)
    carried = gradients if keep_grads else 0.0
    phases["loss"] = (carried or head_grad, saved, comm + act.head_transient)
    # Backward from the top block down: the blocks below still hold their saved tensors (the current one
    # too, recomputed under checkpointing), the blocks above already have gradients.
    best = (0.0, 0.0, 0.0)
    for remaining in range(L, 0, -1):
        grads = carried if keep_grads else head_grad + (L - remaining) * block_grad
        # (under checkpointing the current block's stored input is among its recomputed tensors)
        stored_blocks = remaining - 1 if layout.activation_checkpointing else remaining
        alive = stored_blocks * act.per_layer_stored + recompute + act.rest_backward
        temp = comm + act.backward_transient
        if sum((grads, alive, temp)) > sum(best):
            best = (grads, alive, temp)
    phases["backward"] = best
    phases["optimizer"] = (gradients, 0.0, optimizer_temp + (comm if layout.strategy == "ddp" else 0))
    phase = max(phases, key=lambda name: sum(phases[name]))
    grads, alive, temp = phases[phase]
    tensors = fixed + grads + alive + temp
    return MemoryBreakdown(
        weights=int(weights),
        gradients=int(grads),
        optimizer=int(optimizer),
        activations=int(alive),
        temporary=int(temp),
        overhead=int(overhead_bytes + slack * tensors),
        peak_phase=phase,
        activations_per_micro_batch=int(saved),
        host_bytes=host,
    )
