"""The training loop: one function, ``train``, with its state in plain variables.

The step depends only on (model, optimizer, loader state, RNG states, step); the checkpoint saves exactly
that set, so a resumed run continues bit for bit. Saving and loading a checkpoint each happen in one
function below (``save_run_checkpoint`` / ``load_run_checkpoint``).

Shape legend: B micro-batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.config import Config, save_config
from lmforge.distributed import dcp
from lmforge.distributed.parallelize import (
    World,
    clip_grad_norm_,
    close_world,
    device_memory_bytes,
    init_world,
    is_sharded,
    parallelize,
    unwrap,
)
from lmforge.errors import CheckpointError, ConfigError, TrainingError
from lmforge.files import write_text_atomic
from lmforge.model.info import model_flops_per_token
from lmforge.model.transformer import build_model
from lmforge.plan.hardware import hardware_summary, peak_flops
from lmforge.plan.planner import apply_plan, plan_training
from lmforge.train.autoplan import refine_plan_by_trial
from lmforge.train.card import model_card
from lmforge.train.data import RunData, build_loader, resolve_data, validation_batches
from lmforge.train.guards import BadStepGuard, SpikeDetector, StopSignals
from lmforge.train.metrics import RunLogger, format_duration
from lmforge.train.optim import build_optimizer, lr_at, set_lr
from lmforge.train.plots import plot_runs

IGNORE_INDEX = -100


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None  # None: finished all steps; else "SIGTERM", "SIGINT" or "time limit"
    samples: list[str]
    wall_seconds: float
    bad_steps: int


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, n_targets: int | torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over targets that are not -100, divided by ``n_targets`` (the count over the
    whole accumulated batch, so k micro-batches give the gradient of one batch k times larger)."""
    V = logits.shape[-1]
    total = F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )  # logits (B*T, V), targets (B*T,)
    return total / n_targets


def autocast_for(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 for the forward pass; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def forward_backward(
    model: nn.Module,
    batches: list,
    *,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler | None,
    world: World,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over its micro-batches; return the step's loss.

    Every micro-batch's summed loss is divided by the number of target tokens over all of them (and over
    all processes), so the gradient equals that of one batch holding them all, masked targets included."""
    n_targets = torch.tensor(sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches), device=device)
    if world.distributed:
        dist.all_reduce(n_targets, group=world.dp_group)  # tensor-parallel peers share their batch
    n_targets = n_targets.clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        x = batch.inputs.to(device, non_blocking=True)  # (B, T)
        y = batch.targets.to(device, non_blocking=True)  # (B, T)
        doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
        with autocast_for(device, precision):
            logits = model(x, doc_ids=doc_ids) if doc_ids is not None else model(x)  # (B, T, V)
            loss = lm_loss(logits, y, n_targets)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
    if world.distributed:
        dist.all_reduce(loss_sum, group=world.dp_group)  # each replica holds its share of the step's loss
    return loss_sum


def accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step so one step sees ``train.global_batch_tokens`` tokens."""
    tokens_per_micro = cfg.train.micro_batch * cfg.train.seq_len * world_size
    if cfg.train.global_batch_tokens is None:
        return 1
    steps, remainder = divmod(cfg.train.global_batch_tokens, tokens_per_micro)
    if steps < 1 or remainder:
        raise ConfigError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of "
            f"train.micro_batch x train.seq_len x processes = {cfg.train.micro_batch} x {cfg.train.seq_len} x "
            f"{world_size} = {tokens_per_micro}"
        )
    return steps


def agree(flag: bool, world: World) -> bool:
    """True on every rank when it is True on any rank (stop, rollback): all ranks take the same branch."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def rng_state() -> dict[str, Any]:
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


def save_run_checkpoint(
    run_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    state: dict[str, Any],
    tokenizer_path: str | Path | None,
    world: World,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXXXX`` (model, optimizer, scaler, loop state) and apply ``keep_last``.

    A failed write (disk full, permissions) leaves every earlier checkpoint as it was."""
    directory = run_dir / "checkpoints" / ckpt.step_dir_name(step)
    train_state = {
        **state,
        "step": step,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
    }
    try:
        if world.distributed:  # every rank writes its shard (distributed/dcp.py); loader and RNG are per rank
            rank_state = {"loader": train_state.pop("loader"), "rng": train_state.pop("rng")}
            dcp.save_sharded(
                directory,
                model=model,
                optimizer=optimizer,
                config=cfg,
                world=world,
                train_state=train_state,
                rank_state=rank_state,
                tokenizer_file=tokenizer_path,
                extra_files=extra_files,
            )
        else:
            ckpt.save_checkpoint(
                directory,
                model_state=model.state_dict(),
                config=cfg,
                train_state={**train_state, "optimizer": optimizer.state_dict()},
                tokenizer_file=tokenizer_path,
                extra_files=extra_files,
            )
    except OSError as exc:
        previous = ckpt.latest_valid_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous.path} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {directory}: {exc}{kept}") from None
    if world.is_main:
        ckpt.prune_checkpoints(run_dir, cfg.train.keep_last)
    return directory


