"""The built-in demo's config (the same as ``configs/demo.yaml``, kept here so an installed package needs
no files): the ``tiny`` preset on the Python standard library's own top-level modules.

``lmforge train`` without a config file starts from it; a run that names its own data keeps only the demo's
model and loop settings (see ``demo_config``)."""

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


# Overrides that name a run's own data: such a run is not the demo.
DATA_KEYS = ("data.sources", "data.prepared", "data.mixture")
# What belongs to the demo's corpus and budget, not to the tiny model: the data settings (a stdlib glob and a
# vocabulary sized for it), Python prompts, the demo's run folder and its 3.5-minute stop.
DEMO_ONLY_TRAIN = ("out_dir", "sample_prompts", "time_limit_minutes")
OWN_DATA_OUT_DIR = "runs/train"


def names_own_data(overrides: Sequence[str]) -> bool:
    return any(item.split("=", 1)[0].strip() in DATA_KEYS for item in overrides)


def demo_config(overrides: Sequence[str] = ()) -> Config:
    """The demo, or, when the overrides name their own data, the demo's model and loop settings only: such a
    run inherits no demo data setting, no time limit, no Python prompts and not the demo's run folder."""
    if not names_own_data(overrides):
        return config_from_dict(apply_overrides(DEMO, overrides))
    train = {k: v for k, v in DEMO["train"].items() if k not in DEMO_ONLY_TRAIN}
    base = {"model": dict(DEMO["model"]), "train": {**train, "out_dir": OWN_DATA_OUT_DIR}}
    return config_from_dict(apply_overrides(base, overrides))
