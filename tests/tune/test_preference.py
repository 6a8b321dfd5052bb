"""Preference data, the SimPO/ORPO losses against a hand computation, the reference modes, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.cli import main
from lmforge.data.batch import IGNORE_INDEX
from lmforge.errors import DataError
from lmforge.infer.loading import load_for_inference
from lmforge.tune.lora import LoRAConfig, LoRALinear, apply_lora
from lmforge.tune.pairs import collate_pairs, load_pairs, tokenize_pairs
from lmforge.tune.preference import DPO, ORPO, LiveReference, SimPO, cache_reference

CPU = torch.device("cpu")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_and_message_records_put_the_loss_on_the_last_answer_only(base_checkpoint, tmp_path):
    tokenizer = load_for_inference(base_checkpoint, device=CPU).require_tokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "say ab:", "chosen": "AB", "rejected": "ab"},
            {
                "chosen": chat
                + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "YES"}],
                "rejected": chat
                + [{"role": "user", "content": "again"}, {"role": "assistant", "content": "no"}],
            },
        ],
    )
    rows, skipped = tokenize_pairs(load_pairs(data), tokenizer, seq_len=128)
    assert not skipped and len(rows) == 2
    inputs, targets = rows[0].chosen
    prompt = tokenizer.encode("say ab:")
    assert inputs == prompt + tokenizer.encode("AB")  # ids[:-1] of prompt + answer + end-of-text
    assert targets == [IGNORE_INDEX] * (len(prompt) - 1) + tokenizer.encode("AB") + [tokenizer.eot_id]
    for side, answer in ((rows[1].chosen, "YES"), (rows[1].rejected, "no")):
        trained = [t for t in side[1] if t != IGNORE_INDEX]  # "hello" (an earlier turn) takes no loss
        assert tokenizer.decode(trained[:-1]).strip() == answer and trained[-1] == tokenizer.eot_id

    batch = collate_pairs(rows, pad_id=0)
    assert batch.inputs.shape[0] == 4 and batch.reference_logps is None  # chosen, chosen, rejected, rejected
    assert torch.equal(batch.inputs[1, : len(rows[1].chosen[0])], torch.tensor(rows[1].chosen[0]))
    assert torch.equal(batch.inputs[3, : len(rows[1].rejected[0])], torch.tensor(rows[1].rejected[0]))


def test_unusable_pairs_are_skipped_with_file_and_line(base_checkpoint, tmp_path):
    tokenizer = load_for_inference(base_checkpoint, device=CPU).require_tokenizer()
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q:", "chosen": "A", "rejected": "a"},
            {"prompt": "q:", "chosen": "same", "rejected": "same"},
            {"prompt": "q:", "chosen": " ", "rejected": "a"},
            {"prompt": "q:", "chosen": "A" * 100, "rejected": "a"},
        ],
    )
    rows, skipped = tokenize_pairs(load_pairs(data), tokenizer, seq_len=64)
    assert len(rows) == 1
    assert skipped == [
        f"{data}:2: chosen and rejected are identical",
        f"{data}:3: empty chosen answer",
        f"{data}:4: 102 tokens, more than train.seq_len=64",  # 2 + 100 + end-of-text, less the last
    ]


def test_data_without_pairs_names_the_fields_it_found(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}])
    with pytest.raises(DataError, match=r"sft.jsonl:1: not a preference pair.*found: prompt, response"):
        load_pairs(data)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "A", "rejected": "a"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*need a 'prompt' string"):
        load_pairs(bad)


def fixed_batch(base_checkpoint, tmp_path):
    loaded = load_for_inference(base_checkpoint, device=CPU)
    records = [
        {"prompt": "say abc:", "chosen": "ABC", "rejected": "abc"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "three"},
    ]
    rows, _ = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", records)), loaded.tokenizer, 64)
    return loaded, records, rows


def hand_logps(model, tokenizer, prompt: str, answer: str) -> tuple[float, int]:
    """Summed log-prob of answer + end-of-text after the prompt, and the token count, from plain logits."""
    prompt_ids = tokenizer.encode(prompt)
    ids = prompt_ids + tokenizer.encode(answer) + [tokenizer.eot_id]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)  # (T, V)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))), len(ids) - len(
        prompt_ids
    )


def test_simpo_and_orpo_losses_equal_a_hand_computation(base_checkpoint, tmp_path):
    loaded, records, rows = fixed_batch(base_checkpoint, tmp_path)
    batch = collate_pairs(rows, pad_id=0)
    beta, gamma, lam = 2.0, 0.5, 0.1
    simpo, orpo = 0.0, 0.0
    for r in records:
        (c, nc), (j, nj) = (
            hand_logps(loaded.model, loaded.tokenizer, r["prompt"], r[s]) for s in ("chosen", "rejected")
        )
        mc, mj = c / nc, j / nj
        simpo += -math.log(1 / (1 + math.exp(-(beta * (mc - mj) - gamma))))
        log_odds = (mc - math.log(1 - math.exp(mc))) - (mj - math.log(1 - math.exp(mj)))
        orpo += -mc - lam * math.log(1 / (1 + math.exp(-log_odds)))
    with torch.no_grad():
        ours_simpo = SimPO(beta=beta, gamma=gamma).loss(loaded.model, batch).item()
        ours_orpo = ORPO(lam=lam).loss(loaded.model, batch).item()
    assert SimPO().units(batch) == 2
    assert abs(ours_simpo - simpo) < 1e-5, (ours_simpo, simpo)
    assert abs(ours_orpo - orpo) < 1e-5, (ours_orpo, orpo)


def test_the_three_reference_modes_give_the_same_dpo_loss(base_checkpoint, tmp_path):
    """Cached log-probs of the base, a frozen copy of it, and the LoRA model with its adapters switched off."""
    loaded, _, rows = fixed_batch(base_checkpoint, tmp_path)
    cached = cache_reference(loaded.model, rows, pad_id=0, device=CPU, precision="fp32", batch_size=1)
    base_copy = load_for_inference(base_checkpoint, device=CPU).model
    policy = apply_lora(loaded.model, LoRAConfig(rank=2, targets=("q_proj", "v_proj", "down_proj")))
    torch.manual_seed(0)
    for m in policy.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)  # the policy now differs from the base
    frozen = LiveReference()
    frozen.copy = base_copy
    with torch.no_grad():
        from_cache = DPO(beta=0.5).terms(policy, collate_pairs(cached, pad_id=0))
        from_copy = DPO(beta=0.5, live=frozen).terms(policy, collate_pairs(rows, pad_id=0))
        adapters_off = DPO(beta=0.5, live=LiveReference()).terms(policy, collate_pairs(rows, pad_id=0))
    assert from_cache.chosen_rewards.abs().max() > 1e-3  # the policy moved away from the reference
    for other in (from_copy, adapters_off):
        torch.testing.assert_close(other.losses, from_cache.losses, atol=1e-6, rtol=0)
        torch.testing.assert_close(other.chosen_rewards, from_cache.chosen_rewards, atol=1e-6, rtol=0)
    scaling = LoRAConfig(rank=2).scaling
    assert all(m.scaling == scaling for m in policy.modules() if isinstance(m, LoRALinear))  # restored


def test_finetune_dpo_through_the_cli_logs_rewards_and_reports_skipped_pairs(
    base_checkpoint, tmp_path, capsys
):
    records = [
        {"prompt": f"say {w}:", "chosen": w.upper(), "rejected": w} for w in ("ab", "cd", "ef", "gh") * 4
    ]
    records.append({"prompt": "say x:", "chosen": "x", "rejected": "x"})
    data = write_jsonl(tmp_path / "prefs.jsonl", records)
    quick = [
        "train.micro_batch=4",
        "train.seq_len=32",
        "train.steps=4",
        "train.eval_every=4",
        "train.log_every=2",
    ]
    argv = [
        "finetune",
        str(base_checkpoint),
        str(data),
        *quick,
        "--task",
        "dpo",
        "--out",
        str(tmp_path / "run"),
    ]
    assert (
        main([*argv, "--beta", "0.2", "--label-smoothing", "0.1", "--val-fraction", "0.25", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "dpo: 12 training / 4 held-out pairs, 1 skipped; reference: cached" in out
    assert f"skipped {data}:17: chosen and rejected are identical" in out
    assert "held-out reward accuracy 0.000 ->" in out
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert all(
        {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin"} <= set(r) for r in steps
    )
    assert "val_reward_accuracy" in [r for r in logged if "val_loss" in r][-1]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}])
    argv = ["finetune", str(base_checkpoint), str(sft), "--task", "simpo", "--out", str(tmp_path / "run2")]
    assert main(argv) == 2
    assert f"{sft}:1: not a preference pair" in capsys.readouterr().err
