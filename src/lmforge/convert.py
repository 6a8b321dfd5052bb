"""Hugging Face folders to and from lmforge checkpoints: the file-level verbs behind ``lmforge export`` and
``lmforge import``.

``model/hf.py`` does the conversion itself (key tables, ``config.json`` <-> ``ModelConfig``, state dicts, the
check against transformers); this module reads and writes the folders around it: checkpoints (through
``lmforge.checkpoint``), weight files, the tokenizer and the model card, atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.checkpoint import TOKENIZER, load_model, save_checkpoint
from lmforge.config import Config, TrainConfig
from lmforge.errors import CheckpointError, ExportError
from lmforge.files import save_safetensors, write_text_atomic
from lmforge.infer.chat import TOKENIZER_CONFIG, read_chat_template, read_tokenizer_config
from lmforge.model.hf import (
    architecture_for,
    from_hf_state_dict,
    hf_config,
    hf_tokenizer_config,
    model_config_from_hf,
    to_hf_state_dict,
    verify_with_transformers,
)
from lmforge.model.mup import fold_mup


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    architecture: str  # LlamaForCausalLM or GPT2LMHeadModel
    max_abs_diff: float | None  # max |logits difference| against transformers; None when not verified
    verify_note: str  # how it was verified, or why not


@dataclass(frozen=True)
class ImportResult:
    checkpoint: Path  # the lmforge checkpoint folder written
    architecture: str  # what lmforge would export it as again
    tokenizer: bool  # whether the folder's tokenizer.json came along
    chat_template: bool = False  # whether it carries a chat template (kept in tokenizer_config.json)


# -- export ------------------------------------------------------------------------------------------------

_EOS = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[EOS]", "<|im_end|>")
_BOS = ("<s>", "<bos>", "<|bos|>", "<|startoftext|>", "<|begin_of_text|>", "[BOS]")
_PAD = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")


def special_tokens(tokenizer_file: Path) -> dict[str, tuple[str, int] | None]:
    """The bos/eos/pad tokens (text, id) of a ``tokenizers`` JSON file, recognised by their usual spellings
    among its special tokens. A tokenizer without a pad token pads with eos."""
    try:
        added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{tokenizer_file}: unreadable tokenizer ({exc})") from None
    specials = {t["content"]: t["id"] for t in added if t.get("special", True)}

    def first(names: tuple[str, ...]) -> tuple[str, int] | None:
        return next(((n, specials[n]) for n in names if n in specials), None)

    eos = first(_EOS)
    return {"bos": first(_BOS), "eos": eos, "pad": first(_PAD) or eos}


def write_tokenizer_files(
    tokenizer_file: Path, out: Path, max_seq_len: int, chat_template: str | None
) -> dict[str, int | None]:
    """``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template) into ``out``; the ids
    of the bos/eos/pad tokens for ``config.json``."""
    tokens = special_tokens(tokenizer_file)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_file.resolve() != (out / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_file, out / TOKENIZER)
    texts = {k: (v[0] if v is not None else None) for k, v in tokens.items()}
    tok_config = hf_tokenizer_config(texts, max_seq_len, chat_template)
    write_text_atomic(out / TOKENIZER_CONFIG, json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    return {k: (v[1] if v is not None else None) for k, v in tokens.items()}


def export_model(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    verify: bool = True,
    format: str = "hf",
    dtype: str = "f32",
) -> ExportResult:
    """Write a Hugging Face folder (model.safetensors, config.json, tokenizer, README.md) for a checkpoint
    or a run's newest valid checkpoint; verify it against ``transformers`` when installed. Atomic: the folder
    appears complete or not at all. ``format="gguf"`` writes one llama.cpp file instead (``export_gguf``)."""
    if format == "gguf":
        return export_gguf(checkpoint_path, out_dir, verify=verify, dtype=dtype)
    if format != "hf":
        raise ExportError(f"format={format!r} is not one of hf, gguf")

    out_dir = Path(out_dir)
    if out_dir.exists() and not (
        out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "config.json").exists())
    ):
        raise ExportError(f"{out_dir}: exists and is not an exported model folder; choose another OUT_DIR")
    model, config, ckpt_dir = load_model(checkpoint_path)
    model = fold_mup(model.eval())  # muP's multipliers into the weights: a standard model, the same logits
    cfg = model.cfg
    architecture = architecture_for(cfg)
    state = to_hf_state_dict(model)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        token_ids = {}
        if (ckpt_dir / TOKENIZER).is_file():
            template = read_chat_template(ckpt_dir)  # what the model was fine-tuned with, if it was
            source = template.source if template is not None else None
            token_ids = write_tokenizer_files(ckpt_dir / TOKENIZER, tmp, cfg.max_seq_len, source)
        config_json = hf_config(cfg, token_ids=token_ids, dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else None
        for card in ([run_dir / "MODEL_CARD.md"] if run_dir is not None else []) + [
            ckpt_dir / "MODEL_CARD.md"
        ]:
            if card.is_file():
                shutil.copyfile(card, tmp / "README.md")
                break
        diff, note = verify_with_transformers(model, tmp) if verify else (None, "not verified (--no-verify)")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir=out_dir, architecture=architecture, max_abs_diff=diff, verify_note=note)


def export_gguf(
    checkpoint_path: str | Path, out_file: str | Path, *, verify: bool = True, dtype: str = "f32"
) -> ExportResult:
    """Write one GGUF file (weights in ``dtype``, hyper-parameters, tokenizer, chat template) that llama.cpp
    runs; verify it with llama.cpp when ``llama-cpp-python`` is installed. Atomic, like the folder export."""
    from lmforge.model import gguf

    out_file = Path(out_file)
    if out_file.is_dir():
        raise ExportError(
            f"{out_file}: is a folder; GGUF export writes one file (e.g. {out_file / 'model.gguf'})"
        )
    if dtype not in gguf.DTYPES:
        raise ExportError(f"--dtype {dtype} is not one of {', '.join(gguf.DTYPES)}")
    gguf.require_gguf()
    model, config, ckpt_dir = load_model(checkpoint_path)
    model = fold_mup(model.eval())  # muP's multipliers into the weights: a standard model, the same logits
    cfg = model.cfg
    arch = gguf.gguf_architecture(cfg)  # refuses shapes llama.cpp cannot run, naming the switch
    vocab, template = None, None
    if (ckpt_dir / TOKENIZER).is_file():
        tokenizer_json = gguf.read_tokenizer_json(ckpt_dir / TOKENIZER)
        ids = {k: (v[1] if v is not None else None) for k, v in special_tokens(ckpt_dir / TOKENIZER).items()}
        vocab = gguf.gguf_vocab(tokenizer_json, ids, cfg.vocab_size, str(ckpt_dir / TOKENIZER))
        chat = read_chat_template(ckpt_dir)  # what the model was fine-tuned with, if it was
        template = chat.source if chat is not None else None
    created = [p for p in (out_file.parent, *out_file.parent.parents) if not p.exists()]  # deepest first
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f"{out_file.name}.tmp-{os.getpid()}")
    try:
        gguf.write_gguf(
            tmp,
            cfg,
            model.state_dict(),
            dtype=dtype,
            vocab=vocab,
            chat_template=template,
            name=ckpt_dir.name,
        )
        diff, note = (
            gguf.verify_with_llama_cpp(model, tmp, dtype) if verify else (None, "not verified (--no-verify)")
        )
        os.replace(tmp, out_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in created:  # a failed export leaves no empty folders behind either
            try:
                folder.rmdir()
            except OSError:  # something else was written there meanwhile: it stays
                break
        raise
    return ExportResult(
        out_dir=out_file, architecture=f"gguf {arch} {dtype}", max_abs_diff=diff, verify_note=note
    )


# -- import ------------------------------------------------------------------------------------------------


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise CheckpointError(f"{folder}: missing weight file {path.name}")
        try:
            if path.suffix == ".safetensors":
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except (SafetensorError, OSError, RuntimeError, EOFError) as exc:
            raise CheckpointError(f"{path}: unreadable weights ({str(exc).splitlines()[0]})") from None

    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / single).is_file():
            return load(folder / single)
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{folder / index}: malformed index ({exc})") from None
            state = {}
            for name in files:
                state.update(load(folder / name))
            return state
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin")


def read_hf_folder(hf_dir: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The lmforge Config and weights of a Hugging Face Llama or GPT-2 folder, in memory (nothing written)."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such Hugging Face model folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: malformed JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path}: must hold a JSON object")
    cfg = model_config_from_hf(hf, str(config_path))
    state = from_hf_state_dict(_read_hf_weights(folder), cfg, str(folder))
    # A shorter default training window where the model's learned positions stop earlier.
    return Config(model=cfg, train=TrainConfig(seq_len=min(TrainConfig().seq_len, cfg.max_seq_len))), state


def import_model(hf_dir: str | Path, out_dir: str | Path) -> ImportResult:
    """Read a Hugging Face Llama or GPT-2 folder into an lmforge checkpoint folder ``out_dir``."""
    config, state = read_hf_folder(hf_dir)
    tokenizer = Path(hf_dir) / TOKENIZER
    tokenizer_file = tokenizer if tokenizer.is_file() else None
    tok_config = read_tokenizer_config(hf_dir)  # with a chat_template.jinja folded in, so the template stays
    extra = {TOKENIZER_CONFIG: json.dumps(tok_config, indent=2, ensure_ascii=False)} if tok_config else None
    checkpoint = save_checkpoint(
        Path(out_dir), model_state=state, config=config, tokenizer_file=tokenizer_file, extra_files=extra
    )
    return ImportResult(
        checkpoint=checkpoint,
        architecture=architecture_for(config.model),
        tokenizer=tokenizer_file is not None,
        chat_template=read_chat_template(checkpoint) is not None,
    )
