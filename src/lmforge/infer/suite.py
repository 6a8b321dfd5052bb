"""Evaluate one model on a set of things at once - texts, prepared validation splits, multiple-choice files,
task specs - and report it: what ``lmforge eval`` runs and ``eval.tasks`` runs inside training.

The scorers themselves live below this module: ``evaluate.py`` (perplexity, bits per byte, multiple-choice
log-likelihoods) and ``tasks/`` (generative tasks and their reference metrics).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.errors import ConfigError, DataError
from lmforge.infer.evaluate import (
    evaluate_choice_task,
    score_file,
    score_prepared,
    task_name,
)
from lmforge.infer.generate import Tokenizer
from lmforge.model.transformer import Transformer

if TYPE_CHECKING:
    from lmforge.infer.loading import DecodeOptions


def task_metrics(
    model: Transformer,
    tokenizer: Tokenizer,
    paths: Sequence[str | Path],
    *,
    device: torch.device,
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, float]:
    """Flat metrics (``hellaswag/acc``, ``hellaswag/acc_norm``) of the live model, e.g. inside training. A
    path ending in .yaml is a task spec (``lmforge.infer.tasks``): all its scores are reported."""
    metrics = {}
    for path in paths:
        if str(path).endswith((".yaml", ".yml")):  # a task spec (any kind); its data path is its own
            from lmforge.infer.tasks import TaskOptions, load_spec, run_task

            spec = load_spec(path)
            options = TaskOptions(limit=limit, batch_size=batch_size)
            done = run_task(model, tokenizer, spec, options, device=device)
            metrics.update({f"{spec.name}/{k}": v for k, v in done.metrics.items() if _is_score(k, v)})
            continue
        result = evaluate_choice_task(
            model, tokenizer, path, device=device, limit=limit, batch_size=batch_size
        )
        name = task_name(path)
        metrics[f"{name}/acc"] = result["acc"]
        metrics[f"{name}/acc_norm"] = result["acc_norm"]
    return metrics


def _is_score(name: str, value) -> bool:
    return isinstance(value, int | float) and not name.endswith("_stderr") and name not in ("n", "truncated")


# -- one model, several texts, prepared splits and tasks ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EvalReport:
    """Results by name (a text file's name, ``FOLDER/val``, a task name) -> {metric: value}, and notes on what
    could not be measured (bits per byte of a split that ends inside a document)."""

    model: str  # the folder the weights came from
    results: dict[str, dict]
    notes: list[str]
    fingerprint: str = ""  # sha256 of the weights (model_fingerprint)
    tasks: dict[str, dict] = field(default_factory=dict)  # task name -> its config and per-item samples
    config: dict = field(default_factory=dict)  # how the evaluation was run

    def to_dict(self, samples: bool = True) -> dict:
        out = {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "results": self.results,
        }
        if self.tasks:
            out["tasks"] = {
                name: {k: v for k, v in task.items() if samples or k != "samples"}
                for name, task in self.tasks.items()
            }
        return out


def model_fingerprint(model: Transformer) -> str:
    """``sha256:`` over the weights themselves (each tensor's name, dtype, shape and bytes, in name order): the
    same for a checkpoint and its Hugging Face export, different after any change to a weight."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {data.dtype} {tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def chat_functions(loaded, tokenizer):
    """(render messages -> prompt, encode prompt -> ids) through the model's chat template (the default one
    when the model carries none), as ``lmforge chat`` renders them."""
    from lmforge.infer import chat

    template = loaded.chat_template or chat.default_template(tokenizer)
    specials = chat.special_token_ids(tokenizer, template)

    def render(messages):
        return template.render(messages, add_generation_prompt=True)

    def encode(text):
        return chat.encode_chat(tokenizer, text, specials)

    return render, encode


def evaluate_model(
    model: str | Path,
    *,
    texts: Sequence[str | Path] = (),
    prepared: Sequence[str | Path] = (),
    tasks: Sequence[str | Path] = (),
    device: torch.device,
    limit: int | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 16,
    data_dir: str | Path | None = None,
    num_fewshot: int | None = None,
    chat: bool | None = None,
    render_chat=None,
    encode_chat=None,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    decode: DecodeOptions | None = None,
) -> EvalReport:
    """Open ``model`` (an lmforge run/checkpoint or a Hugging Face folder) and score: perplexity and bits per
    byte of each text file and of the val split of each prepared folder, accuracy on each multiple-choice
    task (first ``limit`` items). A task is a multiple-choice JSONL file, the name of a shipped task spec
    (its data under ``data_dir``) or the path of a spec (``lmforge.infer.tasks``): generative tasks are scored
    with their reference metrics, ``num_fewshot`` examples each, through ``render_chat`` (messages -> prompt)
    when ``chat``, generating at most ``max_new_tokens`` (default: each spec's) as ``decode`` says (default: the
    fast step on float weights). Every input is checked before the weights are loaded. (Long by choice: one pass over
    each kind of input, in the order the report lists them.)"""
    from lmforge.infer.loading import DecodeOptions, load_for_inference
    from lmforge.infer.tasks import TaskOptions, resolve_task, run_task
    from lmforge.infer.tasks.spec import read_items

    if not texts and not tasks and not prepared:
        raise DataError(
            "nothing to evaluate: give --text FILE, --data PREPARED_DIR and/or --task NAME|SPEC|FILE"
        )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    choice_files = [t for t in tasks if str(t).endswith(".jsonl")]
    specs = [resolve_task(t, data_dir) for t in tasks if not str(t).endswith(".jsonl")]
    missing = [p for p in [*texts, *choice_files, *(s.data for s in specs)] if not Path(p).is_file()]
    missing += [s.fewshot.data for s in specs if s.fewshot.data is not None and not s.fewshot.data.is_file()]
    for spec in specs:  # a record without a field the spec reads is reported before the weights are read
        if spec.kind != "multiple_choice":
            read_items(spec, limit=limit)
    if missing:
        raise DataError(f"{missing[0]}: no such file")
    unprepared = [d for d in prepared if not (Path(d) / "meta.json").is_file()]
    if unprepared:
        raise DataError(f"{unprepared[0]}: not a prepared dataset (no meta.json); run `lmforge data prepare`")
    decode = decode or DecodeOptions()
    loaded = load_for_inference(model, device=device, quantize=decode.quantize)
    tokenizer = loaded.require_tokenizer()
    decoder = decode.decoder(loaded.model)
    if render_chat is None and (chat or any(spec.chat for spec in specs)):
        render_chat, encode_chat = chat_functions(loaded, tokenizer)
    window = {"device": device, "seq_len": seq_len, "batch_size": batch_size, "max_tokens": max_tokens}
    results: dict[str, dict] = {}
    notes: list[str] = []
    for path in texts:
        results[Path(path).name] = score_file(loaded.model, tokenizer, path, **window).to_dict()
    for folder in prepared:
        score = score_prepared(loaded.model, tokenizer, folder, **window)
        results[f"{Path(folder).name}/val"] = score.to_dict()
        if score.note:
            notes.append(f"{folder}: no bits per byte: {score.note}")
    for path in choice_files:
        results[task_name(path)] = evaluate_choice_task(
            loaded.model, tokenizer, path, device=device, limit=limit, batch_size=batch_size
        )
    options = TaskOptions(
        num_fewshot=num_fewshot,
        limit=limit,
        chat=chat,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
    ran: dict[str, dict] = {}
    for spec in specs:
        done = run_task(
            loaded.model,
            tokenizer,
            spec,
            options,
            device=device,
            render_chat=render_chat,
            encode_chat=encode_chat,
            decoder=decoder,
        )
        results[spec.name] = done.metrics
        ran[spec.name] = {"kind": done.kind, "config": done.config, "samples": done.samples}
        if done.metrics.get("truncated"):
            notes.append(f"{spec.name}: {done.metrics['truncated']} prompts were cut to fit the context")
    config = {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot, "chat": chat,
              "temperature": temperature, "seed": seed, "max_new_tokens": max_new_tokens,
              "device": str(device), "quantize": decode.quantize}  # fmt: skip
    return EvalReport(
        model=str(loaded.directory),
        results=results,
        notes=notes,
        fingerprint=model_fingerprint(loaded.model),
        tasks=ran,
        config=config,
    )


# -- reporting --------------------------------------------------------------------------------------------


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table of {name: {metric: value}} (metrics ending in _stderr shown as +-)."""
    lines = [f"{'task':<28} {'metric':<16} {'value':>12}  {'stderr':>8}"]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr")
            shown = f"{value:>12,}" if isinstance(value, int) else f"{value:>12.4f}"
            lines.append(f"{name:<28} {metric:<16} {shown}  {'' if stderr is None else f'{stderr:>8.4f}'}")
    return "\n".join(lines)


def write_results(results: dict, path: str | Path) -> Path:
    """Write results as JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
