"""One checkpoint manager for a run: save, verify, find, load, retain and roll back, behind the same calls
whether one process writes ``model.safetensors`` (``folder.py``) or several write DCP shards (``sharded.py``).

What a checkpoint holds is exactly the state the training step depends on: model, optimizer, grad scaler,
the loop's counters and guards, the data loader's position and the RNG states. Loader position and RNG are
per process; after a change of world size every rank takes rank 0's (exact for a loader whose state counts
global batches, as ``TokenLoader``'s does).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint import folder, sharded
from lmforge.config import Config
from lmforge.distributed.parallelize import World
from lmforge.errors import CheckpointError, ConfigError


def rng_state() -> dict[str, Any]:
    """The states of every generator a step may draw from (torch, Python, numpy, CUDA)."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": pos, "gauss": (has_gauss, cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    has_gauss, cached = numpy_state["gauss"]
    np.random.set_state(
        ("MT19937", numpy_state["keys"].numpy().astype("uint32"), numpy_state["pos"], has_gauss, cached)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resume(run_dir: str | Path, resume: str | Path | None) -> folder.FoundCheckpoint | None:
    """The checkpoint a run starts from: ``resume`` None (a fresh run, refused over an existing one), "auto"
    (the newest valid one, or a fresh start) or a checkpoint/run folder."""
    if resume is None and folder.list_checkpoints(run_dir):
        raise ConfigError(
            f"train.out_dir={str(run_dir)!r} already holds checkpoints: continue it with --resume auto, "
            "or choose another train.out_dir"
        )
    return folder.find_resume_checkpoint(run_dir, resume)


class CheckpointManager:
    """The checkpoints of one run folder (``RUN/checkpoints/step_XXXXXXXX``), written by this run's world."""

    def __init__(
        self, run_dir: str | Path, *, config: Config, world: World, tokenizer_file: str | Path | None = None
    ):
        self.run_dir = Path(run_dir)
        self.config = config
        self.world = world
        self.tokenizer_file = tokenizer_file

    # -- finding ----------------------------------------------------------------------------------------------

    def latest(self) -> folder.FoundCheckpoint | None:
        """The newest checkpoint whose files match their manifest (with the problems of damaged newer ones)."""
        return folder.latest_valid_checkpoint(self.run_dir)

    # -- saving -----------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        loop_state: dict[str, Any],
        loader_state: dict[str, Any],
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` (every rank calls this) and keep the newest ``train.keep_last``.
        A failed write (disk full, permissions) leaves every earlier checkpoint as it was and says so."""
        directory = self.run_dir / "checkpoints" / folder.step_dir_name(step)
        shared = {**loop_state, "step": step, "scaler": scaler.state_dict() if scaler is not None else None}
        own = {"loader": loader_state, "rng": rng_state()}
        try:
            if self.world.distributed:  # every rank writes its shard; loader and RNG are per rank
                sharded.save_sharded(
                    directory,
                    model=model,
                    optimizer=optimizer,
                    config=self.config,
                    world=self.world,
                    train_state=shared,
                    rank_state=own,
                    tokenizer_file=self.tokenizer_file,
                    extra_files=extra_files,
                )
            else:
                folder.save_checkpoint(
                    directory,
                    model_state=model.state_dict(),
                    config=self.config,
                    train_state={**shared, **own, "optimizer": optimizer.state_dict()},
                    tokenizer_file=self.tokenizer_file,
                    extra_files=extra_files,
                )
        except OSError as exc:
            previous = self.latest()
            kept = f"; the previous checkpoint {previous.path} is intact" if previous else ""
            raise CheckpointError(f"could not write checkpoint {directory}: {exc}{kept}") from None
        if self.world.is_main:
            folder.prune_checkpoints(self.run_dir, self.config.train.keep_last)
        return directory

    # -- loading ----------------------------------------------------------------------------------------------

    def load(
        self,
        directory: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scaler: torch.amp.GradScaler | None,
    ) -> dict[str, Any]:
        """Load weights, optimizer and scaler state in place (resharding between world sizes where needed);
        return the loop state with this rank's ``loader`` and ``rng`` (``set_rng_state`` applies it)."""
        directory = Path(directory)
        folder.check_model_matches(directory, self.config.model)
        if sharded.is_sharded(directory):
            restored = sharded.load_sharded(directory, model=model, optimizer=optimizer, world=self.world)
            own = restored.rank_state(self.world) or restored.rank_states[0]
            state = {**restored.train_state, **own}
        else:
            saved = folder.load_config_from(directory)
            weights = folder.load_model_state(directory, saved)
            state = folder.require_train_state(directory)
            if self.world.distributed:  # one writer, several readers: each keeps its part
                sharded.load_full_into(
                    model, optimizer, model_state=weights, optimizer_state=state.get("optimizer")
                )
            else:
                folder.load_weights_into(model, weights, self.config.model, directory)
                if optimizer is not None:
                    optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        return state
