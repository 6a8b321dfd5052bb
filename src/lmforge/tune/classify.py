"""Classification fine-tuning: labelled JSONL (``text``, ``label``) -> the model with a last-token ``pool``
head (``SequenceClassifier``), trained by the same loop as pre-training, scored by held-out accuracy.

Shape legend: B batch, T tokens, K classes.

The loop computes a cross-entropy over ``model(x)`` against ``targets``; here ``model(x)`` gives (B, 1, K)
class logits and ``targets`` (B, 1) class indices, so nothing in the loop changes. Texts are right-padded
with the tokenizer's pad id; the pad run at the end of a row is what the pool skips.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config
from lmforge.errors import DataError
from lmforge.files import jsonl_records
from lmforge.model.transformer import SequenceClassifier, Transformer, build_model
from lmforge.tune.sft import Batch, finetune_config

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


class PooledClassifier(SequenceClassifier):
    """``SequenceClassifier`` with the call signature of the training loop: (B, T) ids -> (B, 1, K)."""

    def __init__(self, backbone: Transformer, n_classes: int, pad_id: int):
        backbone.lm_head = None  # only the hidden states are used; a tied head would be saved twice
        super().__init__(backbone, n_classes)
        self.pad_id = pad_id

    @property
    def cfg(self):
        return self.backbone.cfg  # what ``parallelize`` reads to size and wrap the model

    @property
    def layers(self):
        return self.backbone.layers

    def padding_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """1 up to each row's last token that is not part of its closing run of pad ids, 0 after."""
        is_pad = (idx == self.pad_id).long()
        trailing = is_pad.flip(1).cumprod(dim=1).flip(1)  # (B, T) 1 on the final pad run
        return 1 - trailing

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> torch.Tensor:
        mask = self.padding_mask(idx) if attention_mask is None else attention_mask
        return super().forward(idx, attention_mask=mask).unsqueeze(1)  # (B, 1, K)


def encode_rows(
    data: Sequence[tuple[str, str]], tokenizer, labels: list[str], seq_len: int, pad_id: int
) -> list[tuple[list[int], int]]:
    index = {lab: i for i, lab in enumerate(labels)}
    return [(tokenizer.encode(text)[:seq_len] or [pad_id], index[label]) for text, label in data]


def to_batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        inputs[r, : len(ids)] = torch.tensor(ids)
    targets = torch.tensor([[label] for _, label in rows], dtype=torch.long)  # (B, 1)
    return Batch(inputs, targets, None)


class ClassifyLoader:
    """Shuffled batches of (ids, label) rows with the TokenLoader interface."""

    def __init__(self, rows: list, *, batch_size: int, seed: int, pad_id: int, vocab_size: int):
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.vocab_size, self.tokenizer_path = vocab_size, None  # no tokenizer: the loop samples no text
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next(self):
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        self.position += 1
        return self.rows[self._order[self.position - 1]]

    def next_batch(self) -> Batch:
        return to_batch([self._next() for _ in range(self.batch_size)], self.pad_id)

    def skip(self, n_batches: int) -> None:
        for _ in range(n_batches * self.batch_size):
            self._next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows):
            raise DataError("the classification data changed since the checkpoint")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


@torch.no_grad()
def predict(
    model: PooledClassifier,
    rows: Sequence[tuple[list[int], int]],
    *,
    device: torch.device,
    batch_size: int = 32,
) -> list[int]:
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = to_batch(rows[i : i + batch_size], model.pad_id)
        out += model(batch.inputs.to(device)).squeeze(1).argmax(dim=-1).tolist()
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
    loader = ClassifyLoader(
        train_rows,
        batch_size=cfg.train.micro_batch,
        seed=cfg.train.seed,
        pad_id=pad_id,
        vocab_size=cfg.model.vocab_size,
    )
    base_state = dict(loaded.model.state_dict())

    def adapt(model: Transformer) -> PooledClassifier:
        model.load_state_dict(base_state, strict=False)
        return PooledClassifier(model, len(labels), pad_id).to(next(model.parameters()).device)

    def val_batches():
        mb = cfg.train.micro_batch
        for i in range(0, len(test_rows), mb):
            yield to_batch(test_rows[i : i + mb], pad_id)

    result = train(
        cfg, resume=resume, loader=loader, val_batches=val_batches, progress=progress, adapt_model=adapt
    )
    classifier = load_classifier_weights(result.checkpoint, cfg, len(labels), pad_id)
    predictions = predict(classifier, test_rows, device=torch.device("cpu"))
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


def load_classifier_weights(directory: Path, cfg: Config, n_classes: int, pad_id: int) -> PooledClassifier:
    backbone = build_model(dataclasses.replace(cfg.model), device="cpu")
    model = PooledClassifier(backbone, n_classes, pad_id)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(Path(directory) / ckpt.WEIGHTS), strict=True)
    return model.eval()


def load_classifier(directory: str | Path) -> tuple[PooledClassifier, list[str]]:
    """A classifier saved by ``finetune_classifier`` (``OUT/classifier``) and its label names."""
    directory = Path(directory)
    problems = ckpt.verify_checkpoint(directory)
    if problems or not (directory / LABELS_FILE).is_file():
        raise DataError(f"{directory}: not a saved classifier ({'; '.join(problems) or 'no ' + LABELS_FILE})")
    meta = json.loads((directory / LABELS_FILE).read_text(encoding="utf-8"))
    cfg = ckpt.load_config_from(directory)
    return load_classifier_weights(directory, cfg, len(meta["labels"]), meta["pad_id"]), meta["labels"]
