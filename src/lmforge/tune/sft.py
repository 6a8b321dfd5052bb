"""Supervised fine-tuning on instruction and chat data, with the loss on the assistant's tokens only.

Shape legend: B micro-batch, T sequence length.

Records (JSONL, one per line) come in three shapes: ``messages`` (a list of ``{role, content}``),
``instruction``/``input``/``output`` (Alpaca; the user turn is the instruction, then a blank line and the input
when there is one) or ``prompt``/``response``; Self-Instruct seed tasks (``instruction`` + ``instances``) give one
example per instance. Every record goes through the model's chat template (``infer/chat.py``; the default lmforge
template when the base model has none) as user and assistant turns, so fine-tuning, ``lmforge chat`` and an
exported model's ``apply_chat_template`` all see the same text. The loss falls on every assistant turn, including
its end-of-turn token. A conversation longer than ``train.seq_len`` is cut after the last assistant turn that
fits (whole turns only; the cut turns and conversations are counted). Examples are packed into rows of
``train.seq_len`` tokens (attention and positions restart at each example) or padded one per row. Training is
``train.loop.train`` with a ``train.run.Task`` (this loader, language modelling), so checkpoints, resume, logging
and guards are the same as pre-training; the run's tokenizer folder holds ``tokenizer_config.json`` with the
template, which every checkpoint and the exported model carry.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lmforge import checkpoint as ckpt
from lmforge.config import Config, apply_overrides, config_from_dict
from lmforge.data.batch import IGNORE_INDEX, Batch
from lmforge.errors import DataError
from lmforge.files import jsonl_records
from lmforge.infer.chat import (
    CHAT_ROLES,
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    Segment,
    conversation_segments,
    default_template,
    encode_chat,
    special_token_ids,
)
from lmforge.infer.generate import Tokenizer
from lmforge.tune.lora import LoRAConfig, apply_lora, merge_lora
from lmforge.tune.rows import RowLoader

__all__ = ["CHAT_ROLES", "Segment", "record_examples", "load_examples", "tokenize_example", "finetune"]

IGNORE = IGNORE_INDEX  # a target without loss (prompt tokens, padding)
# The template records are rendered with when no model is at hand (the lmforge tokenizers' end of text).
DEFAULT_TEMPLATE = ChatTemplate(DEFAULT_CHAT_TEMPLATE, eos_token="<|endoftext|>")


def _fields(obj: dict, where: str, names: tuple[str, ...], what: str) -> list[str]:
    missing = [n for n in names if n not in obj]
    if missing:
        raise DataError(
            f"{where}: {what} record without {', '.join(missing)} (found: {', '.join(sorted(obj))})"
        )
    bad = [n for n in names if not isinstance(obj[n], str)]
    if bad:
        raise DataError(f"{where}: field {bad[0]!r} must be a string, got {type(obj[bad[0]]).__name__}")
    return [obj[n] for n in names]


def instruction_turns(instruction: str, input: str, output: str) -> list[dict]:
    """An Alpaca-style record as a user turn (the instruction, a blank line, the input) and an assistant turn."""
    user = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def record_messages(obj: dict, where: str) -> list[list[dict]]:
    """The conversations (message lists) of one JSONL record, in any of the accepted shapes."""
    if "messages" in obj:
        return [obj["messages"]]
    if "instances" in obj:
        (instruction,) = _fields(obj, where, ("instruction",), "Self-Instruct")
        out = []
        for i, inst in enumerate(obj["instances"] or []):
            inp, output = _fields(inst, f"{where} instances[{i}]", ("input", "output"), "instance")
            out.append(instruction_turns(instruction, inp, output))
        return out
    if "instruction" in obj or "output" in obj:
        instruction, output = _fields(obj, where, ("instruction", "output"), "instruction")
        inp = obj.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
        return [instruction_turns(instruction, inp, output)]
    if "prompt" in obj or "response" in obj:
        prompt, response = _fields(obj, where, ("prompt", "response"), "prompt/response")
        return [[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]]
    raise DataError(
        f"{where}: no instruction/output, prompt/response or messages fields (found: {', '.join(sorted(obj))})"
    )


def record_examples(obj: dict, where: str, template: ChatTemplate | None = None) -> list[list[Segment]]:
    """The examples (lists of segments) of one JSONL record, rendered through ``template`` (default: the
    lmforge template). Assistant turns, with their end-of-turn token, are the trained segments."""
    template = template or DEFAULT_TEMPLATE
    return [conversation_segments(template, m, where) for m in record_messages(obj, where)]


def read_examples(
    path: str | Path, *, template: ChatTemplate | None = None, limit: int | None = None
) -> tuple[list[list[Segment]], int]:
    """(examples, records read) of a JSONL file; a malformed line is reported as file:line before training."""
    examples: list[list[Segment]] = []
    records = 0
    for obj, where in jsonl_records(path, "fine-tuning data file"):
        if limit is not None and len(examples) >= limit:
            break
        examples.extend(record_examples(obj, where, template))
        records += 1
    if not examples:
        raise DataError(f"{path}: no examples")
    return (examples[:limit] if limit is not None else examples), records


def load_examples(
    path: str | Path, limit: int | None = None, template: ChatTemplate | None = None
) -> list[list[Segment]]:
    """Every example of a JSONL file (see ``read_examples``)."""
    return read_examples(path, template=template, limit=limit)[0]


@dataclass(frozen=True)
class TokenizedExample:
    inputs: list[int]  # empty when not even the first assistant turn fits
    targets: list[int]  # the next tokens; IGNORE where the next token is not the assistant's
    cut_turns: int  # assistant turns dropped because they did not fit


def tokenize_conversation(
    segments: Sequence[Segment], tokenizer: Tokenizer, max_tokens: int, specials: dict[str, int]
) -> TokenizedExample:
    """Inputs and targets of one example, cut after the last assistant turn that fits in ``max_tokens``
    inputs: whole turns only, so no kept turn loses a token. ``specials`` (text -> id) are encoded as tokens."""
    ids: list[int] = []
    labels: list[int] = []
    kept, turns, kept_turns = 0, 0, 0
    for k, seg in enumerate(segments):
        piece = encode_chat(tokenizer, seg.text, specials)
        ids += piece
        labels += piece if seg.train else [IGNORE] * len(piece)
        if seg.train and (k + 1 == len(segments) or not segments[k + 1].train):  # the end of a turn
            turns += 1
            if len(ids) - 1 <= max_tokens and kept_turns == turns - 1:
                kept, kept_turns = len(ids), turns
    if kept < 2:
        return TokenizedExample([], [], turns)
    return TokenizedExample(ids[: kept - 1], labels[1:kept], turns - kept_turns)


def tokenize_example(
    segments: Sequence[Segment], tokenizer: Tokenizer, max_tokens: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of equal length: targets are the next tokens, -100 where the next token is not the
    assistant's; at most ``max_tokens`` inputs, cut at a turn boundary (see ``tokenize_conversation``)."""
    example = tokenize_conversation(segments, tokenizer, max_tokens, special_token_ids(tokenizer))
    return example.inputs, example.targets


