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


def test_tensor_parallelism_is_refused_with_the_way_out():
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2), device="cpu")
    with pytest.raises(ConfigError, match=r"parallel\.tp=2: tensor parallelism is not implemented"):
        parallelize(model, ParallelConfig(tp=2), ONE)


def test_cpu_offload_without_a_gpu_is_refused_with_the_fix():
    model = build_model(ModelConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2), device="cpu")
    with pytest.raises(ConfigError, match=r"set parallel\.cpu_offload=false"):
        parallelize(model, ParallelConfig(strategy="fsdp", cpu_offload=True), TWO)
