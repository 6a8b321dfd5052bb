"""What a run reports: the rank-0 logger, ``metrics.jsonl``, TensorBoard, the progress bar, MFU, the loss
plot and the model card.

Only rank 0 writes; every other rank gets a logger that stays silent. Library code logs through
``get_logger()``, never with a bare ``print``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from lmforge.files import write_text_atomic

LOGGER_NAME = "lmforge"


def get_logger() -> logging.Logger:
    """lmforge's logger. ``RunLogger`` attaches a handler on rank 0; elsewhere it has none (silent)."""
    return logging.getLogger(LOGGER_NAME)


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes log lines above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never break training
            self.handleError(record)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_rate(tokens_per_second: float) -> str:
    if tokens_per_second >= 1e6:
        return f"{tokens_per_second / 1e6:.2f}M"
    if tokens_per_second >= 1e3:
        return f"{tokens_per_second / 1e3:.1f}k"
    return f"{tokens_per_second:.0f}"


class RunLogger:
    """Rank 0's reporting for one run: log lines, ``metrics.jsonl``, TensorBoard scalars, a progress bar.

    On a terminal (``progress=None`` and stderr is a TTY) a tqdm bar shows ETA, loss and tokens/s; elsewhere
    each ``log_every`` step prints one plain line. Ranks other than 0 do nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool | None = None,
        tensorboard: bool = True,
        stream: TextIO | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream or sys.stderr
        self.logger = get_logger()
        self._handler: logging.Handler | None = None
        self._writer = None
        self._bar = None
        self._metrics = None
        self._started = time.perf_counter()
        if not is_main:
            return
        self._handler = _TqdmSafeHandler(self.stream)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(self._handler)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=start_step)
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self.logger.warning("tensorboard is not importable; no event files will be written")
        if progress is None:
            progress = bool(getattr(self.stream, "isatty", lambda: False)())
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step", dynamic_ncols=True
            )

    def info(self, message: str) -> None:
        self.logger.info(message)

    def warning(self, message: str) -> None:
        self.logger.warning(message)

    def log(self, step: int, values: dict[str, Any], *, show: bool = True) -> None:
        """Append one record (``step`` plus ``values``) to metrics.jsonl and TensorBoard; show it."""
        if not self.is_main:
            return
        record = {"step": step, **values}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        if not show:
            return
        if self._bar is not None and "loss" in values:
            self._bar.set_postfix_str(self._postfix(values), refresh=False)
        elif self._bar is None or "loss" not in values:
            self.info(self._line(step, values))

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step`` (after a resume or a rollback to an earlier checkpoint)."""
        if not self.is_main:
            return
        self._metrics.close()
        truncate_metrics(self.run_dir, step)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (steps done)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    @staticmethod
    def _postfix(values: dict[str, Any]) -> str:
        parts = [f"loss {values['loss']:.4f}"]
        if "tokens_per_s" in values:
            parts.append(f"{format_rate(values['tokens_per_s'])} tok/s")
        if values.get("mfu") is not None:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        return " | ".join(parts)

    def _line(self, step: int, values: dict[str, Any]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val loss {:.4f}"), ("val_ppl", "ppl {:.2f}")):
            if key in values:
                parts.append(fmt.format(values[key]))
        if "lr" in values:
            parts.append(f"lr {values['lr']:.2e}")
        if "tokens_per_s" in values:
            parts.append(f"{format_rate(values['tokens_per_s'])} tok/s")
        if values.get("mfu") is not None:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        if "loss" in values and step > self.start_step:
            elapsed = time.perf_counter() - self._started
            remaining = elapsed / (step - self.start_step) * (self.total_steps - step)
            parts.append(f"eta {format_duration(remaining)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return records


def truncate_metrics(run_dir: str | Path, after_step: int) -> None:
    """Drop records past ``after_step`` (written by a run that died after its last checkpoint), atomically."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# -- MFU ---------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(dtype_name: str, *, size: int = 1024, repeats: int = 40) -> float:
    """The best FLOP/s of a square ``size`` matmul on the CPU with the current thread count. Many short
    repeats, because other processes on the same cores make single timings several times too slow."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    # Never the global RNG: a run's random stream must not depend on this measurement.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def cpu_peak_flops(precision: str, cache_dir: str | Path | None) -> float:
    """The CPU's matmul peak for ``precision``: measured at every call (a fraction of a second) and kept in a
    JSON cache per (CPU, threads, torch) as the best measurement so far. Other processes on the same cores
    can only make a measurement too low, so a peak measured once on a busy machine would report MFU above
    100% for ever after; the best one seen is the peak."""
    import torch

    key = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{precision}"
    path = Path(cache_dir) / "cpu_peak.json" if cache_dir is not None else None
    table: dict[str, float] = {}
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            table = {}
    cached = float(table.get(key, 0.0))
    peak = max(cached, measure_matmul_flops(precision))
    if path is not None and peak > cached:
        table[key] = peak
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(table, indent=2))
        except OSError:  # a read-only cache only costs the best-so-far
            pass
    return peak


def peak_flops(device, precision: str, cache_dir: str | Path | None) -> float | None:
    """Peak FLOP/s of one device for MFU: the GPU's entry in the planner's hardware table
    (``plan.hardware``), or the measured CPU matmul peak."""
    import torch

    if device.type == "cuda":
        from lmforge.errors import ConfigError
        from lmforge.plan.hardware import hardware_from_device_name

        props = torch.cuda.get_device_properties(device)
        try:
            hw = hardware_from_device_name(props.name, props.total_memory)
        except ConfigError:  # a GPU missing from the table: no MFU, the rest of the metrics stand
            return None
        return (hw.fp32_tflops * 1e12 or None) if precision == "fp32" else hw.peak_flops
    if device.type == "cpu":
        return cpu_peak_flops(precision, cache_dir)
    return None


def hardware_summary(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


# -- plots and the model card ------------------------------------------------------------------------------


def plot_runs(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Training and validation loss of one or more runs against tokens seen, overlaid in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    fig, ax = plt.subplots(figsize=(8, 5))
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        name = Path(run_dir).name
        train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
        val = [r for r in records if "val_loss" in r]
        x_key = "tokens" if train and all("tokens" in r for r in train + val) else "step"
        if train:
            (line,) = ax.plot([r[x_key] for r in train], [r["loss"] for r in train], label=f"{name} train")
            color = line.get_color()
        else:
            color = None
        if val:
            ax.plot(
                [r[x_key] for r in val], [r["val_loss"] for r in val], "o--", color=color, label=f"{name} val"
            )
    ax.set_xlabel("tokens seen" if x_key == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f"{out_path.stem}.tmp-{os.getpid()}{out_path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def model_card(summary: dict[str, Any]) -> str:
    """MODEL_CARD.md text from a run summary (see ``train.loop.train``)."""
    m = summary["model"]
    lines = [
        f"# {summary['name']}",
        "",
        "A decoder-only Transformer language model trained with lmforge.",
        "",
        "## Architecture",
        "",
        f"- {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads "
        f"({m['kv_heads']} key/value), feed-forward {m['ffn']} {m['hidden_dim']}",
        f"- positions: {m['position']}, norm: {m['norm']}, tied embeddings: {m['tie_embeddings']}",
        f"- context: {summary['seq_len']} tokens (max {m['max_seq_len']}), vocabulary: {m['vocab_size']}",
        f"- parameters: {summary['parameters']:,}",
        "",
        "## Data",
        "",
    ]
    for source in summary.get("sources") or ["(prepared data; sources not recorded)"]:
        lines.append(f"- {source}")
    report = summary.get("data_report")
    if report:
        lines += ["", "Cleaning report:", "", "```json", json.dumps(report, indent=2)[:4000], "```"]
    lines += [
        "",
        "## Tokenizer",
        "",
        f"- {summary.get('tokenizer') or 'unknown'} ({m['vocab_size']} ids in the model)",
        "",
        "## Training",
        "",
        f"- steps: {summary['step']}, tokens seen: {summary['tokens']:,}",
        f"- optimizer: AdamW, lr {summary['lr']} ({summary['schedule']} schedule), "
        f"weight decay {summary['weight_decay']}, precision {summary['precision']}",
        f"- final training loss: {_fmt(summary.get('final_loss'))}",
        f"- final validation loss: {_fmt(summary.get('val_loss'))} (perplexity {_fmt(summary.get('val_ppl'))})",
        f"- skipped (non-finite) steps: {summary.get('bad_steps', 0)}",
        f"- hardware: {summary['hardware']}",
        f"- wall time: {format_duration(summary['wall_seconds'])}",
        "",
        "## Limitations",
        "",
        "A small model trained briefly: it imitates the surface of its training text and knows nothing reliable.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
