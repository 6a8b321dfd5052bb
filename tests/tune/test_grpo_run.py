"""GRPO as a run of the one training loop: the reward of a trivially learnable task rises, a run stopped
and resumed equals an uninterrupted one bit for bit, the rollout's batches are what the sampler drew."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.data.batch import IGNORE_INDEX
from lmforge.tune.grpo import PolicyLoss
from lmforge.tune.rl import tune_grpo
from lmforge.tune.rollout import RolloutConfig

QUICK = ["train.lr=3e-2", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=1000"]


def share_lower(completions, records, **info):
    """A reward a tiny random model can learn in a few steps: the share of lower-case letters in the answer
    (about 26 of the 96 characters a random model draws from)."""
    return [sum("a" <= c <= "z" for c in text) / max(1, len(text)) for text in completions]


def prompts(path, n=24):
    words = ["cat", "dog", "sun", "sky", "red", "map"]
    path.write_text(
        "".join(json.dumps({"prompt": f"say {words[i % 6]}", "answer": "a"}) + "\n" for i in range(n))
    )
    return path


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_the_reward_of_a_learnable_task_rises(variant, base_checkpoint, tmp_path):
    result = tune_grpo(
        base_checkpoint,
        prompts(tmp_path / "p.jsonl"),
        out_dir=tmp_path / "run",
        rewards=["tests.tune.test_grpo_run:share_lower"],
        rollout=RolloutConfig(group_size=8, prompts_per_step=2, max_new_tokens=4),
        loss=PolicyLoss(variant=variant),
        overrides=[*QUICK, "train.steps=12"],
        val_fraction=0.25,
        progress=False,
    )
    name = "reward_tests.tune.test_grpo_run:share_lower"
    before, after = result.val_before[name], result.val_after[name]
    logged = [r for r in metrics(result.run_dir) if "reward" in r]
    print(
        f"{variant}: greedy share of lower case {before:.3f} -> {after:.3f}; sampled {[round(r['reward'], 2) for r in logged]}"
    )
    # sampled: 64 characters a step, about 27% lower case by chance (std 0.06); 0.8 is 9 std above it
    assert logged[0]["reward"] < 0.5 and min(r["reward"] for r in logged[-3:]) > 0.8
    assert after > 0.9 and after > before
    assert {"kl", "clip_fraction", "entropy", "zero_variance_groups", "completion_length"} <= set(logged[0])
    lines = (result.run_dir / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 12 and json.loads(lines[-1])["generation"] == 11


def test_a_run_stopped_and_resumed_equals_an_uninterrupted_one(base_checkpoint, tmp_path):
    """Two optimizer steps per generation (iterations=2): the first attempt stops after step 1, between
    the two steps that use one generation, so the resumed run needs the saved buffer; dropout and the
    KL reference make the RNG and reference state matter too."""
    data = prompts(tmp_path / "p.jsonl")
    common = dict(
        rewards=["tests.tune.test_grpo_run:share_lower", "length=0.1"],
        rollout=RolloutConfig(group_size=4, prompts_per_step=2, max_new_tokens=5, iterations=2),
        loss=PolicyLoss(variant="grpo", beta=0.04),
        val_fraction=0.0,
        progress=False,
    )
    overrides = [*QUICK, "train.steps=5", "model.dropout=0.1"]
    whole = tune_grpo(base_checkpoint, data, out_dir=tmp_path / "whole", overrides=overrides, **common)
    tune_grpo(
        base_checkpoint, data, out_dir=tmp_path / "split", overrides=[*overrides, "train.time_limit_minutes=1e-9"], **common
    )  # fmt: skip
    rest = tune_grpo(
        base_checkpoint, data, out_dir=tmp_path / "split", overrides=overrides, resume="auto", **common
    )
    assert rest.final_loss == whole.final_loss  # bitwise
    a, b = load_file(whole.model_dir / "model.safetensors"), load_file(rest.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    split, uninterrupted = metrics(tmp_path / "split"), metrics(tmp_path / "whole")
    assert [r["step"] for r in split if "loss" in r][0] == 1  # the first attempt stopped after step 1
    pick = lambda rows: [(r["step"], r["loss"], r["reward"], r["kl"]) for r in rows if "loss" in r]  # noqa: E731
    assert pick(split) == pick(uninterrupted)
    assert (tmp_path / "split" / "completions.jsonl").read_text() == (
        tmp_path / "whole" / "completions.jsonl"
    ).read_text()


def test_rollout_rows_hold_the_prompt_then_the_completion_with_loss_on_the_completion(
    base_checkpoint, tmp_path
):
    from lmforge.infer.generate import generate_ids
    from lmforge.infer.loading import load_for_inference
    from lmforge.tune.rewards import parse_reward
    from lmforge.tune.rollout import RolloutLoader, call_seed, read_prompts

    loaded = load_for_inference(base_checkpoint, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    rows, _ = read_prompts(prompts(tmp_path / "p.jsonl", n=6), tokenizer, None, max_prompt_tokens=64)
    rollout = RolloutConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, iterations=2, temperature=0.7)
    loader = RolloutLoader(
        rows, rewards=[parse_reward("tests.tune.test_grpo_run:share_lower")], rollout=rollout,
        loss=PolicyLoss(variant="dr_grpo"), tokenizer=tokenizer, micro_batch=4, seed=3,
        vocab_size=tokenizer.vocab_size, tokenizer_path=None,
    )  # fmt: skip
    loader.bind(loaded.model, None)
    first, second = loader.next_batch(), loader.next_batch()
    # the first prompt's group: the same sampler call made by hand gives the same completions
    prompt = loader._prompt_at(0).ids
    sampled = generate_ids(
        loaded.model, [prompt] * 4 + [loader._prompt_at(1).ids] * 4, rollout.sampling(call_seed(3, 0, 0)),
        device=torch.device("cpu"), eos_id=tokenizer.eot_id, pad_id=tokenizer.eot_id,
    ).tokens[:4]  # fmt: skip
    for r, completion in enumerate(sampled):
        n = len(prompt) + len(completion)
        assert first.inputs[r, : len(prompt)].tolist() == prompt
        assert first.targets[r, : len(prompt) - 1].tolist() == [IGNORE_INDEX] * (len(prompt) - 1)
        assert first.targets[r, len(prompt) - 1 : n - 1].tolist() == completion
    texts = [tokenizer.decode(c) for c in sampled]
    rewards = torch.tensor(share_lower(texts, []), dtype=torch.float64)
    assert torch.allclose(first.advantages.double(), rewards - rewards.mean(), atol=1e-6)  # Dr. GRPO: no std
    assert first.ref_logps is None  # iterations=2 records the sampler's log-probs, at its temperature:
    with torch.no_grad():
        by_hand = (loaded.model(first.inputs) / 0.7).log_softmax(-1)  # (B, T, V)
    mask = first.targets != IGNORE_INDEX
    picked = by_hand.gather(-1, first.targets.clamp(min=0)[..., None])[..., 0]
    assert (
        torch.allclose(first.old_logps[mask], picked[mask], atol=1e-5) and (first.old_logps[~mask] == 0).all()
    )
    # two optimizer steps per generation: the buffer is drawn twice before the next generation
    assert torch.equal(loader.next_batch().inputs, first.inputs) and torch.equal(
        loader.next_batch().inputs, second.inputs
    )
    third = loader.next_batch()  # the second generation: the next prompts, sampled with the next round's seed
    assert loader.generations == 2 and not torch.equal(third.inputs, first.inputs)
    prompt = loader._prompt_at(2).ids
    again = generate_ids(
        loaded.model, [prompt] * 4 + [loader._prompt_at(3).ids] * 4, rollout.sampling(call_seed(3, 1, 0)),
        device=torch.device("cpu"), eos_id=tokenizer.eot_id, pad_id=tokenizer.eot_id,
    ).tokens[:4]  # fmt: skip
    for r, completion in enumerate(again):
        assert third.targets[r, len(prompt) - 1 : len(prompt) - 1 + len(completion)].tolist() == completion


def test_finetune_grpo_through_the_cli(base_checkpoint, tmp_path, capsys):
    from lmforge.cli import main

    data = prompts(tmp_path / "p.jsonl", n=12)
    args = ["finetune", str(base_checkpoint), str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*args, "--reward", "exact"]) == 2
    assert "--reward only applies to the RL tasks" in capsys.readouterr().err
    assert main([*args, "--task", "grpo", "--reward", "exakt"]) == 2
    assert "did you mean 'exact'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    code = main(
        [*args, "--task", "gspo", "--reward", "exact", "--reward", "length=0.5", "--group-size", "4",
         "--prompts-per-step", "2", "--max-new-tokens", "4", "--val-fraction", "0.2", "train.steps=2"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "gspo: 10 training / 2 held-out prompts, 0 skipped" in out
    assert "held-out mean reward (greedy) reward " in out and "reward_length" in out
    assert "planner: RL step peak " in out and "KV cache" in out
    logged = metrics(tmp_path / "run")
    assert [r["step"] for r in logged if "reward_exact" in r] == [
        2
    ]  # finetune logs every 10 steps and the last
    card = (tmp_path / "run" / "model" / "MODEL_CARD.md").read_text()
    assert "GSPO" in card


def test_with_lora_the_reference_is_the_base_with_adapters_off(base_checkpoint, tmp_path):
    """The KL reference of a LoRA run is the policy with its adapters switched off: equal to a frozen copy
    of the base (bit for bit) before training and after the adapters have moved; the run merges them."""
    import copy

    from lmforge.infer.loading import load_for_inference
    from lmforge.tune.grpo import token_logps
    from lmforge.tune.lora import LoRAConfig, apply_lora
    from lmforge.tune.rewards import parse_reward
    from lmforge.tune.rollout import Reference, RolloutLoader, read_prompts

    loaded = load_for_inference(base_checkpoint, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    frozen = copy.deepcopy(loaded.model).eval()
    policy = apply_lora(
        loaded.model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    )
    rows, _ = read_prompts(prompts(tmp_path / "p.jsonl", n=6), tokenizer, None, max_prompt_tokens=64)
    loader = RolloutLoader(
        rows, rewards=[parse_reward("tests.tune.test_grpo_run:share_lower")],
        rollout=RolloutConfig(group_size=4, prompts_per_step=1, max_new_tokens=6), loss=PolicyLoss(beta=0.1),
        tokenizer=tokenizer, micro_batch=4, seed=0, vocab_size=tokenizer.vocab_size, tokenizer_path=None,
    )  # fmt: skip
    loader.bind(policy, Reference(None))
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:  # move the adapters (B starts at zero): the policy now differs from the base
                p.add_(0.05 * torch.randn_like(p))
    batch = loader.next_batch()
    with torch.no_grad():
        assert torch.equal(batch.ref_logps, token_logps(frozen, batch.inputs, batch.targets)[0])
        moved = token_logps(policy, batch.inputs, batch.targets)[0]
    assert not torch.allclose(moved, batch.ref_logps)

    result = tune_grpo(
        base_checkpoint, prompts(tmp_path / "q.jsonl", n=8), out_dir=tmp_path / "run",
        rewards=["tests.tune.test_grpo_run:share_lower"], lora=LoRAConfig(rank=4, alpha=8.0),
        rollout=RolloutConfig(group_size=4, prompts_per_step=2, max_new_tokens=4), val_fraction=0.0,
        overrides=[*QUICK, "train.steps=2"], progress=False,
    )  # fmt: skip
    assert result.reference == "LoRA adapters off"
    merged = load_file(result.model_dir / "model.safetensors")
    assert not any("lora" in k for k in merged)


def test_a_run_that_died_after_its_last_checkpoint_resumes_like_an_uninterrupted_one(
    base_checkpoint, tmp_path
):
    """The process dies after step 3 was sampled and trained but before its checkpoint: the resumed run
    samples generation 2 again from the step-2 checkpoint, and its completions log holds it once."""
    import shutil

    data = prompts(tmp_path / "p.jsonl")
    common = dict(
        rewards=["tests.tune.test_grpo_run:share_lower"],
        rollout=RolloutConfig(group_size=4, prompts_per_step=2, max_new_tokens=5),
        loss=PolicyLoss(variant="dapo"),
        val_fraction=0.0,
        progress=False,
        overrides=[*QUICK, "train.steps=3", "train.ckpt_every=2"],
    )
    whole = tune_grpo(base_checkpoint, data, out_dir=tmp_path / "whole", **common)
    shutil.copytree(tmp_path / "whole", tmp_path / "died")
    shutil.rmtree(tmp_path / "died" / "checkpoints" / "step_00000003")  # the checkpoint it never wrote
    shutil.rmtree(tmp_path / "died" / "model")
    rest = tune_grpo(base_checkpoint, data, out_dir=tmp_path / "died", resume="auto", **common)
    assert rest.final_loss == whole.final_loss
    log = (tmp_path / "died" / "completions.jsonl").read_text()
    assert log == (tmp_path / "whole" / "completions.jsonl").read_text()
    assert [json.loads(line)["generation"] for line in log.splitlines()] == [0] * 4 + [1] * 4 + [2] * 4