def load_run_checkpoint(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    cfg: Config,
    world: World | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer/scaler state when given) from a checkpoint; return its loop state.
    A sharded checkpoint (several writers) or a wrapped model (several readers) goes through
    ``distributed/dcp.py``, which reshards between world sizes."""
    saved = ckpt.load_config_from(directory)
    if saved.model != cfg.model:
        diff = [
            f"model.{f.name}: checkpoint {getattr(saved.model, f.name)!r}, config {getattr(cfg.model, f.name)!r}"
            for f in dataclasses.fields(cfg.model)
            if getattr(saved.model, f.name) != getattr(cfg.model, f.name) and f.name != "preset"
        ]
        if diff:
            raise CheckpointError(f"{directory} holds a different model:\n  " + "\n  ".join(diff))
    if dcp.is_sharded(directory):
        restored = dcp.load_sharded(directory, model=model, optimizer=optimizer, world=world)
        # After a change of world size each rank takes rank 0's loader position and RNG (see dcp.Restored).
        own = restored.rank_state(world) if world is not None else None
        state = {**restored.train_state, **(own or restored.rank_states[0])}
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        return state
    weights = ckpt.load_model_state(directory, saved)
    if world is not None and world.distributed:  # one writer, several readers: each keeps its part
        state = ckpt.load_train_state(directory)
        if state is None:
            raise CheckpointError(
                f"{directory} has no {ckpt.TRAIN_STATE}: it holds weights only and cannot resume a run"
            )
        dcp.load_full_into(model, optimizer, model_state=weights, optimizer_state=state["optimizer"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        return state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.model.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{directory}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state = ckpt.load_train_state(directory)
    if state is None:
        raise CheckpointError(
            f"{directory} has no {ckpt.TRAIN_STATE}: it holds weights only and cannot resume a run"
        )
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state


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


def evaluate(model: nn.Module, batches, *, device: torch.device, autocast) -> tuple[float, int]:
    """Mean loss per target token over ``batches`` and the number of target tokens."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            x, y = batch.inputs.to(device), batch.targets.to(device)  # (B, T)
            n = int((y != IGNORE_INDEX).sum())
            with autocast():
                total += lm_loss(model(x), y, 1).double()
            count += n
    model.train(was_training)
    return (total.item() / count if count else math.nan), count


