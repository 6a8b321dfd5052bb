"""Set a run up once, in a fixed order, into one frozen ``Run``; ``train.loop`` then only steps it.

The recipe (``setup_run``):
  1. the world (processes, device) and the data, with every check that can fail before weights exist;
  2. the plan (strategy, micro-batch, accumulation, activation checkpointing) resolved once, then the
     config frozen with it and saved;
  3. the checkpoint to resume from, if any, and the run folder checked writable;
  4. the model: built on ``meta``, materialised on the device, initialised (or left for the checkpoint),
     adapted (fine-tuning; or loaded from ``train.init_from``, continued pre-training), then parallelized from outside (``distributed.parallelize``);
  5. the optimizer and grad scaler, built after wrapping, and the checkpoint manager.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint import FoundCheckpoint
from lmforge.checkpoint.manager import CheckpointManager, find_resume
from lmforge.config import Config, config_to_dict, save_config, validate
from lmforge.data.batch import Batch, BatchLoader
from lmforge.distributed.parallelize import (
    World,
    close_world,
    device_memory_bytes,
    init_world,
    is_sharded,
    parallelize,
)
from lmforge.errors import ConfigError
from lmforge.files import write_text_atomic
from lmforge.model.info import model_flops_per_token
from lmforge.model.transformer import Transformer, build_model
from lmforge.plan.hardware import hardware_summary, peak_flops
from lmforge.plan.training import Plan, apply_plan, plan_training
from lmforge.train.autoplan import refine_plan_by_trial
from lmforge.train.data import RunData, build_loader, resolve_data, validation_batches
from lmforge.train.energy import EnergyMeter, meter_for_run
from lmforge.train.metrics import RunLogger
from lmforge.train.objectives import LANGUAGE_MODELING, Objective
from lmforge.train.optim import build_optimizer


@dataclass(frozen=True)
class Task:
    """What a fine-tuning variant supplies instead of prepared pre-training data."""

    loader: BatchLoader
    val_batches: Callable[[], Iterable[Batch]]
    objective: Objective = LANGUAGE_MODELING
    adapt_model: Callable[[Transformer], nn.Module] | None = None  # load base weights, LoRA, add a head
    lineage: dict | None = (
        None  # for the model card: the base model's card, this stage's data (train/card.py)
    )


@dataclass(frozen=True)
class Run:
    """Everything a training loop needs, resolved once. The loop's own state (step, guards) lives in the loop."""

    cfg: Config  # resolved and planned: what config.yaml and every checkpoint record
    plan: Plan | None  # the planner's layout (``parallel.strategy: auto``), None when set by hand
    world: World
    data: RunData
    loader: BatchLoader
    val_batches: Callable[[], Iterable[Batch]]
    objective: Objective
    model: nn.Module  # parallelized (the same object for one process and FSDP, a DDP wrapper for DDP)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    checkpoints: CheckpointManager
    log: RunLogger
    resume_from: FoundCheckpoint | None
    grad_accum: int
    flops_per_token: float
    peak_flops: float | None
    started: float  # time.perf_counter() when the run was set up
    energy: EnergyMeter  # this process's device energy (train.energy), read at every logging step
    lineage: dict | None = None  # a fine-tuning task's lineage, for the model card

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.cfg.train.micro_batch * self.cfg.train.seq_len * self.world.dp_size

    @property
    def writes_text(self) -> bool:
        """Samples and task scores need a tokenizer and a whole language model on this process."""
        return (
            self.data.tokenizer is not None
            and self.objective is LANGUAGE_MODELING
            and not is_sharded(self.model)  # FSDP shards: single-rank generation cannot run
        )

    def close(self) -> None:
        self.log.close()
        close_world(self.world)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def accumulation_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step so one step sees ``train.global_batch_tokens`` tokens."""
    tokens_per_micro = cfg.train.micro_batch * cfg.train.seq_len * dp_size
    if cfg.train.global_batch_tokens is None:
        return 1
    steps, remainder = divmod(cfg.train.global_batch_tokens, tokens_per_micro)
    if steps < 1 or remainder:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"train.micro_batch x train.seq_len x processes = {cfg.train.micro_batch} x {cfg.train.seq_len} x "
            f"{dp_size} = {tokens_per_micro}"
        )
    return steps


def check_writable(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training when the run folder cannot be written or its disk cannot hold a checkpoint."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.out_dir={str(run_dir)!r} is not writable ({exc.strerror or exc})") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(
            f"train.out_dir={str(run_dir)!r}: {free / 2**20:.0f} MiB free on its disk, but one checkpoint "
            f"needs about {needed_bytes / 2**20:.0f} MiB; free space or choose another train.out_dir"
        )


def planned(cfg: Config, world: World) -> Plan | None:
    """The planner's layout for ``parallel.strategy: auto`` (tensor parallelism is laid out by hand)."""
    if cfg.parallel.strategy != "auto" or world.tp > 1:
        return None
    memory = (
        int(cfg.parallel.device_memory_gib * 2**30)
        if cfg.parallel.device_memory_gib is not None
        else device_memory_bytes(world.device, world)
    )
    return plan_training(
        cfg, device_kind=world.device.type, world_size=world.world_size, device_memory_bytes=memory
    )


