"""Running a multi-process job from a test without leaving processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence


def run_group(
    command: Sequence[str], *, timeout: float, capture_output: bool = False, text: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a session of its own. On timeout the whole process group is killed (torchrun's
    agent AND its workers: killing the agent alone orphans workers that wait forever on its store), then
    ``TimeoutExpired`` is raised with what the job printed."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE} if capture_output else {}
    with subprocess.Popen(command, start_new_session=True, text=text, **pipes, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
