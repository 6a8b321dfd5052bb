"""Pre-training with ``data.document_mask=true``: windows of a prepared folder hold several documents, and the
mask makes each one run as if it were alone; through ``lmforge train`` the mask reaches the loss.

The reference for a masked window is each document's segment run by itself (positions from 0), the
end-of-text token with the document it ends. The run test compares a masked and an unmasked run from the
same seed and data, and checks each run's reported validation loss against the final weights evaluated
under the same attention the run trained with.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.loader import TokenLoader, eval_batches
from lmforge.data.prepare import prepare_data
from lmforge.model.transformer import build_model
from lmforge.train.objectives import token_cross_entropy

SEQ_LEN = 64
WORDS = "the king shall speak and we will hear him now at dawn or never".split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Short documents (1 to 5 words): a window of SEQ_LEN characters spans several of them."""
    root = tmp_path_factory.mktemp("docmask")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(400)]
    docs = [f"{i}: {d}" for i, d in enumerate(docs)]  # distinct, so deduplication keeps them all
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = root / "prepared"
    prepare_data(
        DataConfig(tokenizer="char", val_fraction=0.1, seed=1),
        [str(root / "docs.jsonl")],
        out,
        progress=False,
    )
    return out


def segments(doc_ids: torch.Tensor) -> list[slice]:
    """The runs of equal document id in one row."""
    starts = [0] + [t for t in range(1, len(doc_ids)) if doc_ids[t] != doc_ids[t - 1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(doc_ids)])]


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_masked_window_equals_each_document_alone(prepared, position):
    loader = TokenLoader(prepared, seq_len=SEQ_LEN, batch_size=4, seed=3, with_doc_ids=True)
    batch = loader.next_batch()
    from lmforge.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=loader.vocab_size,
        max_seq_len=SEQ_LEN,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        position=position,
        init_std=0.1,
    )
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        masked = model(batch.inputs, doc_ids=batch.doc_ids)  # (B, T, V)
        plain = model(batch.inputs)
    counts = [len(segments(ids)) for ids in batch.doc_ids]
    assert min(counts) >= 2 and max(counts) >= 4, counts  # the windows span several documents
    for row in range(batch.inputs.shape[0]):
        pieces = segments(batch.doc_ids[row])
        for piece in pieces[:-1]:  # an end-of-text closes every document but the window's last
            assert batch.inputs[row, piece.stop - 1] == loader.eot_id
        with torch.no_grad():
            alone = torch.cat([model(batch.inputs[row : row + 1, piece])[0] for piece in pieces])  # (T, V)
        assert (masked[row] - alone).abs().max() <= 1e-5
        assert (plain[row] - alone).abs().max() > 1e-3  # without the mask the documents see each other


def train_args(prepared: Path, run: Path, document_mask: bool) -> list[str]:
    return [
        "train",
        f"data.prepared={prepared}",
        f"data.document_mask={str(document_mask).lower()}",
        "model.preset=tiny",
        "model.n_layers=2",
        "model.d_model=32",
        "model.ffn_hidden=64",
        f"train.out_dir={run}",
        "train.steps=6",
        f"train.seq_len={SEQ_LEN}",
        "train.micro_batch=4",
        "train.lr=3e-3",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=6",
        "train.eval_batches=2",
        "train.ckpt_every=6",
        "train.sample_prompts=[]",
        "train.device=cpu",
        "--no-progress",
    ]


def logged(run: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def val_loss_of(run: Path, prepared: Path, document_mask: bool) -> float:
    """Mean validation loss of the run's final weights over the loop's validation windows, the documents
    masked or not as ``document_mask`` says."""
    model, _, _ = load_model(run / "checkpoints" / "step_00000006")
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(prepared, seq_len=SEQ_LEN, batch_size=4, max_batches=2, with_doc_ids=True):
            logits = model(batch.inputs, doc_ids=batch.doc_ids) if document_mask else model(batch.inputs)
            total += token_cross_entropy(logits, batch.targets).item()
            count += batch.targets.numel()
    return total / count


def test_document_mask_reaches_the_training_loss(prepared, tmp_path, capsys):
    masked, unmasked = tmp_path / "masked", tmp_path / "unmasked"
    assert main(train_args(prepared, masked, True)) == 0
    assert main(train_args(prepared, unmasked, False)) == 0
    capsys.readouterr()
    assert yaml.safe_load((masked / "config.yaml").read_text())["data"]["document_mask"] is True
    loss_masked, loss_unmasked = logged(masked, "loss"), logged(unmasked, "loss")
    assert len(loss_masked) == len(loss_unmasked) == 6
    # the same weights and batch at step 1: only the attention differs
    assert abs(loss_masked[0] - loss_unmasked[0]) > 1e-4
    assert loss_masked[-1] < loss_masked[0]  # it trains
    # each run's validation loss is measured with the attention it trained with
    for run, mask in ((masked, True), (unmasked, False)):
        (reported,) = logged(run, "val_loss")
        assert reported == pytest.approx(val_loss_of(run, prepared, mask), rel=1e-5), (run.name, mask)
