"""What ``parallelize`` and ``init_world`` decide before any process group exists."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.distributed.parallelize import (
    TRAIN_STATE_BYTES_PER_PARAM,
    World,
    parallelize,
    resolve_strategy,
    training_state_bytes,
)
from lmforge.errors import ConfigError
from lmforge.model.info import count_params
from lmforge.model.transformer import build_model

TWO = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
ONE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_auto_shards_only_when_one_replica_of_the_training_state_does_not_fit():
    auto = ParallelConfig(strategy="auto")
    assert resolve_strategy(auto, TWO, state_bytes=10, memory_bytes=11) == "ddp"
    assert resolve_strategy(auto, TWO, state_bytes=12, memory_bytes=11) == "fsdp"
    assert resolve_strategy(auto, ONE, state_bytes=12, memory_bytes=11) == "single"
    assert resolve_strategy(ParallelConfig(strategy="fsdp"), TWO, state_bytes=1, memory_bytes=10) == "fsdp"


def test_the_estimate_is_16_bytes_per_parameter_for_a_7b_model():
    from lmforge.model.presets import PRESETS

    cfg = PRESETS["7b"]
    assert TRAIN_STATE_BYTES_PER_PARAM == 16
    assert training_state_bytes(cfg) == 16 * count_params(cfg)
    assert training_state_bytes(cfg) > 80 * 2**30  # more than one 80 GB GPU holds: auto picks FSDP


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