def strategy_of(cfg: Config, plan: Plan | None, world: World) -> str:
    """The one place ``parallel.strategy: auto`` is resolved: the plan's choice, else DDP on several
    processes (FSDP over the data-parallel dimension with tensor parallelism)."""
    if plan is not None:
        return plan.strategy
    if cfg.parallel.strategy != "auto":
        return cfg.parallel.strategy
    if world.tp > 1:
        return "fsdp"
    return "ddp" if world.distributed else "single"


def materialise(cfg: Config, device: torch.device, *, initialise: bool) -> Transformer:
    """The model built on ``meta`` (nothing allocated), moved to ``device``, then initialised from
    ``train.seed`` (a fresh run) or left for a checkpoint to fill (a resumed one)."""
    model = build_model(cfg.model, device="meta")
    model.to_empty(device=device)
    if initialise:
        model.init_weights(torch.Generator(device=device).manual_seed(cfg.train.seed))
    else:
        model.tie_weights()
        model.init_buffers()
    return model


def base_model(cfg: Config) -> tuple[Config, Callable[[nn.Module], nn.Module] | None]:
    """With ``train.init_from`` (continued pre-training): the config with the base model's shape (keeping
    ``model.dropout``) and an ``adapt_model`` that loads the base weights; else ``(cfg, None)``."""
    if cfg.train.init_from is None:
        return cfg, None
    from lmforge.infer.loading import load_for_inference

    loaded = load_for_inference(cfg.train.init_from, device=torch.device("cpu"))
    shape = dataclasses.replace(loaded.config.model, dropout=cfg.model.dropout)
    state = loaded.model.state_dict()

    def load_base(model: nn.Module) -> nn.Module:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        model.tie_weights()
        return model

    cfg = dataclasses.replace(cfg, model=shape)
    validate(cfg)  # the base's shape against the rest of the config (tensor parallelism, seq_len, ...)
    return cfg, load_base


def model_for_run(
    cfg: Config,
    plan: Plan | None,
    world: World,
    fresh: bool,
    task: Task | None,
    log: RunLogger,
    base_weights: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, Config, Plan | None]:
    """The model on the device, initialised (a fresh run) or left for the checkpoint, adapted by the task
    (or given the base weights of ``train.init_from``); and the plan made final with it (a trial step on a GPU)
    and applied to the config."""
    adapt = task.adapt_model if task else (base_weights if fresh else None)
    torch.manual_seed(cfg.train.seed)  # dropout and anything else drawing from the global generators
    random.seed(cfg.train.seed)
    model = materialise(cfg, world.device, initialise=fresh or adapt is not None)
    if adapt is not None:
        model = adapt(model)
    if plan is not None:
        if world.device.type == "cuda" and plan.strategy != "fsdp" and task is None:
            plan = refine_plan_by_trial(model, cfg, plan, world)  # the device's own answer
        cfg = apply_plan(cfg, plan)
        log.info(f"plan (parallel.strategy=auto): {plan.describe()}")
    return model, cfg, plan


def write_run_files(run_dir: Path, cfg: Config, plan: Plan | None, world: World) -> None:
    """The resolved config (and the plan) in the run folder, as every checkpoint also records it."""
    if not world.is_main:
        return
    save_config(cfg, run_dir / "config.yaml")
    if plan is not None:
        write_text_atomic(run_dir / "plan.json", json.dumps(dataclasses.asdict(plan), indent=2) + "\n")


def start_line(run: Run) -> str:
    tc, world = run.cfg.train, run.world
    n_params = sum(p.numel() for p in run.model.parameters())
    processes = f" x {world.world_size} processes" if world.distributed else ""
    return (
        f"training {n_params:,} parameters on {hardware_summary(world.device)} ({tc.precision}); "
        f"{tc.steps} steps of {run.tokens_per_step:,} tokens ({run.grad_accum} x {tc.micro_batch} x "
        f"{tc.seq_len}{processes}); run folder {run.run_dir}"
    )


def open_log(run_dir: Path, cfg: Config, world: World, found, progress: bool | None) -> RunLogger:
    """The run's logger and trackers, told whether the run resumes; damaged checkpoints it skipped are named."""
    log = RunLogger(
        run_dir,
        is_main=world.is_main,
        total_steps=cfg.train.steps,
        progress=progress,
        trackers=cfg.train.trackers,
        config=config_to_dict(cfg),
        resume=found is not None,
        mlflow_uri=cfg.train.mlflow_uri,
    )
    for problem in found.skipped if found else []:
        log.warning(f"skipping a damaged checkpoint: {problem}")
    return log


