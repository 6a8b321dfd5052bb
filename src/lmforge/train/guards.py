"""Guards that keep a long run alive: non-finite steps, loss spikes, and stop signals.

Each guard is a small object with explicit state (saved in the checkpoint where it matters); the loop
calls it with one visible line per step.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field


@dataclass
class BadStepGuard:
    """Counts steps whose loss or gradient is not finite. ``max_consecutive`` in a row asks for a rollback."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0

    def record(self, finite: bool) -> bool:
        """Record one step; True when the run should roll back to its last checkpoint."""
        if finite:
            self.consecutive = 0
            return False
        self.total += 1
        self.consecutive += 1
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


@dataclass
class SpikeDetector:
    """Flags a loss more than ``zscore`` standard deviations above its exponential moving average.

    The mean and variance are exponentially weighted (``decay``) and only updated with non-spike losses,
    so one spike does not hide the next. Nothing is flagged during the first ``warmup`` losses.
    """

    zscore: float
    decay: float = 0.98
    warmup: int = 20
    count: int = 0
    mean: float = 0.0
    var: float = 0.0
    spikes: int = 0

    def check(self, loss: float) -> float | None:
        """The z-score of ``loss`` when it is a spike, else None (and the statistics absorb it)."""
        if self.count >= self.warmup and self.var > 0:
            z = (loss - self.mean) / math.sqrt(self.var)
            if z > self.zscore:
                self.spikes += 1
                return z
        self.count += 1
        if self.count == 1:
            self.mean = loss
            return None
        delta = loss - self.mean
        self.mean += (1 - self.decay) * delta
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        return None

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var, "spikes": self.spikes}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.spikes = int(state["count"]), int(state["spikes"])
        self.mean, self.var = float(state["mean"]), float(state["var"])


@dataclass
class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps (it then checkpoints and exits).

    Use as a context manager; the previous handlers come back on exit. A second Ctrl-C while the flag is
    already set raises KeyboardInterrupt at once.
    """

    received: str | None = None
    _previous: dict = field(default_factory=dict)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
