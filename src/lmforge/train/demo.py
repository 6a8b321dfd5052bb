"""The built-in demo's config (the same as ``configs/demo.yaml``, kept here so an installed package needs
no files): the ``tiny`` preset on the Python standard library's own top-level modules."""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.config import Config, apply_overrides, config_from_dict

DEMO: dict = {
    "model": {"preset": "tiny"},
    "data": {"sources": ["{stdlib}/*.py"], "tokenizer": "bpe", "vocab_size": 2048, "val_fraction": 0.03},
    "train": {
        "out_dir": "runs/demo",
        "steps": 1000,
        "seq_len": 128,
        "micro_batch": 16,
        "lr": 3.0e-3,
        "min_lr": 3.0e-4,
        "warmup_steps": 30,
        "schedule": "cosine",
        "weight_decay": 0.1,
        "eval_every": 250,
        "eval_batches": 10,
        "ckpt_every": 250,
        "log_every": 25,
        "sample_prompts": ["def ", "class "],
        "sample_tokens": 100,
        "time_limit_minutes": 3.5,
    },
}


def demo_config(overrides: Sequence[str] = ()) -> Config:
    return config_from_dict(apply_overrides(DEMO, overrides))
