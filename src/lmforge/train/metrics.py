"""What a run reports as it goes: the rank-0 logger, ``metrics.jsonl``, the trackers, the progress bar.

The trackers (TensorBoard, MLflow, W&B) are in ``train.trackers``.

The loss plot is in ``train.plots``, the model card in ``train.card``, the hardware's peak FLOP/s (for
MFU) in ``plan.hardware``.

Only rank 0 writes; every other rank gets a logger that stays silent. Library code logs through
``get_logger()``, never with a bare ``print``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from lmforge.files import write_text_atomic
from lmforge.train.trackers import Tracker, Trackers

LOGGER_NAME = "lmforge"


def get_logger() -> logging.Logger:
    """lmforge's logger. ``RunLogger`` attaches a handler on rank 0; elsewhere it has none (silent)."""
    return logging.getLogger(LOGGER_NAME)


@contextmanager
def plain_log_lines(stream: TextIO | None) -> Iterator[None]:
    """lmforge's INFO lines as plain text on ``stream`` while the block runs (None: no change), for work
    before a run's ``RunLogger`` exists (preparing its data on the first run). Nothing is added where a
    handler already writes to ``stream``."""
    logger = get_logger()
    if stream is None or any(getattr(h, "stream", None) is stream for h in logger.handlers):
        yield
        return
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


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
        trackers: Sequence[str | Tracker] | None = None,
        config: dict | None = None,
        resume: bool = False,
        mlflow_uri: str | None = None,
    ):
        """``trackers``: names in ``trackers.TRACKERS`` or tracker objects (default: TensorBoard unless
        ``tensorboard=False``); ``config`` is logged to them as parameters; ``resume`` continues the tracker
        runs whose ids ``RUN/trackers.json`` holds."""
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.total_steps = total_steps
        self.start_step = start_step
        self.stream = stream or sys.stderr
        self.logger = get_logger()
        self._handler: logging.Handler | None = None
        self._trackers: Trackers | None = None
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
        if trackers is None:
            trackers = ["tensorboard"] if tensorboard else []
        self._trackers = Trackers.open(
            trackers,
            self.run_dir,
            warn=self.warning,
            config=config,
            resume=resume,
            start_step=start_step,
            mlflow_uri=mlflow_uri,
        )
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
        if self._trackers is not None:
            self._trackers.log(step, values)
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
        if self._trackers is not None:  # the loss plot and model card, if the run wrote them, as artifacts
            self._trackers.finish(self.run_dir)
            self._trackers = None
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
