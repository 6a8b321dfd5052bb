"""What ``parallelize`` and ``init_world`` decide before any process group exists."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.distributed.parallelize import World, parallelize
from lmforge.errors import ConfigError
from lmforge.model.transformer import build_model

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
