"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): each rank writes its own part.

Layout of one sharded checkpoint (``RUN/checkpoints/step_00000100/``)::

    dcp/                 DCP's files: model and optimizer, one file per writing rank plus .metadata
    rank_00000.pt ...    each rank's own state (data-loader position, RNG), torch.load weights_only
    train_state.pt       state shared by all ranks (step, scheduler), written by rank 0
    config.yaml          the resolved Config of the run
    tokenizer.json       the run's tokenizer (optional)
    manifest.json        size and sha256 of every file above and the writers' world size; written last by
                         rank 0, so its presence marks completion (``checkpoint.folder.verify_checkpoint``)

Model and optimizer go through ``get_state_dict`` / ``set_state_dict``, which name every tensor by its
parameter name whatever the wrapping (plain, DDP, FSDP2), so a checkpoint written by N processes loads on
M processes (DCP reshards on load). ``consolidate`` turns one into an ordinary checkpoint with a single
``model.safetensors``, which ``lmforge export`` and generation read. The folder must be on storage every
node can see.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge.checkpoint.folder import (
    CONFIG,
    MANIFEST,
    TOKENIZER,
    TRAIN_STATE,
    check_model_matches,
    copy_tokenizer_config,
    load_config_from,
    save_checkpoint,
    sha256_file,
)
from lmforge.config import Config, ModelConfig, save_config
from lmforge.distributed.parallelize import World
from lmforge.errors import CheckpointError

SHARDS = "dcp"
FORMAT = "lmforge-sharded-checkpoint/1"


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / SHARDS / ".metadata").is_file()


def _barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def _no_dist() -> bool:
    """DCP runs without collectives in a single process (no process group)."""
    return not dist.is_initialized()


def _dcp_save(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():  # DCP warns on every single-process save: an ordinary case here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=path, no_dist=_no_dist())


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():  # as above, for a resume on one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=_no_dist())


def _fsync_tree(root: Path) -> dict[str, dict]:
    """fsync every file under ``root`` and return the manifest entries, keyed by path relative to root."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def save_sharded(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    world: World,
    train_state: dict[str, Any] | None = None,
    rank_state: dict[str, Any] | None = None,
    tokenizer_file: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a sharded checkpoint; every rank calls this (it is collective). The folder is assembled under
    ``<name>.tmp-sharded`` and renamed by rank 0 once every rank has written, so an interrupted save never
    leaves a folder that looks complete."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-sharded")
    if world.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer)
    _dcp_save({"model": model_state, "optim": optim_state}, tmp / SHARDS)
    torch.save(rank_state or {}, tmp / rank_state_name(world.rank))
    if world.is_main:
        torch.save(train_state or {}, tmp / TRAIN_STATE)
        save_config(config, tmp / CONFIG)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
            copy_tokenizer_config(tokenizer_file, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    _barrier(world)
    if world.is_main:
        manifest = {"format": FORMAT, "world_size": world.world_size, "files": _fsync_tree(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if directory.exists():
            old = directory.with_name(f"{directory.name}.old-sharded")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    _barrier(world)
    return directory


@dataclass
class Restored:
    """What a resume needs beyond the weights and optimizer (which are loaded in place)."""

    train_state: dict[str, Any]  # shared state written by rank 0 (step, scheduler, ...)
    rank_states: list[dict[str, Any]]  # each writing rank's own state, indexed by its rank
    saved_world_size: int

    def rank_state(self, world: World) -> dict[str, Any] | None:
        """This rank's own saved state when the world size is unchanged; None after resharding."""
        return self.rank_states[world.rank] if self.saved_world_size == world.world_size else None


def _check_shapes(directory: Path, model_state: dict[str, Any]) -> None:
    """Compare the checkpoint's tensor shapes with the model's (DTensors report their global shape)."""
    metadata = dcp.FileSystemReader(directory / SHARDS).read_metadata().state_dict_metadata
    problems = []
    for name, tensor in model_state.items():
        saved = metadata.get(f"model.{name}")
        if saved is None:
            problems.append(f"{name}: not in the checkpoint")
        elif hasattr(saved, "size") and tuple(saved.size) != tuple(tensor.shape):
            problems.append(f"{name}: checkpoint {tuple(saved.size)}, model {tuple(tensor.shape)}")
    if problems:
        raise CheckpointError(f"{directory} does not match the model:\n  " + "\n  ".join(problems[:10]))


def load_sharded(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    world: World,
    model_cfg: ModelConfig | None = None,
) -> Restored:
    """Load a sharded checkpoint into ``model`` (and ``optimizer``) in place, on any number of processes;
    every rank calls this. Raises CheckpointError, before touching the model, for another model shape."""
    directory = Path(directory)
    if not is_sharded(directory):
        raise CheckpointError(f"{directory}: not a sharded checkpoint (no {SHARDS}/.metadata)")
    if model_cfg is not None:
        check_model_matches(directory, model_cfg)
    if optimizer is None:
        model_state = get_model_state_dict(model)
        _check_shapes(directory, model_state)
        state = {"model": model_state}
        _dcp_load(state, directory / SHARDS)
        set_model_state_dict(model, state["model"])
    else:
        # The per-parameter state (moments, step counts) is read by name; the groups stay this optimizer's:
        # their settings come from the config, and their split (by device mesh) from this run's parallelism.
        model_state, optim_state = get_state_dict(model, optimizer)
        _check_shapes(directory, model_state)
        state = {"model": model_state, "optim": {"state": optim_state["state"]}}
        _dcp_load(state, directory / SHARDS)
        optim_state = {"state": state["optim"]["state"], "param_groups": optim_state["param_groups"]}
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state)
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    saved_world_size = int(manifest.get("world_size", 1))
    rank_states = [
        torch.load(directory / rank_state_name(r), map_location="cpu", weights_only=True)
        for r in range(saved_world_size)
    ]
    train_state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
    return Restored(train_state=train_state, rank_states=rank_states, saved_world_size=saved_world_size)


