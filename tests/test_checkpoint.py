"""Checkpoint folders: atomic writes with checksums, and every way a damaged or foreign folder is refused."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import (
    latest_valid_checkpoint,
    load_model,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    step_dir_name,
    verify_checkpoint,
)
from lmforge.config import Config, ModelConfig
from lmforge.errors import CheckpointError
from lmforge.model.transformer import build_model

CFG = Config(model=ModelConfig(vocab_size=32, max_seq_len=16, n_layers=1, d_model=16, n_heads=2))


def save(run, step: int, seed: int = 0):
    model = build_model(CFG.model, seed=seed)
    return save_checkpoint(
        run / "checkpoints" / step_dir_name(step), model_state=model.state_dict(), config=CFG
    )


def test_a_saved_checkpoint_loads_the_same_weights_with_the_head_tied(tmp_path):
    path = save(tmp_path, 1)
    assert verify_checkpoint(path) == []
    model, config, directory = load_model(tmp_path)  # a run folder resolves to its newest valid checkpoint
    reference = build_model(CFG.model, seed=0)
    assert directory == path and config == CFG
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.lm_head.weight is model.embed_tokens.weight


def test_damage_is_found_and_the_newest_intact_checkpoint_is_used(tmp_path):
    first, second = save(tmp_path, 1), save(tmp_path, 2, seed=1)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    problems = verify_checkpoint(second)
    assert problems and "model.safetensors" in problems[0] and "truncated" in problems[0]
    found = latest_valid_checkpoint(tmp_path)
    assert found.path == first and found.skipped and "step_00000002" in found.skipped[0]
    with pytest.raises(CheckpointError, match="invalid checkpoint:"):
        resolve_checkpoint(second)  # asked for by name: refused, not silently replaced


def test_folders_that_are_not_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint or run folder"):
        resolve_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointError, match="neither a checkpoint .* nor a run folder with a valid checkpoint"
    ):
        resolve_checkpoint(tmp_path / "empty")
    sharded = tmp_path / "sharded"
    (sharded / "dcp").mkdir(parents=True)
    (sharded / "config.yaml").write_text("model:\n  preset: tiny\n")
    with pytest.raises(CheckpointError, match="it is sharded: lmforge consolidate"):
        from lmforge.checkpoint import load_model_state

        load_model_state(sharded, CFG)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    (garbage / "config.yaml").write_text("model:\n  vocab_size: 32\n")
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load_model(garbage)


def test_keep_last_removes_only_the_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
