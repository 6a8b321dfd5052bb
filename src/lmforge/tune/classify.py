"""Classification fine-tuning: labelled JSONL (``text``, ``label``) -> the model with a last-token ``pool``
head (``SequenceClassifier``), trained by the same loop as pre-training, scored by held-out accuracy.

Shape legend: B batch, T tokens, K classes.

The loop takes this module's ``Classification`` objective and a ``RowLoader`` of (ids, label) rows; batches
carry right-padded ids, their attention mask (the pool reads the last real token) and (B,) class indices.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.config import Config
from lmforge.data.batch import Batch
from lmforge.errors import DataError
from lmforge.files import jsonl_records
from lmforge.model.transformer import SequenceClassifier, Transformer, build_model
from lmforge.tune.rows import RowLoader
from lmforge.tune.sft import finetune_config

LABELS_FILE = "labels.json"


def load_labelled(
    path: str | Path, *, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs of a JSONL file; a line without the fields is reported as file:line."""
    out = []
    for obj, where in jsonl_records(path, "labelled data file"):
        missing = [k for k in (text_field, label_field) if k not in obj]
        if missing:
            raise DataError(
                f"{where}: no field {', '.join(repr(m) for m in missing)} (found: {', '.join(sorted(obj))})"
            )
        text, label = obj[text_field], obj[label_field]
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: {text_field!r} must be a non-empty string")
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise DataError(f"{where}: {label_field!r} must be a string or an integer, got {label!r}")
        out.append((text, str(label)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def check_label_sets(
    train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]], train_name: str, test_name: str
) -> list[str]:
    """The sorted label set, after checking that train and test have the same one."""
    train_labels, test_labels = {lab for _, lab in train}, {lab for _, lab in test}
    if len(train_labels) < 2:
        raise DataError(f"{train_name}: needs at least two labels, found {sorted(train_labels)}")
    if train_labels != test_labels:
        parts = []
        if test_labels - train_labels:
            parts.append(
                f"{test_name} has {sorted(test_labels - train_labels)} that {train_name} never shows"
            )
        if train_labels - test_labels:
            parts.append(
                f"{train_name} has {sorted(train_labels - test_labels)} that {test_name} never tests"
            )
        raise DataError("the label sets of train and test differ: " + "; ".join(parts))
    return sorted(train_labels)


