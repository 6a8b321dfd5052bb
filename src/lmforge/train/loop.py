"""The training loop: ``train`` sets a run up (``train.run.setup_run``) and steps it, with the loop's state
in one ``LoopState`` that the checkpoint saves whole, so a resumed run continues bit for bit.

The step depends only on (model, optimizer, scaler, loader state, RNG states, step); evaluation, samples,
checkpoints and the model card are calls, not inline code.

Shape legend: B micro-batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.checkpoint.manager import set_rng_state
from lmforge.config import Config
from lmforge.data.batch import IGNORE_INDEX, Batch
from lmforge.distributed.parallelize import World, clip_grad_norm_, unwrap
from lmforge.errors import TrainingError
from lmforge.files import write_text_atomic
from lmforge.model.moe import moe_layers, router_loss
from lmforge.plan.hardware import model_flops_utilisation
from lmforge.train.card import model_card
from lmforge.train.experts import ExpertLoad
from lmforge.train.guards import BadStepGuard, SpikeDetector, StopSignals
from lmforge.train.metrics import format_duration
from lmforge.train.objectives import LANGUAGE_MODELING, Objective
from lmforge.train.optim import lr_at, set_lr
from lmforge.train.plots import plot_expert_load, plot_runs
from lmforge.train.run import Run, Task, describe, setup_run

__all__ = ["IGNORE_INDEX", "LoopState", "TrainResult", "forward_backward", "train"]


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
    energy_kwh: float = 0.0  # the devices' energy over all attempts of the run (train.energy)
    co2_g: float = 0.0


@dataclass
class LoopState:
    """Everything the loop changes as it runs; ``state_dict`` is what a checkpoint saves of it."""

    bad: BadStepGuard
    spikes: SpikeDetector
    step: int = 0
    tokens: int = 0
    wall_before: float = 0.0  # seconds spent in earlier attempts of this run
    last_loss: float | None = None
    val_loss: float | None = None
    last_checkpoint: Path | None = None
    samples: list[str] = field(default_factory=list)
    energy_kwh: float = 0.0  # all attempts of this run: a resumed run adds to it

    def wall_seconds(self, run: Run) -> float:
        return self.wall_before + time.perf_counter() - run.started

    def state_dict(self, run: Run) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "bad_steps": self.bad.state_dict(),
            "spikes": self.spikes.state_dict(),
            "last_loss": self.last_loss,
            "val_loss": self.val_loss,
            "wall_seconds": self.wall_seconds(run),
            "energy_kwh": self.energy_kwh,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step, self.tokens, self.wall_before = saved["step"], saved["tokens"], saved["wall_seconds"]
        self.bad.load_state_dict(saved["bad_steps"])
        self.spikes.load_state_dict(saved["spikes"])
        self.last_loss, self.val_loss = saved.get("last_loss"), saved.get("val_loss")
        self.energy_kwh = saved.get("energy_kwh", 0.0)


def autocast_for(device: torch.device, precision: str):
    """Autocast to bf16 or fp16 for the forward pass; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def agree(flag: bool, world: World) -> bool:
    """True on every rank when it is True on any rank (stop, rollback): all ranks take the same branch."""
    if not world.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gradient_sync(model: nn.Module, *, last: bool):
    """DDP sums gradients over processes in the last micro-batch's backward pass only: it sums the
    accumulated gradient, so a reduction after every micro-batch would count the earlier ones again."""
    from torch.nn.parallel import DistributedDataParallel

    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def forward_backward(
    model: nn.Module,
    batches: list[Batch],
    *,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler | None,
    world: World,
    objective: Objective = LANGUAGE_MODELING,
    expert_load: ExpertLoad | None = None,
) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over its micro-batches; return the step's loss.

    Every micro-batch's summed loss is divided by the objective's units over all of them (and over all
    processes), so the gradient equals that of one batch holding them all, masked targets included.
    A Mixture-of-Experts model adds its routers' balancing losses to the gradient (the i-th micro-batch's,
    taken over that micro-batch on all processes, weighted by its share of the units; the returned loss is the
    objective's alone) and, given ``expert_load``, records each micro-batch's load there."""
    micro_units = torch.tensor([objective.units(b) for b in batches], device=device)  # (micro-batches,)
    if world.distributed:
        dist.all_reduce(micro_units, group=world.dp_group)  # tensor-parallel peers share their batch
    units = micro_units.sum().clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    routers = moe_layers(model)  # [] for a dense model
    for i, batch in enumerate(batches):
        batch = batch.to(device)
        with gradient_sync(model, last=i == len(batches) - 1):
            with autocast_for(device, precision):
                loss = objective.loss(model, batch) / units
                balance = router_loss(routers)  # None without MoE layers or balancing coefficients
                total = loss if balance is None else loss + balance * (micro_units[i] / units)
            (scaler.scale(total) if scaler is not None else total).backward()
        loss_sum += loss.detach()
        if expert_load is not None:
            expert_load.add()
    if world.distributed:
        dist.all_reduce(loss_sum, group=world.dp_group)  # each replica holds its share of the step's loss
    return loss_sum


def optimizer_step(run: Run, step: int, loss_sum: torch.Tensor) -> tuple[float, float, float, bool]:
    """Clip, set the learning rate and update (skipped for a non-finite step); (loss, grad norm, lr, finite)."""
    tc, optimizer, scaler = run.cfg.train, run.optimizer, run.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm_(list(run.model.parameters()), tc.grad_clip or math.inf)
    loss, norm = loss_sum.item(), grad_norm.item()
    finite = math.isfinite(loss) and (math.isfinite(norm) or scaler is not None)
    lr = lr_at(step, tc)
    set_lr(optimizer, lr)
    if finite:
        if scaler is not None:
            scaler.step(optimizer)  # skips the update itself when fp16 gradients overflowed
            scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, lr, finite


def evaluate(run: Run, batches: Iterable[Batch]) -> tuple[float, int]:
    """Mean loss per unit (target token, example) over ``batches`` and the number of units."""
    model, device = run.model, run.device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            with autocast_for(device, run.cfg.train.precision):
                total += run.objective.loss(model, batch).double()
            count += run.objective.units(batch)
    model.train(was_training)
    return (total.item() / count if count else math.nan), count


def objective_metrics(run: Run, batches: Iterable[Batch]) -> dict[str, float]:
    """Means per unit of an objective's own figures over ``batches``, under the current weights and without
    gradients: an objective may define ``metrics(model, batch) -> {name: sum over the batch's units}``
    (preference tuning: rewards, reward accuracy and margin); {} for one that does not."""
    metrics = getattr(run.objective, "metrics", None)
    if metrics is None:
        return {}
    was_training = run.model.training
    run.model.eval()
    totals: dict[str, float] = {}
    units = 0
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(run.device)
            with autocast_for(run.device, run.cfg.train.precision):
                for name, value in metrics(run.model, batch).items():
                    totals[name] = totals.get(name, 0.0) + float(value)
            units += run.objective.units(batch)
    run.model.train(was_training)
    return {name: total / max(units, 1) for name, total in totals.items()}


def sample_texts(run: Run, step: int) -> list[str]:
    """One continuation per ``train.sample_prompts``, from a seeded sampler that leaves the RNGs alone."""
    from lmforge.infer.generate import SamplingConfig, generate

    tc, device = run.cfg.train, run.device
    if not tc.sample_prompts:
        return []
    sampling = SamplingConfig(max_new_tokens=tc.sample_tokens, temperature=0.8, top_k=50, seed=tc.seed + step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = generate(
            unwrap(run.model), run.data.tokenizer, list(tc.sample_prompts), sampling, device=device
        )
    return [g.prompt + g.text for g in out]


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def save(run: Run, state: LoopState, extra_files: dict[str, str] | None = None) -> Path:
    state.last_checkpoint = run.checkpoints.save(
        state.step,
        model=run.model,
        optimizer=run.optimizer,
        scaler=run.scaler,
        loop_state=state.state_dict(run),
        loader_state=run.loader.state_dict(),
        extra_files=extra_files,
    )
    return state.last_checkpoint


def restore(run: Run, directory: Path, state: LoopState) -> dict[str, Any]:
    """Load a checkpoint into the run and the loop state; returns what was saved (its ``rng`` is applied
    by the caller, last, so nothing draws from the generators before the first step)."""
    saved = run.checkpoints.load(directory, model=run.model, optimizer=run.optimizer, scaler=run.scaler)
    state.load_state_dict(saved)
    state.last_checkpoint = directory
    return saved


def roll_back(run: Run, state: LoopState) -> None:
    """After ``train.max_bad_steps`` non-finite steps in a row: back to the newest valid checkpoint, with
    the data stream continuing past the bad batches."""
    previous = run.checkpoints.latest()
    if previous is None:
        raise TrainingError(
            f"{state.bad.consecutive} consecutive non-finite steps (train.max_bad_steps="
            f"{run.cfg.train.max_bad_steps}) and no checkpoint to roll back to; lower train.lr or check the data"
        )
    position, total_bad, energy = run.loader.state_dict(), state.bad.total, state.energy_kwh
    saved = restore(run, previous.path, state)
    set_rng_state(saved["rng"])
    run.loader.load_state_dict(position)
    state.bad.total, state.bad.consecutive = total_bad, 0
    state.energy_kwh = energy  # the energy was drawn all the same
    run.log.warning(
        f"rolled back to {previous.path} (step {state.step}); the data stream continues past the bad batches"
    )
    run.log.truncate_after(state.step)


def measure_energy(run: Run, state: LoopState) -> dict[str, Any]:
    """The energy of all processes' devices since the last call, added to the run's total, as metrics."""
    kwh = run.energy.interval_kwh()
    if run.world.distributed:
        total = torch.tensor([kwh], device=run.device, dtype=torch.float64)
        dist.all_reduce(total)
        kwh = total.item()
    state.energy_kwh += kwh
    return {
        "energy_kwh": kwh,
        "energy_kwh_total": state.energy_kwh,
        "co2_g": run.energy.co2_g(kwh),
        "co2_g_total": run.energy.co2_g(state.energy_kwh),
        "energy_method": run.energy.method,
        "energy_estimate": run.energy.estimate,
    }


def log_step(run: Run, state: LoopState, values: dict[str, float], interval: tuple[float, int]) -> None:
    elapsed = time.perf_counter() - interval[0]
    tokens_per_s = interval[1] / elapsed if elapsed > 0 else 0.0
    achieved = tokens_per_s * run.flops_per_token / run.world.world_size
    run.log.log(
        state.step,
        {
            **values,
            "tokens": state.tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": model_flops_utilisation(achieved, run.peak_flops),
            "memory_gb": memory_gb(run.device),
            "skipped_steps": state.bad.total,
            **measure_energy(run, state),
        },
    )


def validate(run: Run, state: LoopState, *, final: bool) -> None:
    """Validation loss (every ``train.eval_every`` steps and at the last one) and, every ``eval.every``
    steps, the multiple-choice tasks on the live model."""
    cfg, step = run.cfg, state.step
    if step % cfg.train.eval_every == 0 or final:
        state.val_loss, n_val = evaluate(run, run.val_batches())
        if n_val:
            values = {"val_loss": state.val_loss}
            if run.objective is LANGUAGE_MODELING:  # a perplexity only means something for next-token loss
                values["val_ppl"] = math.exp(min(state.val_loss, 50.0))
            values.update({f"val_{k}": v for k, v in objective_metrics(run, run.val_batches()).items()})
            run.log.log(step, {**values, "tokens": state.tokens})
    if cfg.eval.every and cfg.eval.tasks and step % cfg.eval.every == 0 and run.writes_text:
        from lmforge.infer.suite import task_metrics

        scores = task_metrics(
            unwrap(run.model), run.data.tokenizer, cfg.eval.tasks, device=run.device, limit=cfg.eval.limit
        )
        run.log.log(step, {**scores, "tokens": state.tokens})


def finish(run: Run, state: LoopState, stopped_by: str | None) -> None:
    """Samples (unless preempted), the final checkpoint with the model card, the loss (and expert load) plot."""
    if stopped_by not in ("SIGTERM", "SIGINT") and run.world.is_main and run.writes_text:
        state.samples = sample_texts(run, state.step)
        text = "\n\n".join(f"--- step {state.step} ---\n{s}" for s in state.samples) + "\n"
        write_text_atomic(run.run_dir / "samples.txt", text)
    run.log.log(state.step, measure_energy(run, state), show=False)  # samples, last evaluation: the total
    card = model_card(describe(run, state))
    save(run, state, extra_files={"MODEL_CARD.md": card})
    if run.world.is_main:
        write_text_atomic(run.run_dir / "MODEL_CARD.md", card)
        plot_runs([run.run_dir], run.run_dir / "loss.png")
        plot_expert_load(run.run_dir)  # Mixture-of-Experts runs only
    if stopped_by is not None:
        run.log.info(
            f"stopped by {stopped_by} at step {state.step}; checkpoint {state.last_checkpoint}; "
            "continue with --resume auto"
        )
    else:
        run.log.info(
            f"done: {state.step} steps in {format_duration(state.wall_seconds(run))}; final loss "
            f"{state.last_loss}; run folder {run.run_dir}"
        )


def run_loop(run: Run) -> TrainResult:
    """Step ``run`` to ``train.steps`` (or a stop signal, or the time limit) and finish it."""
    tc, log, world = run.cfg.train, run.log, run.world
    state = LoopState(bad=BadStepGuard(tc.max_bad_steps), spikes=SpikeDetector(tc.spike_zscore))
    saved_rng = None
    if run.resume_from is not None:
        saved = restore(run, run.resume_from.path, state)
        run.loader.load_state_dict(saved["loader"])
        saved_rng = saved["rng"]
        log.truncate_after(state.step)
        log.info(f"resumed from {run.resume_from.path} at step {state.step}")
    log.start_step = state.step
    log.advance(state.step)
    run.model.train()
    stopped_by: str | None = None
    interval = (time.perf_counter(), 0)  # (start, tokens) of the logging interval
    time_limit = tc.time_limit_minutes * 60.0
    routers = moe_layers(run.model)  # Mixture-of-Experts layers: their load is summed per step
    if saved_rng is not None:
        set_rng_state(saved_rng)  # last, so nothing between here and the first step draws from it
    with StopSignals() as signals:
        while state.step < tc.steps:
            if agree(signals.received is not None, world):
                stopped_by = signals.received or "SIGTERM"
                break
            run.energy.poll()  # a wrapping energy counter is read every step
            batches = [run.loader.next_batch() for _ in range(run.grad_accum)]
            expert_load = ExpertLoad(routers) if routers else None
            loss_sum = forward_backward(
                run.model,
                batches,
                device=run.device,
                precision=tc.precision,
                scaler=run.scaler,
                world=world,
                objective=run.objective,
                expert_load=expert_load,
            )
            loss, grad_norm, lr, finite = optimizer_step(run, state.step, loss_sum)
            if expert_load is not None:
                expert_load.all_reduce(world)
                if finite:
                    expert_load.update_expert_bias()  # DeepSeek-V3 balancing, after the step
            state.step += 1
            state.tokens += run.tokens_per_step
            interval = (interval[0], interval[1] + run.tokens_per_step)
            if not finite:
                log.warning(f"step {state.step}: non-finite loss or gradient (loss {loss}); update skipped")
            else:
                state.last_loss = loss
                z = state.spikes.check(loss)
                if z is not None:
                    log.warning(f"step {state.step}: loss spike {loss:.4f} (z-score {z:.1f})")
            if agree(state.bad.record(finite), world):
                roll_back(run, state)
                continue

            over = time_limit > 0 and time.perf_counter() - run.started > time_limit
            out_of_time = state.step < tc.steps and agree(over, world)
            if state.step % tc.log_every == 0 or state.step == tc.steps or out_of_time:
                values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, **objective_metrics(run, batches)}
                if expert_load is not None:
                    values.update(expert_load.metrics())
                log_step(run, state, values, interval)
                interval = (time.perf_counter(), 0)
            log.advance(state.step)
            validate(run, state, final=state.step == tc.steps or out_of_time)
            if tc.sample_every and state.step % tc.sample_every == 0 and state.step < tc.steps:
                if world.is_main and run.writes_text:
                    log.info(
                        f"sample at step {state.step}:\n" + "\n---\n".join(sample_texts(run, state.step))
                    )
            if out_of_time:
                stopped_by = "time limit"
                break
            if state.step % tc.ckpt_every == 0 and state.step < tc.steps:
                save(run, state)
        finish(run, state, stopped_by)
    return TrainResult(
        run_dir=run.run_dir,
        step=state.step,
        final_loss=state.last_loss,
        val_loss=state.val_loss,
        checkpoint=state.last_checkpoint,
        stopped_by=stopped_by,
        samples=state.samples,
        wall_seconds=state.wall_seconds(run),
        bad_steps=state.bad.total,
        energy_kwh=state.energy_kwh,
        co2_g=run.energy.co2_g(state.energy_kwh),
    )


def train(
    cfg: Config,
    *,
    resume: str | Path | None = None,
    task: Task | None = None,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
    loader=None,
    val_batches=None,
    adapt_model=None,
) -> TrainResult:
    """Train ``cfg`` and leave a run folder at ``cfg.train.out_dir``.

    ``resume``: None (a fresh run; refuses to overwrite an existing one), "auto" (the newest valid
    checkpoint of the run folder, or a fresh start), or a checkpoint path. ``task``: the loader, validation
    batches, objective and model adaptation of a fine-tuning variant (default: language modelling on
    ``cfg.data``, prepared on demand). ``loader``/``val_batches``/``adapt_model`` are a shorthand for a
    language-modelling ``Task``. ``cache_dir``: where prepared data and the measured CPU peak are cached."""
    if loader is not None:
        if task is not None:
            raise TypeError("pass either task or loader/val_batches/adapt_model, not both")
        task = Task(loader=loader, val_batches=val_batches or (lambda: ()), adapt_model=adapt_model)
    run = setup_run(cfg, resume=resume, task=task, cache_dir=cache_dir, progress=progress)
    try:
        return run_loop(run)
    finally:
        run.close()
