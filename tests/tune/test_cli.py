"""The finetune and prune verbs end to end through the CLI: what they print and what they leave behind."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.tune.prune import sparsity

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
    recovery = ["--recover", str(instructions(tmp_path)), "--recover-steps", "3"]
    assert main(["prune", str(base_checkpoint), str(out), "--sparsity", "0.5", *recovery]) == 0
    printed = capsys.readouterr().out
    recovered = printed.split("recovered model: ")[1].split()[0]
    weights = load_file(f"{recovered}/model.safetensors")
    pruned = load_file(out / "model.safetensors")
    for name, value in pruned.items():
        if name.endswith("proj.weight"):  # the pruned projections: every zero is still zero after training
            assert (weights[name][value == 0] == 0).all(), name
    assert any(not (weights[n] == pruned[n]).all() for n in pruned)  # and recovery did train


def test_the_prune_command_writes_a_smaller_sparse_checkpoint_with_its_report(
    base_checkpoint, tmp_path, capsys
):
    from lmforge.infer.evaluate import score_file
    from lmforge.infer.loading import load_for_inference

    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 40, encoding="utf-8")
    out = tmp_path / "pruned"
    amounts = ["--sparsity", "0.5", "--heads", "0.5", "--channels", "0.25"]
    evaluation = ["--eval-text", str(text), "--eval-tokens", "500"]
    assert main(["prune", str(base_checkpoint), str(out), *amounts, *evaluation]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["n_heads"] == 2 and report["ffn_hidden"] == 96  # 4 -> 2 heads, 128 -> 96 channels
    assert report["sparsity"] == 0.5 and report["zeros"] * 2 == report["total"]
    assert report["parameters_after"] < report["parameters_before"]
    assert f"perplexity {report['perplexity_before']:.3f} -> {report['perplexity_after']:.3f}" in printed
    loaded = load_for_inference(out, device=torch.device("cpu"))
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    assert sparsity(loaded.model)["sparsity"] == 0.5  # the zeros survive saving and loading
    reloaded = score_file(
        loaded.model, loaded.require_tokenizer(), text, device=torch.device("cpu"), max_tokens=500
    ).perplexity
    assert reloaded == pytest.approx(report["perplexity_after"], rel=1e-6)
    # bad requests: one line, exit code 2, nothing written
    assert main(["prune", str(base_checkpoint), str(tmp_path / "none")]) == 2
    assert "nothing to prune" in capsys.readouterr().err
    assert main(["prune", str(base_checkpoint), str(tmp_path / "none"), "--sparsity", "1.0"]) == 2
    assert "sparsity=1.0 must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