def stratified_split(data: Sequence[tuple[str, str]], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of every label's examples (at least one each)."""
    by_label: dict[str, list] = {}
    for item in data:
        by_label.setdefault(item[1], []).append(item)
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        if len(items) < 2:
            raise DataError(f"label {label!r} has a single example: it cannot be both trained and tested")
        n_test = min(max(1, round(len(items) * fraction)), len(items) - 1)
        test += items[:n_test]
        train += items[n_test:]
    rng.shuffle(train)
    return train, test


def encode_rows(
    data: Sequence[tuple[str, str]], tokenizer, labels: list[str], seq_len: int, pad_id: int
) -> list[tuple[list[int], int]]:
    index = {lab: i for i, lab in enumerate(labels)}
    return [(tokenizer.encode(text)[:seq_len] or [pad_id], index[label]) for text, label in data]


def to_batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> Batch:
    """Right-padded ids with their attention mask, and one class index per row."""
    width = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        inputs[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
    targets = torch.tensor([label for _, label in rows], dtype=torch.long)  # (B,)
    return Batch(inputs, targets, attention_mask=mask)


class Classification:
    """The training objective: cross-entropy of the pooled head's class logits, one unit per text."""

    def units(self, batch: Batch) -> int:
        return int(batch.targets.numel())

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch.inputs, attention_mask=batch.attention_mask)  # (B, K)
        return F.cross_entropy(logits.float(), batch.targets, reduction="sum")


@torch.no_grad()
def predict(
    model: SequenceClassifier,
    rows: Sequence[tuple[list[int], int]],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 32,
) -> list[int]:
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = to_batch(rows[i : i + batch_size], pad_id).to(device)
        out += model(batch.inputs, attention_mask=batch.attention_mask).argmax(dim=-1).tolist()
    return out


@dataclass
class ClassifyResult:
    run_dir: Path
    model_dir: Path
    labels: list[str]
    accuracy: float
    test_examples: int
    train_examples: int
    per_label: dict[str, float]


def finetune_classifier(
    base: str | Path,
    train_path: str | Path,
    *,
    out_dir: str | Path,
    test_path: str | Path | None = None,
    test_fraction: float = 0.1,
    overrides: Sequence[str] = (),
    resume: str | None = None,
    progress: bool | None = None,
) -> ClassifyResult:
    """Train a classifier on ``train_path`` and report accuracy on ``test_path`` (or a stratified held-out
    ``test_fraction`` of the training file). Every input is checked before anything is written."""
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.loop import train
    from lmforge.train.run import Task

    loaded = load_for_inference(base, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    cfg = finetune_config(loaded.config, out_dir, overrides)
    data = load_labelled(train_path)
    if test_path is not None:
        train_data, test_data = data, load_labelled(test_path)
        labels = check_label_sets(train_data, test_data, str(train_path), str(test_path))
    else:
        train_data, test_data = stratified_split(data, test_fraction, cfg.train.seed)
        labels = check_label_sets(train_data, test_data, "the training split", "the held-out split")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
    train_rows = encode_rows(train_data, tokenizer, labels, cfg.train.seq_len, pad_id)
    test_rows = encode_rows(test_data, tokenizer, labels, cfg.train.seq_len, pad_id)
    loader = RowLoader(
        train_rows,
        collate=partial(to_batch, pad_id=pad_id),
        batch_size=cfg.train.micro_batch,
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
        tokenizer_path=None,  # the classifier writes no text samples
        what="classification data",
    )
    base_state = dict(loaded.model.state_dict())

    def adapt(model: Transformer) -> SequenceClassifier:
        model.load_state_dict(base_state, strict=False)
        return SequenceClassifier(model, len(labels)).to(next(model.parameters()).device)

    def val_batches():
        mb = cfg.train.micro_batch
        for i in range(0, len(test_rows), mb):
            yield to_batch(test_rows[i : i + mb], pad_id)

    task = Task(loader=loader, val_batches=val_batches, objective=Classification(), adapt_model=adapt)
    result = train(cfg, resume=resume, task=task, progress=progress)
    classifier = load_classifier_weights(result.checkpoint, cfg, len(labels))
    predictions = predict(classifier, test_rows, pad_id=pad_id, device=torch.device("cpu"))
    gold = [label for _, label in test_rows]
    hits = [p == g for p, g in zip(predictions, gold)]
    per_label = {
        name: sum(h for h, g in zip(hits, gold) if g == i) / max(1, sum(g == i for g in gold))
        for i, name in enumerate(labels)
    }
    model_dir = ckpt.save_checkpoint(
        Path(out_dir) / "classifier",
        model_state=classifier.state_dict(),
        config=cfg,
        tokenizer_file=loaded.tokenizer_path,
        extra_files={LABELS_FILE: json.dumps({"labels": labels, "pad_id": pad_id}, indent=2)},
    )
    return ClassifyResult(
        run_dir=result.run_dir,
        model_dir=model_dir,
        labels=labels,
        accuracy=sum(hits) / len(hits),
        test_examples=len(test_rows),
        train_examples=len(train_rows),
        per_label=per_label,
    )


def load_classifier_weights(directory: Path, cfg: Config, n_classes: int) -> SequenceClassifier:
    model = SequenceClassifier(build_model(cfg.model, device="cpu"), n_classes)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(Path(directory) / ckpt.WEIGHTS), strict=True)
    return model.eval()


def load_classifier(directory: str | Path) -> tuple[SequenceClassifier, list[str], int]:
    """A classifier saved by ``finetune_classifier`` (``OUT/classifier``), its label names and pad id."""
    directory = Path(directory)
    problems = ckpt.verify_checkpoint(directory)
    if problems or not (directory / LABELS_FILE).is_file():
        raise DataError(f"{directory}: not a saved classifier ({'; '.join(problems) or 'no ' + LABELS_FILE})")
    meta = json.loads((directory / LABELS_FILE).read_text(encoding="utf-8"))
    cfg = ckpt.load_config_from(directory)
    model = load_classifier_weights(directory, cfg, len(meta["labels"]))
    return model, meta["labels"], meta["pad_id"]
