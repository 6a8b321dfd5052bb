"""Classification: the pooled head learns a separable task through the training loop; bad labels are named."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.errors import DataError
from lmforge.model.transformer import SequenceClassifier
from lmforge.tune.classify import finetune_classifier, load_classifier, load_labelled, to_batch
from tests.infer.conftest import tiny_model

FAST = ["train.micro_batch=16", "train.seq_len=64", "train.eval_every=40", "train.log_every=10"]


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sentiment(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    fillers = ["the film", "this movie", "the plot", "acting", "the ending", "music"]
    out = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(
            ["great", "lovely", "superb"] if label == "pos" else ["awful", "boring", "dreadful"]
        )
        out.append({"text": f"{rng.choice(fillers)} was {word}, {rng.randint(0, 99)}", "label": label})
    return out


def test_pool_uses_the_last_real_token():
    model = SequenceClassifier(tiny_model(), 3)
    batch = to_batch([([5, 6, 7], 2), ([5, 6, 7, 8, 9], 0)], pad_id=256)
    assert batch.inputs.tolist() == [[5, 6, 7, 256, 256], [5, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.targets.tolist() == [2, 0]
    alone = model(batch.inputs[:1, :3])  # the same text without padding
    padded = model(batch.inputs, attention_mask=batch.attention_mask)[:1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(batch.inputs)[:1], alone, rtol=1e-5, atol=1e-5)  # the mask matters


def test_classifier_learns_and_reports_held_out_accuracy(base_checkpoint, tmp_path):
    train = write(tmp_path / "train.jsonl", sentiment(160, 0))
    test = write(tmp_path / "test.jsonl", sentiment(40, 1))
    result = finetune_classifier(
        base_checkpoint,
        train,
        test_path=test,
        out_dir=tmp_path / "run",
        overrides=FAST + ["train.steps=40", "train.lr=3e-3", "train.warmup_steps=4"],
        progress=False,
    )
    assert result.labels == ["neg", "pos"] and result.test_examples == 40
    assert result.accuracy >= 0.9, result
    model, labels, pad_id = load_classifier(result.model_dir)
    assert labels == ["neg", "pos"] and isinstance(model, SequenceClassifier)


def test_label_sets_must_agree_and_nothing_is_written(base_checkpoint, tmp_path):
    train = write(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    test = write(tmp_path / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=r"label sets of train and test differ: .*test.jsonl has \['z'\]"):
        finetune_classifier(base_checkpoint, train, test_path=test, out_dir=tmp_path / "run", overrides=FAST)
    assert not (tmp_path / "run").exists()
    bad = write(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"txt": "b", "label": "y"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        load_labelled(bad)


def test_stratified_split_holds_out_each_labels_share_and_nothing_twice():
    from lmforge.tune.classify import stratified_split

    data = (
        [(f"pos {i}", "pos") for i in range(20)]
        + [(f"neg {i}", "neg") for i in range(10)]
        + [
            ("odd a", "odd"),
            ("odd b", "odd"),
        ]
    )
    train, test = stratified_split(data, 0.2, seed=3)
    assert sorted(train + test) == sorted(data)  # every example exactly once
    held = {label: sum(1 for _, lab in test if lab == label) for label in ("pos", "neg", "odd")}
    assert held == {"pos": 4, "neg": 2, "odd": 1}  # 20% of each label, at least one, never all
    assert {lab for _, lab in train} == {"pos", "neg", "odd"}
    assert stratified_split(data, 0.2, seed=3) == (train, test)  # the seed decides
    assert stratified_split(data, 0.2, seed=4) != (train, test)
    with pytest.raises(DataError, match="label 'lonely' has a single example"):
        stratified_split([*data, ("alone", "lonely")], 0.2, seed=3)
