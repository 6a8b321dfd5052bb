"""Preference data, the SimPO/ORPO losses against a hand computation, the reference modes, and the CLI."""

from __future__ import annotations

import copy
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
from lmforge.tune.preference import (
    DPO,
    ORPO,
    LiveReference,
    PreferenceConfig,
    SimPO,
    cache_reference,
    log1m_exp,
    score_pairs,
)

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


# -- held-out figures, the configuration's objectives, log(1 - exp(x)), the live reference of a run ------------

PAIRS3 = [("say abc:", "ABC", "abc"), ("1+1=", "2", "three"), ("name:", "Bo", "Al")]


def test_held_out_figures_and_configured_objectives_equal_a_hand_computation(base_checkpoint, tmp_path):
    """score_pairs gives the means per pair (3 pairs in batches of 2 and 1) of DPO's loss and reward figures;
    the objectives PreferenceConfig builds use its beta, label smoothing, and SimPO's defaults (beta 2,
    gamma 0.5); a model scored against itself has zero rewards, ties that are no correct preference."""
    loaded = load_for_inference(base_checkpoint, device=CPU)
    base, tok = loaded.model, loaded.tokenizer
    records = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS3]
    rows, _ = tokenize_pairs(load_pairs(write_jsonl(tmp_path / "p.jsonl", records)), tok, 64)
    cached = cache_reference(base, rows, pad_id=0, device=CPU, precision="fp32", batch_size=2)
    policy = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    beta, eps = 0.3, 0.2
    hand = {
        k: [] for k in ("loss", "smoothed", "simpo", "reward_chosen", "reward_rejected", "reward_accuracy")
    }
    for r in records:
        (pc, nc), (pj, nj) = (hand_logps(policy, tok, r["prompt"], r[s]) for s in ("chosen", "rejected"))
        (bc, _), (bj, _) = (hand_logps(base, tok, r["prompt"], r[s]) for s in ("chosen", "rejected"))
        wc, wj = beta * (pc - bc), beta * (pj - bj)
        d = wc - wj
        hand["loss"].append(-math.log(1 / (1 + math.exp(-d))))
        hand["smoothed"].append(
            -(1 - eps) * math.log(1 / (1 + math.exp(-d))) - eps * math.log(1 / (1 + math.exp(d)))
        )
        hand["simpo"].append(-math.log(1 / (1 + math.exp(-(2.0 * (pc / nc - pj / nj) - 0.5)))))
        hand["reward_chosen"].append(wc)
        hand["reward_rejected"].append(wj)
        hand["reward_accuracy"].append(float(wc > wj))
    mean = {k: sum(v) / 3 for k, v in hand.items()}
    got = score_pairs(policy, DPO(beta=beta), cached, pad_id=0, device=CPU, batch_size=2)
    expected = {k: mean[k] for k in ("loss", "reward_chosen", "reward_rejected", "reward_accuracy")}
    expected["reward_margin"] = mean["reward_chosen"] - mean["reward_rejected"]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    configured = PreferenceConfig(beta=beta, label_smoothing=eps).objective()
    assert score_pairs(policy, configured, cached, pad_id=0, device=CPU)["loss"] == pytest.approx(
        mean["smoothed"], rel=1e-4
    )
    simpo = PreferenceConfig(method="simpo").objective()
    assert score_pairs(policy, simpo, rows, pad_id=0, device=CPU)["loss"] == pytest.approx(
        mean["simpo"], rel=1e-4
    )
    itself = score_pairs(base, DPO(beta=beta), cached, pad_id=0, device=CPU, batch_size=2)
    assert itself["reward_chosen"] == 0.0 and itself["reward_margin"] == 0.0
    assert itself["reward_accuracy"] == 0.0 and itself["loss"] == pytest.approx(math.log(2))


def test_label_smoothing_must_leave_a_preference():
    assert PreferenceConfig(label_smoothing=0.49).problems() == []
    (problem,) = PreferenceConfig(label_smoothing=0.5).problems()
    assert problem.startswith("label_smoothing=0.5 must be in [0, 0.5)")


def test_log1m_exp_is_accurate_in_float32_on_both_sides_of_minus_log_2():
    xs = [-1e-7, -1e-4, -0.3, -0.69, -0.7, -2.0, -20.0, -40.0]
    got = log1m_exp(torch.tensor(xs, dtype=torch.float32))
    for x, value in zip(xs, got.tolist()):
        expected = math.log(-math.expm1(x))  # in double
        assert value == pytest.approx(expected, rel=1e-5), x


def test_a_live_reference_run_trains_the_model_a_cached_one_trains(base_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from lmforge.tune.preference import tune_preferences

    words = ("ab", "cd", "ef", "gh") * 2
    data = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": f"say {w}:", "chosen": w.upper(), "rejected": w} for w in words]
    )
    overrides = ["train.micro_batch=4", "train.seq_len=32", "train.steps=2", "train.lr=1e-3", "train.warmup_steps=0",
                 "train.eval_every=1000", "train.ckpt_every=1000", "train.log_every=1"]  # fmt: skip
    results = {
        mode: tune_preferences(
            base_checkpoint,
            data,
            out_dir=tmp_path / mode,
            preference=PreferenceConfig(reference=mode),
            overrides=overrides,
            val_fraction=0.25,
            progress=False,
        )
        for mode in ("cached", "live")
    }
    assert results["cached"].reference == "cached" and results["live"].reference == "live: frozen copy"
    cached, live = (load_file(results[m].model_dir / "model.safetensors") for m in ("cached", "live"))
    base = load_file(base_checkpoint / "model.safetensors")
    assert max((cached[k] - base[k]).abs().max().item() for k in base) > 1e-4  # training moved the weights
    for k in cached:
        torch.testing.assert_close(live[k], cached[k], atol=1e-5, rtol=0)
    assert results["live"].val_after == pytest.approx(results["cached"].val_after, rel=1e-4, abs=1e-6)
