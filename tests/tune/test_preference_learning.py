"""Preference tuning learns a property the chosen answers have (upper case) on generated pairs, and a DPO
run stopped and resumed ends where an uninterrupted one ends."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmforge.infer.generate import SamplingConfig, generate
from lmforge.infer.loading import load_for_inference
from lmforge.tune.preference import PreferenceConfig, tune_preferences

CPU = torch.device("cpu")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUICK = ["train.micro_batch=8", "train.seq_len=32", "train.warmup_steps=2", "train.lr=1e-3", "train.log_every=10",
         "train.eval_every=1000", "train.ckpt_every=1000", "train.eval_batches=2"]  # fmt: skip


def word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))


def uppercase_pairs(path, n: int = 200):
    """The chosen answer repeats the prompt's word in upper case; the rejected one in lower case."""
    rng = random.Random(0)
    records = [
        {"prompt": f"say {w}:", "chosen": w.upper(), "rejected": w} for w in (word(rng) for _ in range(n))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def uppercase_rate(model_dir) -> float:
    """The fraction of greedy answers to unseen prompts whose letters are all upper case."""
    rng = random.Random(1)
    prompts = [f"say {word(rng)}:" for _ in range(40)]
    loaded = load_for_inference(model_dir, device=CPU)
    out = generate(
        loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=6, temperature=0), device=CPU
    )
    letters = [[c for c in g.text if c.isalpha()] for g in out]
    return sum(bool(ls) and all(c.isupper() for c in ls) for ls in letters) / len(prompts)


@pytest.mark.parametrize("method", ["dpo", "simpo", "orpo"])
def test_tuning_learns_the_property_of_the_chosen_answers(method, base_checkpoint, tmp_path):
    result = tune_preferences(
        base_checkpoint,
        uppercase_pairs(tmp_path / "pairs.jsonl"),
        out_dir=tmp_path / "run",
        preference=PreferenceConfig(method=method),
        overrides=[*QUICK, "train.steps=40"],
        val_fraction=0.2,
        progress=False,
    )
    before, after = result.val_before["reward_accuracy"], result.val_after["reward_accuracy"]
    rates = uppercase_rate(base_checkpoint), uppercase_rate(result.model_dir)
    print(
        f"{method}: held-out reward accuracy {before:.3f} -> {after:.3f}; upper-case greedy answers {rates}"
    )
    assert result.val_pairs == 40 and after > 0.9 and after > before
    if method != "orpo":  # ORPO's SFT term needs more than 40 steps to move greedy answers off end-of-text
        assert rates[1] > rates[0]


def test_a_dpo_run_stopped_and_resumed_equals_an_uninterrupted_one(base_checkpoint, tmp_path):
    data = uppercase_pairs(tmp_path / "pairs.jsonl", n=48)
    common = dict(
        preference=PreferenceConfig(method="dpo", label_smoothing=0.1), val_fraction=0.2, progress=False
    )
    overrides = [*QUICK, "train.steps=6", "model.dropout=0.1"]  # dropout: the RNG stream must resume too
    whole = tune_preferences(base_checkpoint, data, out_dir=tmp_path / "whole", overrides=overrides, **common)
    first = tune_preferences(
        base_checkpoint, data, out_dir=tmp_path / "split", overrides=[*overrides, "train.time_limit_minutes=1e-9"],
        **common,
    )  # fmt: skip
    assert first.final_loss is not None
    rest = tune_preferences(
        base_checkpoint, data, out_dir=tmp_path / "split", overrides=overrides, resume="auto", **common
    )
    assert rest.final_loss == whole.final_loss  # bitwise
    a, b = load_file(whole.model_dir / "model.safetensors"), load_file(rest.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][0] == 1  # the first attempt stopped after step 1
