"""Supervised fine-tuning on instruction data, with the loss on response tokens only.

Shape legend: B micro-batch, T sequence length.

Records (JSONL, one per line) come in three shapes: ``instruction``/``input``/``output`` (Alpaca),
``prompt``/``response``, or ``messages`` (a list of ``{role, content}``; the loss falls on the assistant
turns). Self-Instruct seed tasks (``instruction`` + ``instances``) give one example per instance. Each example
becomes ids and labels (-100 on prompt tokens); examples are packed into rows of ``train.seq_len`` tokens
(attention and positions restart at each example) or padded one per row. Training is ``train.loop.train`` with a
``train.run.Task`` (this loader, language modelling), so checkpoints, resume, logging and guards are the same as pre-training.
"""

from __future__ import annotations

import dataclasses
import random
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
from lmforge.infer.generate import Tokenizer
from lmforge.tune.lora import LoRAConfig, apply_lora, merge_lora
from lmforge.tune.rows import RowLoader

IGNORE = IGNORE_INDEX  # a target without loss (prompt tokens, padding)

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
CHAT_HEADER = "<|{role}|>\n"
CHAT_ROLES = ("system", "user", "assistant")


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt an instruction-tuned model expects (the same template fine-tuning used)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool  # True: the model learns to produce this text


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


