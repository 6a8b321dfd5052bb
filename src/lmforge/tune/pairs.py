"""Preference data: JSONL records -> pairs of segment lists -> token rows -> batches of 2P rows (chosen rows
first). Used by ``preference.py``'s objectives and run.

Shape legend: P pairs, R = 2P rows, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.batch import IGNORE_INDEX, Batch
from lmforge.errors import DataError
from lmforge.files import jsonl_records
from lmforge.tune.sft import Segment, record_examples, tokenize_example

# -- records -> pairs of segment lists ---------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecord:
    chosen: list[Segment]
    rejected: list[Segment]
    where: str  # file:line


def _last_answer_only(segments: list[Segment]) -> list[Segment]:
    """The segments with only the final run of trained segments (the last assistant answer) left trained:
    earlier assistant turns belong to the shared prompt."""
    last = max(i for i, s in enumerate(segments) if s.train)
    first = last
    while first > 0 and segments[first - 1].train:
        first -= 1
    return [Segment(s.text, s.train and first <= i <= last) for i, s in enumerate(segments)]


def _message_side(obj: dict, side: str, where: str, template=None) -> tuple[list, list[Segment]]:
    messages = obj[side]
    prompt = obj.get("prompt", [])
    if not isinstance(prompt, list):
        raise DataError(f"{where}: 'prompt' must be a message list when {side!r} is one")
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        raise DataError(f"{where}: the last message of {side!r} must be the assistant's answer")
    full = prompt + messages
    (segments,) = record_examples({"messages": full}, f"{where} {side}", template)
    return full[:-1], _last_answer_only(segments)


def record_pair(obj: dict, where: str, template=None) -> PairRecord:
    """The chosen and rejected examples of one preference record (message lists rendered through the model's
    chat ``template``, default: lmforge's); a record without pairs names the fields it has."""
    if "chosen" not in obj or "rejected" not in obj:
        raise DataError(
            f"{where}: not a preference pair: needs 'chosen' and 'rejected' (strings with a 'prompt' string, "
            f"or message lists) (found: {', '.join(sorted(obj)) or 'no fields'})"
        )
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise DataError(
                f"{where}: string 'chosen'/'rejected' need a 'prompt' string (found: {', '.join(sorted(obj))})"
            )
        return PairRecord(
            [Segment(prompt, False), Segment(chosen, True)],
            [Segment(prompt, False), Segment(rejected, True)],
            where,
        )
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen_prompt, chosen_segments = _message_side(obj, "chosen", where, template)
        rejected_prompt, rejected_segments = _message_side(obj, "rejected", where, template)
        if chosen_prompt != rejected_prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last message (the prompt)")
        return PairRecord(chosen_segments, rejected_segments, where)
    raise DataError(
        f"{where}: 'chosen' and 'rejected' must both be strings or both message lists, got "
        f"{type(chosen).__name__} and {type(rejected).__name__}"
    )


def load_pairs(path: str | Path, limit: int | None = None, template=None) -> list[PairRecord]:
    out = []
    for obj, where in jsonl_records(path, "preference data file"):
        if limit is not None and len(out) >= limit:
            break
        out.append(record_pair(obj, where, template))
    if not out:
        raise DataError(f"{path}: no preference pairs")
    return out


# -- pairs -> rows -> batches -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRow:
    chosen: tuple[list[int], list[int]]  # (inputs, targets), targets IGNORE_INDEX on the prompt
    rejected: tuple[list[int], list[int]]
    reference: tuple[float, float] | None = None  # cached reference log-probs (chosen, rejected)


def _answer(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments if s.train)


def _ends_with_eot(example: tuple[list[int], list[int]], tokenizer) -> tuple[list[int], list[int]]:
    """A text answer learns to end too: end-of-text is appended as its last target (a chat template's
    turns end with it already)."""
    inputs, targets = example
    eot = tokenizer.eot_id
    if eot is None or not targets or targets[-1] == eot:
        return inputs, targets
    return inputs + [targets[-1]], targets + [eot]


def tokenize_pairs(records: Sequence[PairRecord], tokenizer, seq_len: int) -> tuple[list[PairRow], list[str]]:
    """Rows of the usable pairs and, for every skipped one, ``file:line: why``."""
    rows, skipped = [], []
    for rec in records:
        chosen_text, rejected_text = _answer(rec.chosen), _answer(rec.rejected)
        if not chosen_text.strip() or not rejected_text.strip():
            skipped.append(f"{rec.where}: empty {'chosen' if not chosen_text.strip() else 'rejected'} answer")
            continue
        if rec.chosen == rec.rejected:
            skipped.append(f"{rec.where}: chosen and rejected are identical")
            continue
        sides = [
            _ends_with_eot(tokenize_example(s, tokenizer, 1 << 30), tokenizer)
            for s in (rec.chosen, rec.rejected)
        ]
        longest = max(len(inputs) for inputs, _ in sides)
        if longest > seq_len:
            skipped.append(f"{rec.where}: {longest} tokens, more than train.seq_len={seq_len}")
            continue
        rows.append(PairRow(sides[0], sides[1]))
    return rows, skipped


@dataclass
class PreferenceBatch(Batch):
    """A ``Batch`` of 2P rows (chosen rows first), with the rows' cached reference log-probs when there are."""

    reference_logps: torch.Tensor | None = None  # (R,) or None

    def to(self, device: torch.device) -> PreferenceBatch:
        moved = super().to(device)
        if self.reference_logps is not None:
            moved.reference_logps = self.reference_logps.to(device, non_blocking=True)
        return moved


def collate_pairs(rows: Sequence[PairRow], pad_id: int) -> PreferenceBatch:
    """Right-padded to the longest of the 2P rows; padding takes no loss."""
    sides = [r.chosen for r in rows] + [r.rejected for r in rows]
    width = max(len(inputs) for inputs, _ in sides)
    inputs = torch.full((len(sides), width), pad_id, dtype=torch.long)  # (R, T)
    targets = torch.full((len(sides), width), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    for r, (ids, labels) in enumerate(sides):
        inputs[r, : len(ids)] = torch.tensor(ids)
        targets[r, : len(labels)] = torch.tensor(labels)
    reference = None
    if all(r.reference is not None for r in rows):
        reference = torch.tensor([r.reference[0] for r in rows] + [r.reference[1] for r in rows])  # (R,)
    return PreferenceBatch(inputs, targets, reference_logps=reference)
