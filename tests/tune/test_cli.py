"""The finetune and prune verbs end to end through the CLI: what they print and what they leave behind."""

from __future__ import annotations

import json
import random
import re

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


def logged_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_finetune_sft_with_lora_trains_only_its_targets_and_saves_a_merged_model(
    base_checkpoint, tmp_path, capsys
):
    out = tmp_path / "sft"
    argv = ["finetune", str(base_checkpoint), str(instructions(tmp_path)), "--out", str(out)]
    learn = [
        "train.steps=16",
        "train.lr=1e-2",
        "train.warmup_steps=2",
        "train.eval_every=16",
        "train.log_every=1",
    ]
    lora = ["--lora-rank", "4", "--lora-targets", "q_proj,v_proj"]
    assert main([*argv, *lora, "--no-progress", *QUICK, *learn]) == 0
    printed = capsys.readouterr().out
    assert "training /" in printed and "validation examples" in printed and "final loss" in printed
    assert f"fine-tuned model: {out}" in printed
    model_dir = printed.split("fine-tuned model: ")[1].split()[0].rstrip(";")
    weights = load_file(f"{model_dir}/model.safetensors")
    base = load_file(base_checkpoint / "model.safetensors")
    assert weights.keys() == base.keys()  # the adapters are merged into the plain model's weights
    targeted = {n for n in base if n.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight"))}
    assert len(targeted) == 4  # 2 layers x (q, v)
    for name in base:
        if name in targeted:  # the merged update B A is there, in every targeted projection
            assert (weights[name] - base[name]).abs().max() > 1e-4, f"{name} unchanged"
        else:  # and nowhere else: LoRA freezes the rest
            assert torch.equal(weights[name], base[name]), f"{name} changed but is not a LoRA target"
    losses = logged_losses(out)
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.1, losses  # it learnt (a run that did not: ~0.02)


def test_finetune_classify_learns_a_separable_task(base_checkpoint, tmp_path, capsys):
    """Positive and negative words: a learnable task, scored on a separate test file, by the CLI and again here
    from the saved classifier."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.tune.classify import load_classifier

    def labelled(seed: int, n: int) -> list[dict]:
        rng = random.Random(seed)
        pos = [{"text": f"{rng.choice(['good', 'great', 'fine'])} day {i}", "label": "pos"} for i in range(n)]
        neg = [{"text": f"{rng.choice(['bad', 'awful', 'grim'])} day {i}", "label": "neg"} for i in range(n)]
        return pos + neg

    data = write_jsonl(tmp_path / "labelled.jsonl", labelled(1, 20))
    test = labelled(2, 10)
    out = tmp_path / "cls"
    argv = ["finetune", str(base_checkpoint), str(data), "--task", "classify", "--out", str(out)]
    learn = ["train.steps=12", "train.lr=3e-3", "train.warmup_steps=2", "train.eval_every=12"]
    test_file = write_jsonl(tmp_path / "test.jsonl", test)
    assert main([*argv, "--test", str(test_file), "--no-progress", *QUICK, *learn]) == 0
    printed = capsys.readouterr().out
    found = re.search(
        r"accuracy ([0-9.]+) on (\d+) held-out examples \(neg ([0-9.]+), pos ([0-9.]+)\)", printed
    )
    assert found, printed
    accuracy, n, neg, pos = float(found[1]), int(found[2]), float(found[3]), float(found[4])
    assert n == 20 and accuracy >= 0.9 and min(neg, pos) >= 0.8  # chance is 0.5
    model_dir = printed.split("classifier: ")[1].split()[0]
    classifier, labels, _ = load_classifier(model_dir)
    tokenizer = load_tokenizer(f"{model_dir}/tokenizer.json")
    with torch.no_grad():
        predicted = [
            labels[classifier(torch.tensor([tokenizer.encode(r["text"])]))[0].argmax().item()] for r in test
        ]
    hits = sum(p == r["label"] for p, r in zip(predicted, test))
    assert hits / len(test) == pytest.approx(accuracy)  # the printed figure is the saved model's


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


@pytest.mark.parametrize("task", ["dpo", "simpo", "orpo", "sft"])
def test_test_file_options_are_refused_outside_classify(tmp_path, capsys, task):
    # `--task dpo --test FILE` used to be accepted and ignored: the user believed the pairs were scored.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    out = tmp_path / "out"
    argv = ["finetune", str(tmp_path / "no-base"), str(pairs), "--out", str(out), "--task", task]
    assert main([*argv, "--test", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"lmforge finetune: error: --test only applies to --task classify; --task {task} holds out "
        "--val-fraction of DATA (now 0.05) instead\n"
    )
    assert main([*argv, "--test", str(pairs), "--test-fraction", "0.2", "--val-fraction", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--test and --test-fraction only apply to --task classify" in err and "(now 0.1)" in err
    assert not out.exists()
