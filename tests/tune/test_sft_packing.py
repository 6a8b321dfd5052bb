"""Packed SFT rows train exactly as their examples run one by one.

Four examples of different lengths are packed into one row (``build_rows(pack=True)``, doc ids, a padded
tail) and go through one step of the training loop's ``forward_backward``; the reference runs each example
as its own unpadded row without doc ids, the loss normalised by the same total of target tokens (the loop
sums the units of all micro-batches). Loss and every gradient agree within 1e-5: attention stays inside an
example and positions restart at each one.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.batch import Batch
from lmforge.data.tokenizer import char_tokenizer
from lmforge.distributed.parallelize import World
from lmforge.model.transformer import build_model
from lmforge.train.loop import forward_backward
from lmforge.train.objectives import LANGUAGE_MODELING
from lmforge.tune.sft import IGNORE, Segment, build_rows, rows_to_batch, tokenize_example

CPU = torch.device("cpu")
WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)
EXAMPLES = [
    [Segment("Q: add 2 and 3\nA: ", False), Segment("five", True)],
    [Segment("Say hi.\n", False), Segment("Hello there!", True)],
    [Segment("Name a colour: ", False), Segment("blue", True), Segment(" (or red)", False)],
    [Segment("Count to six\n", False), Segment("1 2 3 4 5 6", True)],
]


def one_step(position: str, batches: list[Batch]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and gradients of one training step over ``batches`` from the same initial weights."""
    cfg = ModelConfig(
        vocab_size=tokenizer().vocab_size,
        max_seq_len=96,
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        position=position,
        tie_embeddings=False,
        init_std=0.1,
    )
    model = build_model(cfg, seed=7).train()
    loss = forward_backward(
        model, batches, device=CPU, precision="fp32", scaler=None, world=WORLD, objective=LANGUAGE_MODELING
    )
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def tokenizer():
    return char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_packed_row_equals_examples_run_separately(position):
    tok = tokenizer()
    examples = [tokenize_example(segments, tok, max_tokens=64) for segments in EXAMPLES]
    lengths = [len(inputs) for inputs, _ in examples]
    assert len(set(lengths)) == len(lengths)
    seq_len = sum(lengths) + 5  # a padded tail: its own doc id, no loss
    (row,) = build_rows(examples, seq_len=seq_len, pad_id=tok.pad_id, pack=True)
    packed = rows_to_batch([row], with_doc_ids=True)
    assert packed.doc_ids.unique().tolist() == [0, 1, 2, 3, 4]
    alone = [
        Batch(torch.tensor([inputs]), torch.tensor([targets])) for inputs, targets in examples
    ]  # (1, T_i) each, no padding and no doc ids
    n_targets = sum(int((b.targets != IGNORE).sum()) for b in alone)
    assert int((packed.targets != IGNORE).sum()) == n_targets > 0

    loss_packed, grads_packed = one_step(position, [packed])
    loss_alone, grads_alone = one_step(position, alone)
    assert loss_packed.item() == pytest.approx(loss_alone.item(), abs=1e-5)
    for name, grad in grads_alone.items():
        assert grad.abs().max() > 0 or name.startswith("embed_positions"), name
        difference = (grads_packed[name] - grad).abs().max().item()
        assert difference <= 1e-5, f"{name}: gradients differ by {difference:.2e}"


def test_without_doc_ids_the_packed_row_differs():
    """The comparison above has power: the same packed row without its doc ids gives another loss."""
    tok = tokenizer()
    examples = [tokenize_example(segments, tok, max_tokens=64) for segments in EXAMPLES]
    (row,) = build_rows(examples, seq_len=sum(len(i) for i, _ in examples), pad_id=tok.pad_id, pack=True)
    masked, _ = one_step("rope", [rows_to_batch([row], with_doc_ids=True)])
    unmasked, _ = one_step("rope", [rows_to_batch([row], with_doc_ids=False)])
    assert abs(masked.item() - unmasked.item()) > 1e-3
