"""The test helper that runs multi-process jobs kills the whole job on timeout, leaving nothing behind."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed.processes import run_group


def alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has exited; only its parent's bookkeeping is left


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_timeout_kills_the_workers_too_not_only_the_launcher(tmp_path):
    pidfile = tmp_path / "worker.pid"
    # a launcher (bash) waiting on its worker (sleep), which does not hold the launcher's pipes open
    script = f"sleep 600 >/dev/null 2>&1 & echo $! > {pidfile}; wait"
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_group(["bash", "-c", script], timeout=2, capture_output=True, text=True)
    assert caught.value.timeout == 2
    worker = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def test_a_finished_job_returns_its_output_and_code():
    done = run_group(
        ["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=30, capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
