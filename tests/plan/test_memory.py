"""The memory model against measurement on the CPU, the 7B facts, and monotonic sanity."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import PRESETS, ModelConfig, MoEConfig
from lmforge.plan.hardware import GIB, KNOWN_HARDWARE
from lmforge.plan.memory import Layout, memory_breakdown
from lmforge.plan.planner import Cluster, Workload, plan_cluster
from tests.conftest import missing

MEASURE = Path(__file__).with_name("measure_peak.py")

# Three small fp32 configurations: a Llama-style block without and with activation checkpointing (with a
# small vocabulary so the blocks dominate), and a GPT-2-style block (GELU, LayerNorm, learned positions,
# biases) with grouped-query attention and checkpointing, where the vocabulary dominates.
CONFIGS = {
    "llama": dict(
        model=dict(vocab_size=512, n_layers=6, d_model=256, n_heads=8, max_seq_len=256),
        micro_batch=8, seq_len=128, checkpointing=False,
    ),
    "llama-ac": dict(
        model=dict(vocab_size=512, n_layers=6, d_model=256, n_heads=8, max_seq_len=256),
        micro_batch=8, seq_len=128, checkpointing=True,
    ),
    "gpt2-gqa-ac": dict(
        model=dict(vocab_size=4000, n_layers=4, d_model=192, n_heads=6, n_kv_heads=2, ffn="gelu",
                   norm="layernorm", position="learned", bias=True, max_seq_len=256),
        micro_batch=4, seq_len=256, checkpointing=True,
    ),
    # Mixture of Experts: 16 experts of 128, top-4 of a renormalised softmax, a gated shared expert, the
    # first layer dense (checkpointing keeps a MoE block's input only, as for a dense one).
    "moe": dict(
        model=dict(vocab_size=512, n_layers=4, d_model=256, n_heads=8, max_seq_len=256, ffn_hidden=512,
                   moe=dict(n_experts=16, top_k=4, expert_hidden=128, n_shared_experts=1,
                            shared_expert_gate=True, first_dense_layers=1, router="softmax_topk",
                            norm_topk_prob=True)),
        micro_batch=8, seq_len=128, checkpointing=False,
    ),
}  # fmt: skip


def model_config(values: dict) -> ModelConfig:
    return ModelConfig(**{**values, "moe": MoEConfig(**values.get("moe", {}))})


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    """Peak training memory of each configuration, each in its own fresh process.

    How: tests/plan/measure_peak.py runs 2 AdamW steps (the second holds the optimizer state and the
    activations) with glibc's mmap threshold pinned at 64 KiB (so freed tensors leave the resident set),
    resets the kernel's RSS high-water mark after a warm-up and reports VmHWM - VmRSS; that is memory, not
    time, so a loaded machine does not change it.
    """
    if not Path("/proc/self/clear_refs").exists():
        missing("needs Linux /proc/self/clear_refs to reset the resident-set high-water mark")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    procs = {}
    results = {}
    names = list(CONFIGS)
    for name in names:  # all at once: contention slows them down but does not change their memory
        spec = json.dumps(CONFIGS[name] | {"steps": 2})
        procs[name] = subprocess.Popen(
            [sys.executable, str(MEASURE), spec],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name in names:
        out, err = procs[name].communicate(timeout=120)
        assert procs[name].returncode == 0, err
        results[name] = json.loads(out)["peak_bytes"]
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_predicted_peak_within_20_percent_of_measured(measured, name):
    spec = CONFIGS[name]
    layout = Layout(
        micro_batch=spec["micro_batch"],
        seq_len=spec["seq_len"],
        precision="fp32",
        activation_checkpointing=spec["checkpointing"],
        device_kind="cpu",
    )
    predicted = memory_breakdown(model_config(spec["model"]), layout).tensors
    ratio = predicted / measured[name]
    assert 0.8 <= ratio <= 1.2, (
        f"{name}: predicted {predicted / 2**20:.1f} MiB, measured {measured[name] / 2**20:.1f}"
    )


def test_checkpointing_measurably_saves_memory(measured):
    assert measured["llama-ac"] < 0.7 * measured["llama"]


# -- 7B facts ----------------------------------------------------------------------------------------------


def test_7b_parameters_and_training_state():
    """The planner's own fields against arithmetic by hand (Llama-2 7B: d 4096, FFN 11008, 32 layers, 32000
    tokens, untied head): fp32 master weights and gradients (4 bytes each), two fp32 AdamW moments (8)."""
    d, ffn, layers, vocab = 4096, 11008, 32, 32000
    block = 4 * d * d + 3 * d * ffn + 2 * d  # q, k, v, o; gate, up, down; two RMSNorm weights
    n = layers * block + vocab * d + vocab * d + d  # blocks, embedding, head, final norm
    assert n == 6_738_415_616
    cfg = PRESETS["7b"]

    def memory(**kw):
        return memory_breakdown(cfg, Layout(micro_batch=1, seq_len=4096, precision="bf16", **kw))

    one = memory(strategy="single")  # the peak is the optimizer step: every gradient is alive
    assert one.peak_phase == "optimizer"
    assert (one.weights, one.gradients, one.optimizer) == (4 * n, 4 * n, 8 * n)
    assert 107e9 < one.weights + one.gradients + one.optimizer < 109e9  # 16 bytes per parameter, ~108 GB
    accumulating = memory(strategy="single", grad_accum=2)  # gradients carried across micro-batches
    assert accumulating.gradients == 4 * n
    sharded = memory(strategy="fsdp", world_size=8, grad_accum=4)
    assert (sharded.weights, sharded.gradients, sharded.optimizer) == (4 * n // 8, 4 * n // 8, 8 * n // 8)
    first = memory(strategy="fsdp", world_size=8)  # peak at the loss: only the head's gradient exists
    assert first.peak_phase == "loss" and first.gradients == 4 * (vocab * d + d) // 8
    offloaded = memory(strategy="fsdp", world_size=8, cpu_offload=True)
    assert (offloaded.weights, offloaded.gradients, offloaded.optimizer) == (0, 0, 0)
    assert offloaded.host_bytes == 16 * n // 8


def test_7b_does_not_fit_one_80gb_gpu_but_fits_8_with_fsdp():
    cfg = PRESETS["7b"]
    h100 = KNOWN_HARDWARE["H100-80GB"]
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=10**12)
    one = plan_cluster(cfg, Cluster(hardware=h100, gpus=1), workload)
    assert one.parameters == 6_738_415_616
    unsharded = [c for c in one.candidates if c.layout.strategy == "single"]
    assert unsharded and not any(c.fits for c in unsharded)
    assert all(c.predicted_bytes > 100 * GIB for c in unsharded)  # the 108 GB state alone is over
    eight = plan_cluster(cfg, Cluster(hardware=h100, gpus=8), workload)
    fsdp = next(c for c in eight.candidates if c.name == "FSDP")
    assert fsdp.fits and fsdp.memory.weights + fsdp.memory.optimizer == 12 * 6_738_415_616 // 8
    assert not next(c for c in eight.candidates if c.name == "DDP").fits
    assert eight.chosen is not None and eight.chosen.layout.strategy == "fsdp"
    assert eight.chinchilla_tokens == 20 * 6_738_415_616


# -- monotonic sanity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2-124m", "1b", "7b"])
@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("offload", [False, True])
def test_more_gpus_never_predict_more_memory_per_gpu_under_fsdp(preset, ac, offload):
    cfg = PRESETS[preset]
    previous = None
    for gpus in (1, 2, 4, 8, 16, 64, 512):
        for micro_batch, grad_accum in ((1, 1), (4, 2)):
            layout = Layout(
                strategy="fsdp", world_size=gpus, micro_batch=micro_batch, grad_accum=grad_accum,
                seq_len=2048,
                activation_checkpointing=ac, cpu_offload=offload,
            )  # fmt: skip
            total = memory_breakdown(cfg, layout).total
            if micro_batch == 1 and previous is not None:
                assert total <= previous, (gpus, total, previous)
            if micro_batch == 1:
                previous = total


@pytest.mark.parametrize("preset", ["tiny", "gpt2-124m", "llama-160m", "1b", "7b"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_activation_checkpointing_never_predicts_more_activation_memory(preset, precision, strategy):
    cfg = PRESETS[preset]
    for micro_batch in (1, 3, 16):
        for seq in (64, 1024):
            base = Layout(
                strategy=strategy, world_size=8, micro_batch=micro_batch, seq_len=seq, precision=precision
            )
            without = memory_breakdown(cfg, base)
            with_ac = memory_breakdown(cfg, dataclasses.replace(base, activation_checkpointing=True))
            assert with_ac.activations_per_micro_batch <= without.activations_per_micro_batch
            assert with_ac.total <= without.total


def test_memory_grows_with_micro_batch_and_sequence():
    cfg = PRESETS["llama-160m"]
    totals = [memory_breakdown(cfg, Layout(micro_batch=mb, seq_len=512)).total for mb in (1, 2, 4, 8)]
    assert totals == sorted(totals) and len(set(totals)) == 4