# -- batches ----------------------------------------------------------------------------------------------


Row = tuple[list[int], list[int], list[int]]


def build_rows(
    examples: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool
) -> list[Row]:
    """Rows of exactly ``seq_len`` (inputs, targets, doc ids). Packing puts whole examples side by side
    until the next one does not fit; the tail of a row is padding (no loss, its own doc id)."""
    rows: list[Row] = []
    current: Row = ([], [], [])
    for inputs, targets in examples:
        if current[0] and (not pack or len(current[0]) + len(inputs) > seq_len):
            rows.append(current)
            current = ([], [], [])
        doc = current[2][-1] + 1 if current[2] else 0
        current = (current[0] + inputs, current[1] + targets, current[2] + [doc] * len(inputs))
    if current[0]:
        rows.append(current)
    padded = []
    for inputs, targets, docs in rows:
        fill = seq_len - len(inputs)
        pad_doc = (docs[-1] + 1) if docs else 0
        padded.append((inputs + [pad_id] * fill, targets + [IGNORE] * fill, docs + [pad_doc] * fill))
    return padded


def rows_to_batch(rows: Sequence[Row], with_doc_ids: bool) -> Batch:
    inputs = torch.tensor([r[0] for r in rows], dtype=torch.long)
    targets = torch.tensor([r[1] for r in rows], dtype=torch.long)
    doc_ids = torch.tensor([r[2] for r in rows], dtype=torch.long) if with_doc_ids else None
    return Batch(inputs, targets, doc_ids)


# -- the fine-tuning run ----------------------------------------------------------------------------------