def record_examples(obj: dict, where: str) -> list[list[Segment]]:
    """The examples (lists of segments) of one JSONL record."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        segments = []
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in CHAT_ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise DataError(
                    f"{where}: messages[{i}] must be {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, got {m!r}"
                )
            segments.append(Segment(CHAT_HEADER.format(role=m["role"]), False))
            segments.append(Segment(m["content"] + "\n", m["role"] == "assistant"))
        if not any(s.train for s in segments):
            raise DataError(f"{where}: no assistant message to learn from")
        return [segments]
    if "instances" in obj:
        (instruction,) = _fields(obj, where, ("instruction",), "Self-Instruct")
        out = []
        for i, inst in enumerate(obj["instances"] or []):
            inp, output = _fields(inst, f"{where} instances[{i}]", ("input", "output"), "instance")
            out.append([Segment(format_prompt(instruction, inp), False), Segment(output, True)])
        return out
    if "instruction" in obj or "output" in obj:
        instruction, output = _fields(obj, where, ("instruction", "output"), "instruction")
        inp = obj.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
        return [[Segment(format_prompt(instruction, inp), False), Segment(output, True)]]
    if "prompt" in obj or "response" in obj:
        prompt, response = _fields(obj, where, ("prompt", "response"), "prompt/response")
        return [[Segment(prompt, False), Segment(response, True)]]
    raise DataError(
        f"{where}: no instruction/output, prompt/response or messages fields (found: {', '.join(sorted(obj))})"
    )


def load_examples(path: str | Path, limit: int | None = None) -> list[list[Segment]]:
    """Every example of a JSONL file; any malformed line is reported as file:line before training starts."""
    examples = []
    for obj, where in jsonl_records(path, "fine-tuning data file"):
        if limit is not None and len(examples) >= limit:
            break
        examples.extend(record_examples(obj, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples[:limit] if limit is not None else examples


def tokenize_example(
    segments: Sequence[Segment], tokenizer: Tokenizer, max_tokens: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) of equal length: targets are the next tokens, -100 where the next token belongs to
    the prompt. The example ends with end-of-text (learned); at most ``max_tokens`` inputs (cut at the end)."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        piece = tokenizer.encode(seg.text)
        ids += piece
        labels += piece if seg.train else [IGNORE] * len(piece)
    if tokenizer.eot_id is not None:
        ids.append(tokenizer.eot_id)
        labels.append(tokenizer.eot_id)
    ids, labels = ids[: max_tokens + 1], labels[: max_tokens + 1]
    return ids[:-1], labels[1:]


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
    skipped_examples: int
    hf_dir: Path | None


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

    Every input is read and checked before any run folder is written. The run folder holds the usual
    checkpoints; ``OUT/model`` holds the final model with any LoRA adapters merged (``export_hf``: also as a
    Hugging Face folder). ``keep_sparsity`` keeps the zeros of a pruned model at zero (recovery fine-tune).
    """
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.loop import train
    from lmforge.train.run import Task
    from lmforge.tune.sparsity import keep_pruned_at_zero, prunable_weights

    loaded = load_for_inference(base, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    cfg = finetune_config(loaded.config, out_dir, overrides)
    if lora is not None:
        problems = lora.problems()
        if problems:
            raise DataError("invalid LoRA settings:\n  " + "\n  ".join(problems))
    examples = load_examples(data_path, limit)
    seq_len = cfg.train.seq_len
    tokenized = [tokenize_example(e, tokenizer, seq_len) for e in examples]
    usable = [t for t in tokenized if any(y != IGNORE for y in t[1])]
    skipped = len(tokenized) - len(usable)
    if not usable:
        raise DataError(
            f"{data_path}: none of its {len(examples)} examples keeps a response token within "
            f"train.seq_len={seq_len} (the prompts fill the context, or the responses are empty): shorten "
            f"the prompts or raise train.seq_len (the model's context is {cfg.model.max_seq_len})"
        )
    train_ex, val_ex = split_examples(usable, val_fraction, cfg.train.seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eot_id or 0)
    train_rows = build_rows(train_ex, seq_len, pad_id, pack)
    val_rows = build_rows(val_ex, seq_len, pad_id, pack)
    loader = RowLoader(
        train_rows,
        collate=partial(rows_to_batch, with_doc_ids=pack),
        batch_size=cfg.train.micro_batch,
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
        tokenizer_path=str(loaded.tokenizer_path),
    )
    first = examples[0]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_prompts=[first[0].text]))

    def val_batches():
        mb = cfg.train.micro_batch
        for i in range(0, min(len(val_rows), mb * cfg.train.eval_batches), mb):
            yield rows_to_batch(val_rows[i : i + mb], pack)

    base_state = {k: v for k, v in loaded.model.state_dict().items()}
    masks = {n: p != 0 for n, p in prunable_weights(loaded.model).items()} if keep_sparsity else None

    def adapt(model):
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        if masks is not None:
            keep_pruned_at_zero(masks, model)
        return apply_lora(model, lora) if lora is not None else model

    task = Task(loader=loader, val_batches=val_batches, adapt_model=adapt)
    result = train(cfg, resume=resume, task=task, progress=progress)
    model_dir = save_final_model(result.checkpoint, cfg, lora, Path(out_dir) / "model", loaded.tokenizer_path)
    hf_dir = None
    if export_hf is not None:
        from lmforge.convert import export_model

        hf_dir = export_model(model_dir, export_hf, verify=True).out_dir
    return FinetuneResult(
        run_dir=result.run_dir,
        model_dir=model_dir,
        final_loss=result.final_loss,
        val_loss=result.val_loss,
        train_examples=len(train_ex),
        val_examples=len(val_ex),
        skipped_examples=skipped,
        hf_dir=hf_dir,
    )


def save_final_model(
    checkpoint_dir: Path, cfg: Config, lora: LoRAConfig | None, out: Path, tokenizer_path: Path | None
) -> Path:
    """A plain lmforge checkpoint from the run's last checkpoint, LoRA adapters merged into the weights."""
    from lmforge.model.transformer import build_model

    model = build_model(cfg.model, device="cpu")
    if lora is not None:
        apply_lora(model, lora)
    weights = ckpt.load_model_state(checkpoint_dir, cfg)
    model.load_state_dict(weights, strict=True)
    if lora is not None:
        merge_lora(model)
    return ckpt.save_checkpoint(
        out, model_state=model.state_dict(), config=cfg, tokenizer_file=tokenizer_path
    )