def setup_run(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    task: Task | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> Run:
    """Set up the run ``cfg`` describes (see the module docstring for the order)."""
    started = time.perf_counter()
    cfg, base_weights = base_model(cfg)
    world = init_world(cfg.parallel, pick_device(cfg.train.device))
    log = None
    try:
        # 1. data, and every check that can fail before a weight is allocated
        data = resolve_data(
            cfg, loader=task.loader if task else None, world=world, cache_dir=cache_dir, progress=progress
        )
        cfg = data.config  # the model's vocabulary follows the tokenizer unless set explicitly
        accumulation_steps(cfg, world.dp_size)  # the config's own batch arithmetic must hold
        # 2. the plan, resolved once
        plan = planned(cfg, world)
        run_dir = Path(cfg.train.out_dir)
        check_writable(run_dir, needed_bytes=int(data.parameters * 4 * 3 * 1.1) + (1 << 20))
        # 3. where the run starts
        found = find_resume(run_dir, resume)
        log = open_log(run_dir, cfg, world, found, progress)
        # 4. the model, and the plan made final (on a GPU by a trial step), then the config frozen with it
        model, cfg, plan = model_for_run(cfg, plan, world, found is None, task, log, base_weights)
        grad_accum = plan.grad_accum if plan is not None else accumulation_steps(cfg, world.dp_size)
        loader = task.loader if task else build_loader(data, cfg, world)
        if loader.batch_size != cfg.train.micro_batch:
            raise ConfigError(
                f"the plan trains micro-batches of {cfg.train.micro_batch} sequences (to fit memory) but the "
                f"given data loader yields {loader.batch_size}: set train.micro_batch={cfg.train.micro_batch}"
            )
        model = parallelize(
            model,
            cfg.parallel,
            world,
            precision=cfg.train.precision,
            activation_checkpointing=cfg.train.activation_checkpointing,
            compile=cfg.train.compile,
            strategy=strategy_of(cfg, plan, world),
        )
        # 5. optimizer, scaler, checkpoints; the frozen config is written
        optimizer = build_optimizer(model, cfg.train, world.device, width_mult=cfg.model.mup_width_mult)
        scaler = torch.amp.GradScaler(world.device.type) if cfg.train.precision == "fp16" else None
        checkpoints = CheckpointManager(run_dir, config=cfg, world=world, tokenizer_file=data.tokenizer_path)
        write_run_files(run_dir, cfg, plan, world)
        run = Run(
            cfg=cfg,
            plan=plan,
            world=world,
            data=dataclasses.replace(data, config=cfg, loader=loader),
            loader=loader,
            val_batches=task.val_batches if task else (lambda: validation_batches(data, cfg)),
            objective=task.objective if task else LANGUAGE_MODELING,
            model=model,
            optimizer=optimizer,
            scaler=scaler,
            checkpoints=checkpoints,
            log=log,
            resume_from=found,
            grad_accum=grad_accum,
            flops_per_token=model_flops_per_token(cfg.model, cfg.train.seq_len),
            peak_flops=peak_flops(world.device, cfg.train.precision, cache_dir),
            started=started,
            lineage=task.lineage if task else None,
            energy=meter_for_run(
                cfg.train,
                world,
                utilisation=plan.predicted_utilisation if plan is not None else 1.0,
                fine_tuning=task is not None and task.adapt_model is not None,  # from base weights
            ),
        )
    except BaseException:
        if log is not None:
            log.close()
        close_world(world)
        raise
    log.info(start_line(run))
    return run


def describe(run: Run, state: Any) -> dict:
    """The facts the model card is written from."""
    import math

    cfg, m = run.cfg, run.cfg.model
    val_loss = state.val_loss
    return {
        "name": run.run_dir.name,
        "model": {**dataclasses.asdict(m), "kv_heads": m.kv_heads, "hidden_dim": m.hidden_dim},
        "seq_len": cfg.train.seq_len,
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "sources": run.data.sources or list(run.data.datasets),
        "data_report": run.data.report,
        "lineage": run.lineage,
        "tokenizer": run.data.tokenizer_path,
        "step": state.step,
        "tokens": state.tokens,
        "lr": cfg.train.lr,
        "schedule": cfg.train.schedule,
        "weight_decay": cfg.train.weight_decay,
        "precision": cfg.train.precision,
        "final_loss": state.last_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0))
        if val_loss is not None and math.isfinite(val_loss)
        else None,
        "bad_steps": state.bad.total,
        "hardware": hardware_summary(run.device),
        "wall_seconds": state.wall_seconds(run),
        "energy": run.energy.summary(state.energy_kwh),
    }