FINETUNE_TRAIN_DEFAULTS = {
    "steps": 200,
    "lr": 1e-4,
    "min_lr": 1e-5,
    "warmup_steps": 10,
    "eval_every": 50,
    "ckpt_every": 100,
    "log_every": 10,
    "sample_tokens": 64,
}


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path  # a plain lmforge checkpoint of the fine-tuned model (LoRA merged)
    final_loss: float | None
    val_loss: float | None
    train_examples: int
    val_examples: int
    skipped_examples: int  # not even the first assistant turn fits in train.seq_len
    hf_dir: Path | None
    cut_conversations: int = 0  # conversations cut at a turn boundary to fit train.seq_len
    cut_turns: int = 0  # assistant turns those cuts dropped (skipped examples' turns included)
    chat_template: str = ""  # where the template trained with came from


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * val_fraction) if len(examples) > 1 else 0
    n_val = min(n_val, len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def finetune_config(base_cfg: Config, out_dir: str | Path, overrides: Sequence[str]) -> Config:
    """The run's Config: the base model's shape, fine-tuning defaults for ``train``, then the overrides."""
    train = {**FINETUNE_TRAIN_DEFAULTS, "out_dir": str(out_dir)}
    train["seq_len"] = min(512, base_cfg.model.max_seq_len)
    data = {"model": dataclasses.asdict(base_cfg.model), "train": train}
    return config_from_dict(apply_overrides(data, overrides))


@dataclass
class SFTData:
    """The fine-tuning data, read, rendered, tokenized, cut and split: what the run trains on."""

    train: list[tuple[list[int], list[int]]]
    val: list[tuple[list[int], list[int]]]
    records: int
    examples: int
    skipped: int
    cut_conversations: int
    cut_turns: int
    sample_prompt: str  # the first example's text before its first assistant turn


def prepare_sft_data(
    data_path: str | Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    seq_len: int,
    model_context: int,
    val_fraction: float,
    seed: int,
    limit: int | None,
) -> SFTData:
    """Read ``data_path`` through ``template``, tokenize, cut long conversations at turn boundaries, split."""
    examples, records = read_examples(data_path, template=template, limit=limit)
    specials = special_token_ids(tokenizer, template)
    tokenized = [tokenize_conversation(e, tokenizer, seq_len, specials) for e in examples]
    usable = [(t.inputs, t.targets) for t in tokenized if any(y != IGNORE for y in t.targets)]
    if not usable:
        raise DataError(
            f"{data_path}: none of its {len(examples)} examples keeps a response token within "
            f"train.seq_len={seq_len} (the prompts fill the context, or the responses are empty): shorten "
            f"the prompts or raise train.seq_len (the model's context is {model_context})"
        )
    train_ex, val_ex = split_examples(usable, val_fraction, seed)
    first = examples[0]
    prompt = "".join(s.text for s in first[: next(i for i, s in enumerate(first) if s.train)])
    return SFTData(
        train=train_ex,
        val=val_ex,
        records=records,
        examples=len(examples),
        skipped=len(tokenized) - len(usable),
        cut_conversations=sum(1 for t in tokenized if t.cut_turns and t.inputs),
        cut_turns=sum(t.cut_turns for t in tokenized),
        sample_prompt=prompt,
    )


def write_run_tokenizer(
    out_dir: str | Path, tokenizer_file: Path, cfg: Config, template: ChatTemplate
) -> Path:
    """``OUT/tokenizer/``: the tokenizer and its ``tokenizer_config.json`` holding the chat template trained
    with; every checkpoint of the run copies both."""
    from lmforge.convert import write_tokenizer_files

    folder = Path(out_dir) / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file, folder / ckpt.TOKENIZER)
    write_tokenizer_files(folder / ckpt.TOKENIZER, folder, cfg.model.max_seq_len, template.source)
    return folder / ckpt.TOKENIZER


def base_adapter(loaded, lora: LoRAConfig | None, keep_sparsity: bool):
    """The ``adapt_model`` of the run: load the base weights, keep pruned zeros at zero, add LoRA."""
    from lmforge.tune.sparsity import keep_pruned_at_zero, prunable_weights

    base_state = {k: v for k, v in loaded.model.state_dict().items()}
    masks = {n: p != 0 for n, p in prunable_weights(loaded.model).items()} if keep_sparsity else None

    def adapt(model):
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        if masks is not None:
            keep_pruned_at_zero(masks, model)
        return apply_lora(model, lora) if lora is not None else model

    return adapt


def sft_lineage(
    base: str | Path, loaded, data_path: str | Path, data: SFTData, template: ChatTemplate
) -> dict:
    """What the model card says of where this model comes from: the base model's card, then this stage."""
    from lmforge.train.card import data_licence, find_card

    return {
        "base": str(base),
        "base_card": find_card(loaded.directory),
        "stage": "supervised fine-tuning (SFT)",
        "data": [
            {
                "path": str(data_path),
                "records": data.records,
                "examples": data.examples,
                "licence": data_licence(data_path),
            }
        ],
        "chat_template": template.origin,
        "counts": {
            "train examples": len(data.train),
            "validation examples": len(data.val),
            "skipped (no assistant turn fits)": data.skipped,
            "conversations cut at a turn boundary": data.cut_conversations,
            "assistant turns cut": data.cut_turns,
        },
    }


