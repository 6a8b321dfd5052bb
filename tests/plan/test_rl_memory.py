"""The RL step's memory model against what lmforge allocates: the generation KV cache against a real
``KVCache``, the reference copy and the FSDP generation copy against a built model's parameters, and the
phases against the training step's own model."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.model.transformer import KVCache, build_model
from lmforge.plan.memory import Layout, memory_breakdown
from lmforge.plan.rl import kv_cache_bytes, rl_memory

CFG = ModelConfig(
    vocab_size=300, max_seq_len=128, n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=160,
    tie_embeddings=True,
)  # fmt: skip


def test_the_kv_cache_is_what_the_generator_allocates():
    for rows, length in ((8, 40), (64, 100)):
        cache = KVCache.empty(CFG, rows, length, device=torch.device("cpu"), dtype=torch.float32)
        allocated = sum(t.nbytes for t in cache.keys + cache.values) + cache.key_mask.nbytes
        assert kv_cache_bytes(CFG, rows, length) == allocated


def test_reference_and_generation_copies_are_the_models_weights_and_the_peak_is_the_larger_phase():
    weights = sum(p.nbytes for p in build_model(CFG, seed=0).parameters())  # tied: the embedding once
    layout = Layout(
        strategy="single", micro_batch=8, seq_len=48, grad_accum=4, precision="fp32", device_kind="cpu"
    )
    kwargs = dict(prompt_tokens=40, max_new_tokens=8, reference_copy=True)
    small = rl_memory(CFG, layout, rows_per_call=8, **kwargs)
    assert small.reference == weights and small.generation_copy == 0
    assert small.training == memory_breakdown(CFG, layout)
    assert small.training_peak == small.training.total + weights
    t = small.training
    assert (
        small.generation_peak == t.weights + t.optimizer + weights + small.kv_cache + small.generation_logits
    )
    assert small.total == max(small.training_peak, small.generation_peak) and small.peak_phase == "training"
    # sampling every group in one call: a cache for 4096 rows outgrows the training step
    large = rl_memory(CFG, layout, rows_per_call=4096, **kwargs)
    assert large.kv_cache == 512 * small.kv_cache and large.peak_phase == "generation"
    lora = rl_memory(CFG, layout, rows_per_call=8, prompt_tokens=40, max_new_tokens=8, reference_copy=False)
    assert lora.reference == 0 and lora.total < small.total
    fsdp = rl_memory(
        CFG, Layout(strategy="fsdp", world_size=2, micro_batch=8, seq_len=48), rows_per_call=8, **kwargs
    )
    assert fsdp.generation_copy == weights  # the whole policy, gathered from the shards
