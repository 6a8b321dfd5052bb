"""The finetune and prune verbs end to end through the CLI: what they print and what they leave behind."""

from __future__ import annotations

import json
import random

from safetensors.torch import load_file

from lmforge.cli import main

QUICK = ["train.micro_batch=8", "train.seq_len=64", "train.steps=4", "train.eval_every=4", "train.log_every=2",
         "train.sample_tokens=4", "train.eval_batches=1"]  # fmt: skip


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def instructions(tmp_path):
    rng = random.Random(0)
    words = ["red", "green", "blue", "cat", "dog", "sun"]
    records = []
    for _ in range(40):
        a, b = rng.choice(words), rng.choice(words)
        records.append({"prompt": f"join {a} and {b}\n", "response": f"{a}-{b}"})
    return write_jsonl(tmp_path / "sft.jsonl", records)


def test_finetune_sft_with_lora_prints_its_figures_and_saves_a_merged_model(
    base_checkpoint, tmp_path, capsys
):
    out = tmp_path / "sft"
    argv = ["finetune", str(base_checkpoint), str(instructions(tmp_path)), "--out", str(out)]
    assert main([*argv, "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--no-progress", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "training /" in printed and "validation examples" in printed and "final loss" in printed
    assert f"fine-tuned model: {out}" in printed
    model_dir = printed.split("fine-tuned model: ")[1].split()[0].rstrip(";")
    weights = load_file(f"{model_dir}/model.safetensors")
    assert weights and not any("lora" in name for name in weights)  # the adapters are merged into the weights
    base = load_file(base_checkpoint / "model.safetensors")
    assert weights.keys() == base.keys()


def test_finetune_classify_prints_accuracy_per_label(base_checkpoint, tmp_path, capsys):
    rng = random.Random(1)
    records = [
        {"text": f"{rng.choice(['good', 'great', 'fine'])} day {i}", "label": "pos"} for i in range(20)
    ]
    records += [
        {"text": f"{rng.choice(['bad', 'awful', 'grim'])} day {i}", "label": "neg"} for i in range(20)
    ]
    data = write_jsonl(tmp_path / "labelled.jsonl", records)
    out = tmp_path / "cls"
    argv = ["finetune", str(base_checkpoint), str(data), "--task", "classify", "--out", str(out)]
    assert main([*argv, "--test-fraction", "0.25", "--no-progress", *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "on 10 held-out examples" in printed and "neg " in printed and "pos " in printed
    assert "classifier: " in printed


def test_prune_then_recover_keeps_the_zeros(base_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = [
        "prune",
        str(base_checkpoint),
        str(out),
        "--sparsity",
        "0.5",
        "--recover",
        str(instructions(tmp_path)),
    ]
    assert main([*argv, "--recover-steps", "3"]) == 0
    printed = capsys.readouterr().out
    recovered = printed.split("recovered model: ")[1].split()[0]
    weights = load_file(f"{recovered}/model.safetensors")
    pruned = load_file(out / "model.safetensors")
    for name, value in pruned.items():
        if name.endswith("proj.weight"):  # the pruned projections: every zero is still zero after training
            assert (weights[name][value == 0] == 0).all(), name
    assert any(not (weights[n] == pruned[n]).all() for n in pruned)  # and recovery did train