def sft_loaders(data: SFTData, cfg: Config, tokenizer: Tokenizer, tokenizer_path: str, pack: bool):
    """The training loader (packed or padded rows) and the validation batches of a run."""
    tc = cfg.train
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eot_id or 0)
    collate = partial(rows_to_batch, with_doc_ids=pack)
    loader = RowLoader(
        build_rows(data.train, tc.seq_len, pad_id, pack),
        collate=collate,
        batch_size=tc.micro_batch,
        seed=tc.seed,
        vocab_size=cfg.model.vocab_size,
        tokenizer_path=tokenizer_path,
    )
    val_rows = build_rows(data.val, tc.seq_len, pad_id, pack)
    n_val = min(len(val_rows), tc.micro_batch * tc.eval_batches)

    def val_batches():
        for i in range(0, n_val, tc.micro_batch):
            yield collate(val_rows[i : i + tc.micro_batch])

    return loader, val_batches


def finetune(
    base: str | Path,
    data_path: str | Path,
    *,
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    lora: LoRAConfig | None = None,
    pack: bool = True,
    val_fraction: float = 0.05,
    limit: int | None = None,
    resume: str | None = None,
    keep_sparsity: bool = False,
    export_hf: str | Path | None = None,
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune ``base`` (an lmforge run/checkpoint or a Hugging Face folder) on ``data_path``.

    Every input is read and checked before any run folder is written. The base model's chat template is used
    (the default lmforge template when it has none) and saved with the run. The run folder holds the usual
    checkpoints; ``OUT/model`` holds the final model with any LoRA adapters merged (``export_hf``: also as a
    Hugging Face folder). ``keep_sparsity`` keeps the zeros of a pruned model at zero (recovery fine-tune).
    """
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.loop import train
    from lmforge.train.run import Task

    loaded = load_for_inference(base, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    cfg = finetune_config(loaded.config, out_dir, overrides)
    if lora is not None and lora.problems():
        raise DataError("invalid LoRA settings:\n  " + "\n  ".join(lora.problems()))
    template = loaded.chat_template or default_template(tokenizer)
    tc = cfg.train
    data = prepare_sft_data(
        data_path,
        tokenizer,
        template,
        seq_len=tc.seq_len,
        model_context=cfg.model.max_seq_len,
        val_fraction=val_fraction,
        seed=tc.seed,
        limit=limit,
    )
    tokenizer_file = write_run_tokenizer(out_dir, loaded.tokenizer_path, cfg, template)
    loader, val_batches = sft_loaders(data, cfg, tokenizer, str(tokenizer_file), pack)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, sample_prompts=[data.sample_prompt]))
    lineage = sft_lineage(base, loaded, data_path, data, template)
    task = Task(loader, val_batches, adapt_model=base_adapter(loaded, lora, keep_sparsity), lineage=lineage)
    result = train(cfg, resume=resume, task=task, progress=progress)
    model_dir = save_final_model(result.checkpoint, cfg, lora, Path(out_dir) / "model", tokenizer_file)
    hf_dir = None
    if export_hf is not None:
        from lmforge.convert import export_model

        hf_dir = export_model(model_dir, export_hf, verify=True).out_dir
    return FinetuneResult(
        run_dir=result.run_dir,
        model_dir=model_dir,
        final_loss=result.final_loss,
        val_loss=result.val_loss,
        train_examples=len(data.train),
        val_examples=len(data.val),
        skipped_examples=data.skipped,
        hf_dir=hf_dir,
        cut_conversations=data.cut_conversations,
        cut_turns=data.cut_turns,
        chat_template=template.origin,
    )


def save_final_model(
    checkpoint_dir: Path, cfg: Config, lora: LoRAConfig | None, out: Path, tokenizer_path: Path | None
) -> Path:
    """A plain lmforge checkpoint from the run's last checkpoint, LoRA adapters merged into the weights, with
    the tokenizer (and its chat template) and the model card."""
    from lmforge.model.transformer import build_model

    model = build_model(cfg.model, device="cpu")
    if lora is not None:
        apply_lora(model, lora)
    weights = ckpt.load_model_state(checkpoint_dir, cfg)
    model.load_state_dict(weights, strict=True)
    if lora is not None:
        merge_lora(model)
    card = checkpoint_dir / "MODEL_CARD.md"  # the final checkpoint's card, with the model's lineage
    extra = {"MODEL_CARD.md": card.read_text(encoding="utf-8")} if card.is_file() else None
    return ckpt.save_checkpoint(
        out, model_state=model.state_dict(), config=cfg, tokenizer_file=tokenizer_path, extra_files=extra
    )
