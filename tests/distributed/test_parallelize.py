"""What ``parallelize`` and ``init_world`` decide before any process group exists."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.distributed.parallelize import World, parallelize
from lmforge.errors import ConfigError
from lmforge.model.fused import FusedBlock
from lmforge.model.transformer import build_model, rope_cos_sin

TWO = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_one_process_keeps_the_model_as_it_is():
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2), device="cpu")
    assert parallelize(model, ParallelConfig(strategy="fsdp"), ONE) is model


def test_a_tensor_parallel_degree_must_divide_the_heads_and_the_processes(monkeypatch):
    from lmforge.config import load_config
    from lmforge.distributed.parallelize import init_world

    with pytest.raises(
        ConfigError, match=r"parallel\.tp=2 must divide model\.n_heads=3, model\.n_kv_heads=3"
    ):
        load_config(None, ["model.n_heads=3", "model.d_model=48", "parallel.tp=2"])
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    with pytest.raises(
        ConfigError, match=r"parallel\.tp=2 must divide the number of processes, WORLD_SIZE=3"
    ):
        init_world(ParallelConfig(tp=2), torch.device("cpu"))


def test_cpu_offload_on_the_cpu_is_accepted():
    # FSDP2's CPUOffloadPolicy runs on gloo without pinned memory (tests/distributed/test_cpu_offload.py
    # checks the loss curve); without a process group there is nothing to shard and the model is returned
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2), device="cpu")
    assert parallelize(model, ParallelConfig(strategy="fsdp", cpu_offload=True), ONE) is model


def fused_layers(**kwargs) -> list[bool]:
    model = build_model(ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=2), device="cpu")
    parallelize(model, ParallelConfig(), ONE, **kwargs)
    return [type(block) is FusedBlock for block in model.layers]


def test_the_fused_block_is_applied_for_fp32_on_the_cpu_only():
    assert fused_layers() == [True, True]
    assert fused_layers(activation_checkpointing=True) == [True, True]
    assert fused_layers(precision="bf16") == [False, False]  # autocast: the plain modules
    assert fused_layers(compile=True) == [False, False]  # inductor fuses the plain modules itself
    assert fused_layers(fused_blocks=False) == [False, False]


def test_activation_checkpointing_keeps_the_fused_block_and_its_gradients():
    cfg = ModelConfig(vocab_size=32, max_seq_len=16, n_layers=2, d_model=16, n_heads=2)
    idx = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    grads = {}
    for name, kwargs in {
        "plain": dict(fused_blocks=False),
        "fused+ac": dict(activation_checkpointing=True),
    }.items():
        model = parallelize(build_model(cfg, seed=1), ParallelConfig(), ONE, **kwargs)
        logits = model(idx)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    x = torch.randn(2, 16, 16)
    rope = rope_cos_sin(torch.arange(16)[None], model.rope_inv_freq)
    assert type(model.layers[0](x, rope, None).grad_fn).__name__ == "_MLPSublayerBackward"  # under checkpoint
    for n, ref in grads["plain"].items():
        assert (grads["fused+ac"][n] - ref).abs().max() <= 1e-5 * ref.abs().max(), n
