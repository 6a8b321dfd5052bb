"""Checkpoint folders of one writer: written atomically, checksummed, and validated before use.

Layout of one checkpoint (``RUN/checkpoints/step_00000100/``)::

    model.safetensors    model weights (a tied head is stored once, under embed_tokens)
    config.yaml          the resolved Config of the run
    train_state.pt       optimizer, scheduler, loader and RNG state, step (optional; torch.load weights_only)
    tokenizer.json       the run's tokenizer (optional)
    tokenizer_config.json  its settings and chat template, copied when one lies beside the tokenizer (optional)
    manifest.json        size and sha256 of every file above; written last, so its presence marks completion

A checkpoint is written into ``step_XXXXXXXX.tmp-<pid>`` and renamed into place, so an interrupted write never
leaves a folder that looks complete. A folder whose files do not match its manifest is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import Config, ModelConfig, config_from_dict, load_yaml, save_config
from lmforge.errors import CheckpointError
from lmforge.files import save_safetensors

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TRAIN_STATE = "train_state.pt"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # the tokenizer's settings and chat template, when it has them


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_tokenizer_config(tokenizer_file: str | Path, folder: Path) -> None:
    """Copy the ``tokenizer_config.json`` beside ``tokenizer_file`` (its chat template) into ``folder``."""
    config = Path(tokenizer_file).with_name(TOKENIZER_CONFIG)
    if config.is_file():
        shutil.copyfile(config, folder / TOKENIZER_CONFIG)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_state_for_saving(state: dict[str, Any], tied: bool) -> dict[str, Any]:
    """Contiguous CPU tensors, with the tied head dropped (safetensors refuses shared storage)."""
    out = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if tied:
        out.pop("lm_head.weight", None)
    return out


def save_checkpoint(
    directory: str | Path,
    *,
    model_state: dict[str, Any],
    config: Config,
    train_state: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path. ``extra_files`` maps name -> text content."""
    import torch

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_safetensors(model_state_for_saving(model_state, config.model.tie_embeddings), tmp / WEIGHTS)
        save_config(config, tmp / CONFIG)
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
            copy_tokenizer_config(tokenizer_file, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        manifest = {"format": "lmforge-checkpoint/1", "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _fsync_dir(tmp)
        if directory.exists():
            old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def verify_checkpoint(directory: str | Path) -> list[str]:
    """Problems with a checkpoint folder (missing manifest, missing files, size or checksum mismatch)."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return [f"{directory}: no {MANIFEST} (an interrupted write, or not an lmforge checkpoint)"]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{manifest_path}: unreadable manifest ({exc})"]
    problems = []
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)"
            )
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: checksum mismatch (corrupt)")
    return problems


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Completed-looking checkpoint folders of a run, oldest first (validity is not checked here)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name
    )


@dataclass
class FoundCheckpoint:
    path: Path
    skipped: list[str]  # problems of newer checkpoints that were passed over


def latest_valid_checkpoint(run_dir: str | Path) -> FoundCheckpoint | None:
    """The newest checkpoint of a run whose files match their manifest; the problems of any skipped."""
    skipped: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return FoundCheckpoint(path, skipped)
        skipped.extend(problems)
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints of a run (and leftovers of interrupted writes
    from other processes); returns what was deleted. The newest checkpoint is never deleted."""
    keep_last = max(1, keep_last)
    removed = list_checkpoints(run_dir)[:-keep_last]
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        removed += [
            p for p in root.iterdir() if ".tmp-" in p.name and not p.name.endswith(f".tmp-{os.getpid()}")
        ]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def find_resume_checkpoint(run_dir: str | Path, resume: str | Path | None) -> FoundCheckpoint | None:
    """The checkpoint to resume from: None (``resume`` is None, or "auto" with no valid checkpoint yet);
    for "auto" the newest valid one of ``run_dir`` (with the problems of damaged newer ones); else the
    checkpoint or run folder ``resume`` names."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = latest_valid_checkpoint(run_dir)
        if found is None:
            damaged = [p for c in list_checkpoints(run_dir) for p in verify_checkpoint(c)]
            if damaged:
                raise CheckpointError(
                    f"{run_dir}: no valid checkpoint to resume from:\n  " + "\n  ".join(damaged)
                )
        return found
    return FoundCheckpoint(resolve_checkpoint(resume), [])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest valid checkpoint). Raises CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    if (path / MANIFEST).is_file() or (path / WEIGHTS).is_file():
        problems = verify_checkpoint(path) if (path / MANIFEST).is_file() else []
        if problems:
            raise CheckpointError("invalid checkpoint:\n  " + "\n  ".join(problems))
        return path
    found = latest_valid_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path}: neither a checkpoint (no {WEIGHTS}) nor a run folder with a valid checkpoint"
        )
    return found.path


def load_config_from(directory: str | Path) -> Config:
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {CONFIG}")
    return config_from_dict(load_yaml(directory / CONFIG))


def load_model_state(directory: str | Path, config: Config) -> dict[str, Any]:
    """Weights from ``model.safetensors``, with the tied head restored as the same tensor."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        sharded = (Path(directory) / "dcp").is_dir()  # written by several processes (sharded.py)
        hint = f"; it is sharded: lmforge consolidate {directory} OUT_DIR writes one" if sharded else ""
        raise CheckpointError(f"{directory}: no {WEIGHTS}{hint}")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    if config.model.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    import torch

    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def require_train_state(directory: str | Path) -> dict[str, Any]:
    """The loop state of a checkpoint that is to resume a run (a weights-only checkpoint cannot)."""
    state = load_train_state(directory)
    if state is None:
        raise CheckpointError(
            f"{directory} has no {TRAIN_STATE}: it holds weights only and cannot resume a run"
        )
    return state


def model_config_differences(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """``model.<field>: checkpoint X, config Y`` for every field that differs (the preset name aside)."""
    saved_fields, current_fields = dataclasses.asdict(saved), dataclasses.asdict(current)
    return [
        f"model.{name}: checkpoint {saved_fields[name]!r}, config {current_fields[name]!r}"
        for name in saved_fields
        if name != "preset" and saved_fields[name] != current_fields[name]
    ]


def check_model_matches(directory: str | Path, model_cfg: ModelConfig) -> None:
    """Refuse, naming every differing field, a checkpoint written for another model shape."""
    differences = model_config_differences(load_config_from(directory).model, model_cfg)
    if differences:
        raise CheckpointError(
            f"{directory} was written for a different model:\n  "
            + "\n  ".join(differences)
            + "\n  resume with the checkpoint's model settings, or start a new run (another train.out_dir)"
        )


def load_weights_into(model, state: dict[str, Any], model_cfg: ModelConfig, where: str | Path) -> None:
    """Load a full state dict into an unwrapped model; a tied head may be absent (it is the embedding)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model_cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_model(path: str | Path, *, device: str = "cpu"):
    """Build the model of a checkpoint (or a run's newest valid one) and load its weights.
    Returns (model, config, checkpoint folder)."""
    from lmforge.model.transformer import build_model

    directory = resolve_checkpoint(path)
    config = load_config_from(directory)
    state = load_model_state(directory, config)
    model = build_model(config.model, device="meta")
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives the head its own tensor; a tied head must share the embedding's
    load_weights_into(model, state, config.model, directory / WEIGHTS)
    model.init_buffers()
    return model, config, directory
