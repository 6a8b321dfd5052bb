"""One sweep trial: a real ``lmforge train`` in its own process and run folder, watched through the
``metrics.jsonl`` it writes.

Every value of the objective the run logs is handed to ``report`` (which says whether to prune); a
non-finite loss or objective, or train giving up on non-finite steps, ends the run as diverged. The outcome is always a value, never
an exception: a run that diverges, runs out of memory, is killed or fails is recorded, and the sweep goes on.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Values of a metrics record that make a run diverged when they are not finite. (Not the gradient norm: an
# fp16 run's grad scaler overflows now and then by design, and train's own bad-step guard ends a run whose
# gradients stay non-finite, which is then recorded as diverged too.)
WATCHED = ("loss",)
TAIL_CHARS = 2000  # of the trial's output, kept with a failed trial


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: ``value`` is its last objective value (None when it logged none)."""

    state: Literal["complete", "pruned", "failed"]
    value: float | None
    reason: str  # why it was pruned or failed ("" when complete)
    last_step: int  # the last step the run logged
    seconds: float
    returncode: int | None
    output_tail: str = ""  # the end of a failed run's output (its traceback or error line)


def train_command(config_path: Path) -> list[str]:
    """The command a trial runs: ``lmforge train`` with this interpreter, on the trial's own config."""
    return [sys.executable, "-m", "lmforge.cli", "train", str(config_path), "--no-progress"]


class MetricsFollower:
    """Reads the records a running trial appends to ``metrics.jsonl``, each once. A run that rolls back
    rewrites the file shorter; the follower then starts over and skips the steps it has already seen."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.seen: set[tuple[int, str]] = set()

    def new_records(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset = 0
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        records = []
        for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            key = (record["step"], ",".join(sorted(record)))
            if key not in self.seen:
                self.seen.add(key)
                records.append(record)
        return records


def _not_finite(value) -> bool:
    return isinstance(value, int | float) and not math.isfinite(value)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - TAIL_CHARS))
            return handle.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _error_line(tail: str) -> str:
    """The error ``lmforge train`` printed (a multi-line one joined into one line), else its last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if "error:" in line]
    if not starts:
        return lines[-1] if lines else "(no output)"
    text = " ".join(lines[starts[-1] :])
    return text if len(text) <= 500 else text[:497] + "..."


def stop_process_group(process: subprocess.Popen, grace_s: float = 0.0) -> None:
    """End a trial and anything it started: SIGTERM (when ``grace_s``) then SIGKILL to its process group."""
    if process.poll() is not None:
        return
    try:
        if grace_s > 0:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_trial(
    command: list[str],
    run_dir: Path,
    *,
    objective: str,
    report: Callable[[int, float], bool],
    should_stop: Callable[[], bool] = lambda: False,
    heartbeat: Callable[[], None] = lambda: None,
    on_start: Callable[[int], None] = lambda pid: None,
    env: dict[str, str] | None = None,
    poll_s: float = 0.25,
) -> Outcome:
    """Run ``command`` (writing ``run_dir``), follow its metrics and return how it ended.

    ``report(step, value)`` receives each finite objective value and returns True to prune the trial;
    ``should_stop()`` True ends the trial as failed (the sweep is stopping); ``heartbeat()`` is called every
    poll; ``on_start(pid)`` once the process exists. The process's output goes to ``run_dir/train.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    log_path = run_dir / "train.log"
    started = time.perf_counter()
    value: float | None = None
    last_step = 0
    verdict: tuple[str, str] | None = None  # (state, reason) decided while the run was alive
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    on_start(process.pid)
    try:
        while verdict is None:
            finished = process.poll() is not None  # read the metrics after the exit: none is missed
            for record in follower.new_records():
                last_step = max(last_step, record["step"])
                bad = [k for k in (*WATCHED, objective) if _not_finite(record.get(k))]
                if bad:
                    verdict = ("pruned", f"diverged: {bad[0]}={record[bad[0]]} at step {record['step']}")
                    break
                if isinstance(record.get(objective), int | float):
                    value = float(record[objective])
                    if report(record["step"], value):
                        verdict = ("pruned", f"pruned at step {record['step']} ({objective} {value:.4g})")
                        break
            if verdict is not None or finished:
                break
            if should_stop():
                verdict = ("failed", "the sweep was stopped while this trial ran")
                break
            heartbeat()
            time.sleep(poll_s)
    finally:
        stop_process_group(process)  # a no-op when it has exited; else pruned, stopped or an error here
    seconds = time.perf_counter() - started
    code = process.returncode
    if verdict is not None:
        return Outcome(verdict[0], value, verdict[1], last_step, seconds, code)
    if code == 0:
        if value is None:
            return Outcome("failed", None, f"the run logged no {objective}", last_step, seconds, code)
        return Outcome("complete", value, "", last_step, seconds, code)
    tail = _tail(log_path)
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        reason = f"killed by {name}{hint}: {_error_line(tail)}"
        return Outcome("failed", value, reason, last_step, seconds, code, tail)
    if "non-finite" in _error_line(tail):  # train's bad-step guard gave up: the run diverged
        return Outcome("pruned", value, f"diverged: {_error_line(tail)}", last_step, seconds, code)
    return Outcome("failed", value, f"exit code {code}: {_error_line(tail)}", last_step, seconds, code, tail)
