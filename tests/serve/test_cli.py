"""``lmforge serve`` as a process: port 0 is reported on stdout, SIGTERM lets a running request finish and
exits cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_module

httpx = require_module("httpx")

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.slow
def test_serve_process_port_zero_and_sigterm(checkpoint):
    env = dict(
        os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{Path(__file__).resolve().parents[2]}", LMFORGE_API_KEY="k"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge.cli",
            "serve",
            str(checkpoint),
            "--port",
            "0",
            "--device",
            "cpu",
            "--grace",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match and match.group(2) != "0", line + proc.stderr.read()
        url = match.group(1)
        headers = {"Authorization": "Bearer k"}  # from LMFORGE_API_KEY
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"prompt": "run", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # decoding has started
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the running request finished inside the grace period
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
