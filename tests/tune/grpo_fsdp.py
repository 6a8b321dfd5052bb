"""Run under ``torchrun --nproc-per-node 2`` (or as one process): ``tune_grpo`` on the prompts and seeds of
``test_grpo_fsdp``. Arguments: BASE DATA OUT STRATEGY."""

from __future__ import annotations

import sys

from lmforge.tune.grpo import PolicyLoss
from lmforge.tune.rl import tune_grpo
from lmforge.tune.rollout import RolloutConfig

ROLLOUT = RolloutConfig(group_size=4, prompts_per_step=4, max_new_tokens=5, generation_batch=2, iterations=2)
OVERRIDES = [
    "train.steps=4",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.ckpt_every=1000",
]


def run(base: str, data: str, out: str, strategy: str):
    return tune_grpo(
        base, data, out_dir=out, rewards=["tests.tune.test_grpo_run:share_lower", "length=0.1"], rollout=ROLLOUT,
        loss=PolicyLoss(variant="grpo"), overrides=[*OVERRIDES, f"parallel.strategy={strategy}"],
        val_fraction=0.0, progress=False,
    )  # fmt: skip


if __name__ == "__main__":
    run(*sys.argv[1:5])
