"""A short probe run: a few real AdamW steps of the model on this machine, on random tokens, to check the
planner's memory and step-time predictions and derive corrections from the difference.

Self-contained on purpose (its own step, its own activation checkpointing): it tests the planner's
assumptions, not the training loop. Memory is measured as the CUDA allocator's peak above the baseline, or
on the CPU as the growth of the resident set's high-water mark (Linux: reset through /proc/self/clear_refs,
with glibc told to give every allocation of 64 KiB or more back to the OS when freed, and its free heap
pages trimmed before the baseline).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.fused import apply_fused_blocks
from lmforge.model.transformer import build_model
from lmforge.plan.hardware import GIB, Hardware, resolve_hardware
from lmforge.plan.memory import Layout
from lmforge.plan.planner import (
    Cluster,
    Corrections,
    Report,
    largest_micro_batch,
    plan_cluster,
    predicted_memory,
    step_timing,
)


@dataclass(frozen=True)
class ProbeResult:
    device: str
    micro_batch: int
    seq_len: int
    steps: int
    measured_peak_bytes: int
    predicted_peak_bytes: int
    measured_step_s: float
    predicted_step_s: float
    memory_method: str

    @property
    def memory_scale(self) -> float:
        return self.measured_peak_bytes / max(1, self.predicted_peak_bytes)

    @property
    def time_scale(self) -> float:
        return self.measured_step_s / self.predicted_step_s

    def corrections(self) -> Corrections:
        return Corrections(memory_scale=self.memory_scale, time_scale=self.time_scale)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out.update(memory_scale=self.memory_scale, time_scale=self.time_scale)
        return out


def _checkpoint_blocks(model: torch.nn.Module) -> None:
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class _CpuPeak:
    """Resident-set growth above a baseline, with the kernel's high-water mark reset at the start."""

    def __init__(self) -> None:
        self.method = "ru_maxrss growth"
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD: big blocks go back to the OS
                # Free heap pages kept from earlier work in this process would be reused without growing the
                # resident set, hiding part of the probe's peak: hand them back before the baseline.
                libc.malloc_trim(0)
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.method = "VmHWM - VmRSS (Linux, high-water mark reset)"
            except OSError:
                pass
        self.baseline = self._read("VmRSS")

    def _read(self, field: str) -> int:
        if self.method.startswith("VmHWM") or field == "VmRSS":
            with contextlib.suppress(OSError):
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            return int(line.split()[1]) * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        return self._read("VmHWM") - self.baseline


def _train_steps(
    cfg: ModelConfig,
    dev: torch.device,
    micro_batch: int,
    seq_len: int,
    precision: str,
    activation_checkpointing: bool,
    steps: int,
) -> list[float]:
    """Build the model and run ``steps`` AdamW steps on random tokens; the seconds of each step."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    model = build_model(cfg, device=dev, seed=0)
    if dev.type == "cpu" and precision == "fp32":
        apply_fused_blocks(model)  # as parallelize applies it to a training run
    if activation_checkpointing:
        _checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    generator = torch.Generator(device=dev).manual_seed(0)
    times = []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), device=dev, generator=generator)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            logits = model(tokens[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        del logits, loss
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - started)
    return times


def run_probe(
    cfg: ModelConfig,
    *,
    hardware: Hardware,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16",
    activation_checkpointing: bool = False,
    steps: int = 4,
    device: str | None = None,
) -> ProbeResult:
    """Train ``steps`` steps (the first one is warm-up for timing) and compare with the planner."""
    if steps < 2:
        raise ConfigError(f"a probe needs at least 2 steps (one to warm up), got {steps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layout = Layout(
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        device_kind="cuda" if dev.type == "cuda" else "cpu",
    )
    predicted = predicted_memory(cfg, layout, hardware).tensors
    predicted_step = step_timing(cfg, layout, Cluster(hardware=hardware, gpus=1)).step_s
    # Warm up on a one-layer miniature first: kernels, thread pools and lazy imports are not the model's.
    mini = dataclasses.replace(
        cfg, n_layers=1, d_model=2 * cfg.head_dim, n_heads=2, n_kv_heads=None, vocab_size=64
    )
    mini = dataclasses.replace(mini, ffn_hidden=min(cfg.hidden_dim, 64))
    _train_steps(mini, dev, 2, min(seq_len, 16), precision, activation_checkpointing, 2)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        baseline = torch.cuda.memory_allocated(dev)
        method = "torch.cuda.max_memory_allocated growth"
    else:
        cpu_peak = _CpuPeak()
        method = cpu_peak.method
    times = _train_steps(cfg, dev, micro_batch, seq_len, precision, activation_checkpointing, steps)
    if dev.type == "cuda":
        measured = torch.cuda.max_memory_allocated(dev) - baseline
    else:
        measured = cpu_peak.peak()
    return ProbeResult(
        device=str(dev),
        micro_batch=micro_batch,
        seq_len=seq_len,
        steps=steps,
        measured_peak_bytes=int(measured),
        predicted_peak_bytes=int(predicted),
        measured_step_s=statistics.median(times[1:]),
        predicted_step_s=predicted_step,
        memory_method=method,
    )


def probe_report(
    report: Report, *, steps: int = 4, hardware_file: str | None = None
) -> tuple[ProbeResult, Report]:
    """Probe the report's chosen micro-batch on this machine and re-plan with the measured corrections.

    The probe runs one process; a plan for many GPUs is checked through its per-device micro-batch (clamped
    to what this machine holds). The ratios carry over to the planned hardware as they are.
    """
    if report.chosen is None:
        raise ConfigError(report.shortfall())
    local = resolve_hardware("auto", hardware_file)
    planned = report.chosen.layout
    layout = Layout(
        micro_batch=planned.micro_batch,
        seq_len=planned.seq_len,
        precision=planned.precision,
        activation_checkpointing=planned.activation_checkpointing,
        device_kind=local.kind,
    )
    capacity = local.memory_bytes * (0.8 if local.kind == "cpu" else 1.0)  # leave the CPU room to breathe
    micro_batch = largest_micro_batch(report.model, layout, local, planned.micro_batch, capacity)
    if micro_batch == 0:
        need = predicted_memory(report.model, dataclasses.replace(layout, micro_batch=1), local).total
        raise ConfigError(
            f"cannot probe on this machine ({local.name}, {local.memory_gib:.1f} GiB): micro-batch 1 of "
            f"{report.model.preset or 'this model'} at seq {planned.seq_len} needs {need / GIB:.1f} GiB "
            f"on one "
            f"device; probe a smaller model or run on the planned hardware"
        )
    result = run_probe(
        report.model,
        hardware=local,
        micro_batch=micro_batch,
        seq_len=planned.seq_len,
        precision=planned.precision,
        activation_checkpointing=planned.activation_checkpointing,
        steps=steps,
    )
    tp_degrees = tuple(sorted({c.layout.tp for c in report.candidates if c.layout.tp > 1}))
    ep_degrees = tuple(sorted({c.layout.ep for c in report.candidates}))
    corrected = plan_cluster(
        report.model,
        report.cluster,
        report.workload,
        tp_degrees=tp_degrees,
        ep_degrees=ep_degrees,
        corrections=result.corrections(),
    )
    if local.name != report.cluster.hardware.name:
        corrected.notes.append(
            f"the probe ran on {local.name}; its measured/predicted ratios are applied to "
            f"{report.cluster.hardware.name} as they are"
        )
    if micro_batch < planned.micro_batch:
        corrected.notes.append(f"the probe ran micro-batch {micro_batch} (this machine holds no more)")
    return result, corrected