def optimizer_state_by_name(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> dict:
    """Rename a plain ``optimizer.state_dict()`` written by one process (parameters numbered in the order its
    optimizer held them) to the parameter-name keys ``set_state_dict`` expects, in ``optimizer``'s groups.

    When ``optimizer`` was built the same way (the same group sizes), the numbering is its own order. Else
    its groups are split further by device mesh (``train.optim.param_groups`` under expert or tensor
    parallelism), and the one process numbered them as that function orders an unsharded model: the
    trainable matrices in model order, then the vectors. Each group takes its settings from the saved group
    of its first parameter."""
    from lmforge.distributed.parallelize import unwrap

    params = [(name, p) for name, p in unwrap(model).named_parameters() if p.requires_grad]
    name_of = {id(p): name for name, p in params}
    if [len(g["params"]) for g in saved["param_groups"]] == [
        len(g["params"]) for g in optimizer.param_groups
    ]:
        names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    else:
        names = [name for name, p in params if p.dim() >= 2] + [name for name, p in params if p.dim() < 2]
    if len(names) != sum(len(g["params"]) for g in saved["param_groups"]):
        raise CheckpointError("the saved optimizer holds a different number of parameters than this one")
    renamed_state = {names[int(i)]: s for i, s in saved["state"].items()}
    saved_group_of = {names[int(i)]: g for g in saved["param_groups"] for i in g["params"]}
    groups = []
    for group in optimizer.param_groups:
        group_names = [name_of[id(p)] for p in group["params"]]
        settings = saved_group_of[group_names[0]] if group_names else {}
        groups.append({**settings, "params": group_names})
    return {"state": renamed_state, "param_groups": groups}


def load_full_into(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
) -> None:
    """Load an ordinary (single-process) checkpoint's full tensors into a wrapped model and its optimizer:
    every rank passes the same full state and keeps its own shard. This is how a run written by one
    process resumes on several."""
    options = StateDictOptions(full_state_dict=True)
    if optimizer is None or optimizer_state is None:
        set_model_state_dict(model, model_state, options=options)
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state_by_name(optimizer_state, optimizer, model),
        options=options,
    )


def consolidate(directory: str | Path, out_dir: str | Path) -> Path:
    """Gather a sharded checkpoint's weights into an ordinary checkpoint folder (one ``model.safetensors``,
    config, tokenizer, manifest) in this single process. The optimizer state is left behind."""
    from lmforge.model.transformer import build_model

    directory = Path(directory)
    if not is_sharded(directory):
        raise CheckpointError(f"{directory}: not a sharded checkpoint (no {SHARDS}/.metadata)")
    config = load_config_from(directory)
    model = build_model(config.model, device="meta")
    model.to_empty(device="cpu")
    if config.model.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    state = model.state_dict()
    _check_shapes(directory, state)
    _dcp_load({"model": state}, directory / SHARDS)
    tokenizer = directory / TOKENIZER
    return save_checkpoint(
        out_dir,
        model_state=state,
        config=config,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
    )
