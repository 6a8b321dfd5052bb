"""The memory of a reinforcement-learning step (``tune.rl``): the policy's training step, the KL reference,
and the generation phase with its KV cache.

An RL step has two phases that never overlap: generation (the policy samples ``group_size`` completions for
each prompt of a generate call, under no_grad: weights, optimizer moments, the KV cache of the call and its
per-step logits; under FSDP also the whole policy gathered from the shards) and training (the ordinary
training step of ``plan.memory`` over micro-batches of prompt + completion). A frozen full copy of the base
model (the KL reference of full fine-tuning, beta > 0) is alive in both. Gradients are freed between steps
(``zero_grad(set_to_none=True)``), so generation holds none. The cache is allocated in the weights' dtype
(fp32 master weights), as ``model.transformer.KVCache`` does. LoRA's smaller optimizer state is not modelled
(the full fine-tuning figure is an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ModelConfig
from lmforge.plan.memory import Layout, MemoryBreakdown, memory_breakdown, param_counts

WEIGHT_BYTES = 4  # fp32 master weights (and so the KV cache and a frozen copy)


@dataclass(frozen=True)
class RLMemory:
    """Bytes on one device at each phase's peak."""

    training: MemoryBreakdown  # the policy's training step (plan.memory)
    reference: int  # a frozen full copy of the base: full fine-tuning with beta > 0; else 0
    generation_copy: int  # FSDP: the whole policy gathered for sampling; else 0
    kv_cache: int  # keys, values and key mask of one generate call
    generation_logits: int  # a decoding step's last-position logits and its sampling buffers

    @property
    def generation_peak(self) -> int:
        t = self.training
        persistent = t.weights + t.optimizer + self.reference
        return persistent + self.generation_copy + self.kv_cache + self.generation_logits + t.overhead

    @property
    def training_peak(self) -> int:
        return self.training.total + self.reference

    @property
    def total(self) -> int:
        return max(self.generation_peak, self.training_peak)

    @property
    def peak_phase(self) -> str:
        return "generation" if self.generation_peak > self.training_peak else "training"

    def describe(self) -> str:
        gib = 2**30
        return (
            f"RL step peak {self.total / gib:.2f} GiB at {self.peak_phase} (training {self.training_peak / gib:.2f} "
            f"GiB; generation {self.generation_peak / gib:.2f} GiB with a {self.kv_cache / gib:.3f} GiB KV cache"
            + (f", reference copy {self.reference / gib:.2f} GiB" if self.reference else "")
            + ")"
        )


def kv_cache_bytes(cfg: ModelConfig, rows: int, max_len: int) -> int:
    """A ``KVCache`` for ``rows`` sequences of ``max_len`` positions: a key and a value tensor per layer of
    (rows, kv heads, max_len, head dim) in the weights' dtype, and a boolean key mask (rows, max_len)."""
    return 2 * cfg.n_layers * rows * cfg.kv_heads * max_len * cfg.head_dim * WEIGHT_BYTES + rows * max_len


def rl_memory(
    cfg: ModelConfig,
    layout: Layout,
    *,
    rows_per_call: int,
    prompt_tokens: int,
    max_new_tokens: int,
    reference_copy: bool,
    overhead_bytes: int = 0,
) -> RLMemory:
    """The RL step's memory: ``layout`` is the training step's (micro-batch of completions, ``seq_len`` =
    prompt + completion); ``rows_per_call`` = groups per generate call x group size; ``reference_copy``: full
    fine-tuning with a KL penalty keeps a frozen copy of the base."""
    params = param_counts(cfg).total
    whole = params * WEIGHT_BYTES
    training = memory_breakdown(cfg, layout, overhead_bytes=overhead_bytes)
    return RLMemory(
        training=training,
        reference=whole if reference_copy else 0,
        generation_copy=whole if layout.strategy == "fsdp" and layout.world_size > 1 else 0,
        kv_cache=kv_cache_bytes(cfg, rows_per_call, prompt_tokens + max_new_tokens),
        generation_logits=3 * rows_per_call * cfg.vocab_size * 4,  # logits, their fp32 softmax, the filter
    )
