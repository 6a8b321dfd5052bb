"""The example recipes in configs/ load, validate, and plan as their comments say."""

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.model.info import count_params
from lmforge.plan.hardware import KNOWN_HARDWARE
from lmforge.plan.training import plan_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
H100 = KNOWN_HARDWARE["H100-80GB"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(path, [])
    assert cfg.train.seq_len <= cfg.model.max_seq_len


@pytest.mark.parametrize(
    ("name", "strategy"), [("gpt2-124m.yaml", "ddp"), ("1b.yaml", "ddp"), ("7b.yaml", "fsdp")]
)
def test_the_gpu_recipes_fit_one_node_of_8_h100(name, strategy):
    cfg = load_config(CONFIGS / name, [])
    plan = plan_training(cfg, device_kind="cuda", world_size=8, device_memory_bytes=H100.memory_bytes)
    assert plan.strategy == strategy
    assert plan.predicted_peak_bytes <= H100.memory_bytes
    assert plan.tokens_per_step == cfg.train.global_batch_tokens
    tokens = cfg.train.steps * cfg.train.global_batch_tokens
    assert 19 <= tokens / count_params(cfg.model) <= 23  # about 20 tokens per parameter, as the comments say