def sample_texts(model: nn.Module, tokenizer, cfg: Config, device: torch.device, step: int) -> list[str]:
    """One continuation per ``train.sample_prompts`` (none: no samples), from a seeded sampler that leaves
    the global RNG alone."""
    from lmforge.infer.generate import SamplingConfig, generate

    if not cfg.train.sample_prompts:
        return []
    sampling = SamplingConfig(
        max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=cfg.train.seed + step
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = generate(model, tokenizer, list(cfg.train.sample_prompts), sampling, device=device)
    return [g.prompt + g.text for g in out]


def train(
    cfg: Config,
    *,
    resume: str | None = None,
    loader=None,
    val_batches: Callable[[], Any] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    adapt_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainResult:
    """Train ``cfg`` and leave a run folder at ``cfg.train.out_dir``.

    ``resume``: None (a fresh run; refuses to overwrite an existing one), "auto" (the newest valid
    checkpoint of the run folder, or a fresh start), or a checkpoint path.
    ``loader``: an object with the ``TokenLoader`` interface (next_batch, state_dict, load_state_dict,
    vocab_size, tokenizer_path); by default built from ``cfg.data`` (preparing raw sources first).
    ``val_batches``: a callable returning an iterable of validation batches (default: the data's val split).
    ``adapt_model``: applied to the initialised model before parallelization (fine-tuning: LoRA, frozen
    weights, loading a base model). ``cache_dir``: where prepared data and the measured CPU peak are cached.
    """
    started = time.perf_counter()
    log: RunLogger | None = None
    world = init_world(cfg.parallel, pick_device(cfg.train.device))
    device = world.device
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    try:
        # -- data and the checks that must pass before any weight is allocated --------------------------------
        data: RunData = resolve_data(cfg, loader=loader, world=world, cache_dir=cache_dir, progress=progress)
        cfg = data.config  # the model's vocabulary follows the tokenizer unless set explicitly
        accumulation_steps(cfg, world.dp_size)  # the config's own batch arithmetic must hold
        plan = None
        if cfg.parallel.strategy == "auto" and world.tp == 1:
            plan = plan_training(
                cfg,
                device_kind=device.type,
                world_size=world.world_size,
                device_memory_bytes=(
                    int(cfg.parallel.device_memory_gib * 2**30)
                    if cfg.parallel.device_memory_gib is not None
                    else device_memory_bytes(device, world)
                ),
            )
        check_writable(run_dir, needed_bytes=int(data.parameters * 4 * 3 * 1.1) + (1 << 20))
        found = ckpt.find_resume_checkpoint(run_dir, resume)
        if resume is None and ckpt.list_checkpoints(run_dir):
            raise ConfigError(
                f"train.out_dir={str(run_dir)!r} already holds checkpoints: continue it with --resume auto, "
                "or choose another train.out_dir"
            )
        log = RunLogger(run_dir, is_main=world.is_main, total_steps=tc.steps, progress=progress)
        for problem in found.skipped if found else []:
            log.warning(f"skipping a damaged checkpoint: {problem}")

        # -- model, parallelism, optimizer --------------------------------------------------------------------
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        model = build_model(cfg.model, device=device, seed=tc.seed)
        if adapt_model is not None:
            model = adapt_model(model)
        if plan is not None:
            if device.type == "cuda" and plan.strategy != "fsdp" and loader is None:
                plan = refine_plan_by_trial(model, cfg, plan, world)
            cfg = apply_plan(cfg, plan)
            tc = cfg.train
            log.info(f"plan (parallel.strategy=auto): {plan.describe()}")
            if world.is_main:
                write_text_atomic(
                    run_dir / "plan.json", json.dumps(dataclasses.asdict(plan), indent=2) + "\n"
                )
        if data.loader is None:
            data.loader = build_loader(data, cfg, world)
        elif getattr(data.loader, "batch_size", tc.micro_batch) != tc.micro_batch:
            raise ConfigError(
                f"the plan trains micro-batches of {tc.micro_batch} sequences (to fit memory) but the given "
                f"data loader yields {data.loader.batch_size}: set train.micro_batch={tc.micro_batch}"
            )
        accum = accumulation_steps(cfg, world.dp_size)
        model = parallelize(
            model,
            cfg.parallel,
            world,
            precision=tc.precision,
            activation_checkpointing=tc.activation_checkpointing,
            compile=tc.compile,
            strategy=plan.strategy if plan is not None else None,
        )
        optimizer = build_optimizer(model, tc, device)
        scaler = torch.amp.GradScaler(device.type) if tc.precision == "fp16" else None

        def autocast():
            return autocast_for(device, tc.precision)

        # -- loop state: everything a checkpoint must hold -----------------------------------------------------
        step, tokens_seen, wall_before = 0, 0, 0.0
        bad = BadStepGuard(max_consecutive=tc.max_bad_steps)
        spikes = SpikeDetector(zscore=tc.spike_zscore)
        last_loss: float | None = None
        val_loss: float | None = None
        resumed_rng = None
        if found is not None:
            state = load_run_checkpoint(
                found.path, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, world=world
            )
            step, tokens_seen, wall_before = state["step"], state["tokens"], state["wall_seconds"]
            data.loader.load_state_dict(state["loader"])
            bad.load_state_dict(state["bad_steps"])
            spikes.load_state_dict(state["spikes"])
            last_loss, val_loss = state.get("last_loss"), state.get("val_loss")
            resumed_rng = state["rng"]
            log.truncate_after(step)
            log.info(f"resumed from {found.path} at step {step}")
        log.start_step = step
        log.advance(step)

        def loop_state() -> dict[str, Any]:
            return {
                "tokens": tokens_seen,
                "loader": data.loader.state_dict(),
                "bad_steps": bad.state_dict(),
                "spikes": spikes.state_dict(),
                "last_loss": last_loss,
                "val_loss": val_loss,
                "wall_seconds": wall_before + time.perf_counter() - started,
            }

        def save(at_step: int, extra: dict[str, str] | None = None) -> Path:
            return save_run_checkpoint(
                run_dir,
                step=at_step,
                model=model,
                optimizer=optimizer,
                scaler=scaler,
                cfg=cfg,
                state=loop_state(),
                tokenizer_path=data.tokenizer_path,
                world=world,
                extra_files=extra,
            )

        if world.is_main:
            save_config(cfg, run_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        flops_per_token = model_flops_per_token(cfg.model, tc.seq_len)
        peak = peak_flops(device, tc.precision, cache_dir)
        tokens_per_step = accum * tc.micro_batch * tc.seq_len * world.dp_size
        log.info(
            f"training {n_params:,} parameters on {hardware_summary(device)} ({tc.precision}); "
            f"{tc.steps} steps of {tokens_per_step:,} tokens ({accum} x {tc.micro_batch} x {tc.seq_len}"
            f"{f' x {world.world_size} processes' if world.distributed else ''}); run folder {run_dir}"
        )

        # -- the loop -----------------------------------------------------------------------------------------
        model.train()
        last_checkpoint: Path | None = found.path if found else None
        stopped_by: str | None = None
        samples: list[str] = []
        interval_start, interval_tokens = time.perf_counter(), 0
        time_limit = tc.time_limit_minutes * 60.0
        if resumed_rng is not None:
            set_rng_state(resumed_rng)  # last, so nothing between here and the first step draws from it
        with StopSignals() as signals:
            while step < tc.steps:
                if agree(signals.received is not None, world):
                    stopped_by = signals.received or "SIGTERM"
                    break
                batches = [data.loader.next_batch() for _ in range(accum)]
                loss_sum = forward_backward(
                    model, batches, device=device, precision=tc.precision, scaler=scaler, world=world
                )
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = clip_grad_norm_(list(model.parameters()), tc.grad_clip or math.inf)
                step_loss, grad_norm_value = loss_sum.item(), grad_norm.item()
                finite = math.isfinite(step_loss) and (math.isfinite(grad_norm_value) or scaler is not None)
                lr = lr_at(step, tc)
                set_lr(optimizer, lr)
                if finite:
                    if scaler is not None:
                        scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
                        scaler.update()
                    else:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                interval_tokens += tokens_per_step
                if not finite:
                    log.warning(
                        f"step {step}: non-finite loss or gradient (loss {step_loss}); update skipped"
                    )
                else:
                    last_loss = step_loss
                    z = spikes.check(step_loss)
                    if z is not None:
                        log.warning(f"step {step}: loss spike {step_loss:.4f} (z-score {z:.1f})")
                if agree(bad.record(finite), world):
                    previous = ckpt.latest_valid_checkpoint(run_dir)
                    if previous is None:
                        raise TrainingError(
                            f"{bad.consecutive} consecutive non-finite steps (train.max_bad_steps="
                            f"{tc.max_bad_steps}) and no checkpoint to roll back to; lower train.lr or check the data"
                        )
                    position = data.loader.state_dict()  # keep the stream past the bad window
                    total_bad = bad.total
                    state = load_run_checkpoint(
                        previous.path, model=model, optimizer=optimizer, scaler=scaler, cfg=cfg, world=world
                    )
                    step, tokens_seen = state["step"], state["tokens"]
                    spikes.load_state_dict(state["spikes"])
                    set_rng_state(state["rng"])
                    data.loader.load_state_dict(position)
                    bad.total, bad.consecutive = total_bad, 0
                    log.warning(
                        f"rolled back to {previous.path} (step {step}); the data stream continues past the bad batches"
                    )
                    log.truncate_after(step)
                    continue

                over = time_limit > 0 and time.perf_counter() - started > time_limit
                out_of_time = step < tc.steps and agree(over, world)
                final = step == tc.steps or out_of_time  # the last step: log, evaluate, then finish
                if step % tc.log_every == 0 or final:
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_tokens / elapsed if elapsed > 0 else 0.0
                    achieved = tokens_per_s * flops_per_token / world.world_size
                    log.log(
                        step,
                        {
                            "loss": step_loss,
                            "lr": lr,
                            "grad_norm": grad_norm_value,
                            "tokens": tokens_seen,
                            "tokens_per_s": tokens_per_s,
                            "mfu": achieved / peak if peak else None,
                            "memory_gb": memory_gb(device),
                            "skipped_steps": bad.total,
                        },
                    )
                    interval_start, interval_tokens = time.perf_counter(), 0
                log.advance(step)
                if step % tc.eval_every == 0 or final:
                    batches_iter = val_batches() if val_batches is not None else validation_batches(data, cfg)
                    val_loss, n_val = evaluate(model, batches_iter, device=device, autocast=autocast)
                    if n_val:
                        log.log(
                            step,
                            {
                                "val_loss": val_loss,
                                "val_ppl": math.exp(min(val_loss, 50.0)),
                                "tokens": tokens_seen,
                            },
                        )
                if (
                    cfg.eval.every
                    and cfg.eval.tasks
                    and step % cfg.eval.every == 0
                    and data.tokenizer is not None
                    and not is_sharded(model)  # FSDP shards: single-rank scoring cannot run (issue 5)
                ):
                    from lmforge.infer.evaluate import task_metrics  # multiple-choice accuracy, live model

                    scores = task_metrics(
                        unwrap(model), data.tokenizer, cfg.eval.tasks, device=device, limit=cfg.eval.limit
                    )
                    log.log(step, {**scores, "tokens": tokens_seen})
                if (
                    tc.sample_every
                    and step % tc.sample_every == 0
                    and step < tc.steps
                    and world.is_main
                    and not is_sharded(model)
                ):
                    log.info(
                        f"sample at step {step}:\n"
                        + "\n---\n".join(sample_texts(unwrap(model), data.tokenizer, cfg, device, step))
                    )
                if out_of_time:
                    stopped_by = "time limit"
                    break
                if step % tc.ckpt_every == 0 and step < tc.steps:
                    last_checkpoint = save(step)

            # -- the end: samples, final checkpoint, plot, model card -------------------------------------------
            wall = wall_before + time.perf_counter() - started
            summary = run_summary(
                cfg, data, n_params, step, tokens_seen, last_loss, val_loss, bad.total, device, wall
            )
            by_signal = stopped_by in (
                "SIGTERM",
                "SIGINT",
            )  # a preempted run leaves at once; a timed one samples
            if not by_signal and world.is_main and data.tokenizer is not None and not is_sharded(model):
                samples = sample_texts(unwrap(model), data.tokenizer, cfg, device, step)
                write_text_atomic(
                    run_dir / "samples.txt", "\n\n".join(f"--- step {step} ---\n{s}" for s in samples) + "\n"
                )
            card = model_card(summary)
            last_checkpoint = save(step, extra={"MODEL_CARD.md": card})
            if world.is_main:
                write_text_atomic(run_dir / "MODEL_CARD.md", card)
                plot_runs([run_dir], run_dir / "loss.png")
            if stopped_by is not None:
                log.info(
                    f"stopped by {stopped_by} at step {step}; checkpoint {last_checkpoint}; continue with --resume auto"
                )
            else:
                log.info(
                    f"done: {step} steps in {format_duration(wall)}; final loss {last_loss}; run folder {run_dir}"
                )
        return TrainResult(
            run_dir=run_dir,
            step=step,
            final_loss=last_loss,
            val_loss=val_loss,
            checkpoint=last_checkpoint,
            stopped_by=stopped_by,
            samples=samples,
            wall_seconds=wall,
            bad_steps=bad.total,
        )
    finally:
        if log is not None:
            log.close()
        close_world(world)


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def run_summary(
    cfg, data: RunData, n_params, step, tokens, last_loss, val_loss, bad_steps, device, wall
) -> dict:
    """The facts the model card is written from."""
    m = cfg.model
    return {
        "name": Path(cfg.train.out_dir).name,
        "model": {**dataclasses.asdict(m), "kv_heads": m.kv_heads, "hidden_dim": m.hidden_dim},
        "seq_len": cfg.train.seq_len,
        "parameters": n_params,
        "sources": data.sources or list(data.datasets),
        "data_report": data.report,
        "tokenizer": data.tokenizer_path,
        "step": step,
        "tokens": tokens,
        "lr": cfg.train.lr,
        "schedule": cfg.train.schedule,
        "weight_decay": cfg.train.weight_decay,
        "precision": cfg.train.precision,
        "final_loss": last_loss,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0))
        if val_loss is not None and math.isfinite(val_loss)
        else None,
        "bad_steps": bad_steps,
        "hardware": hardware_summary(device),
        "wall_seconds": wall,
    }
