"""``lmforge serve`` as a process: port 0 is reported on stdout, SIGTERM lets a running request finish and
exits cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_module
from tests.serve.conftest import tiny_checkpoint

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


@pytest.mark.slow
def test_sigterm_past_grace_answers_every_client(tmp_path):
    """Past the grace period, SIGTERM cut streams with no error event and no [DONE], answered 500 and logged
    tracebacks. With --grace 0 the two running requests are cancelled at once: the stream ends with an error
    event then [DONE], the non-streaming call gets a 503 error object, and the log has no traceback."""
    checkpoint = tiny_checkpoint(tmp_path, max_seq_len=4096)
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{Path(__file__).resolve().parents[2]}")
    command = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "serve",
        str(checkpoint),
        "--port",
        "0",
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(
        command + ["--grace", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line + proc.stderr.read()
        url = match.group(1)
        body = {"prompt": "long one", "max_tokens": 4000, "temperature": 0}
        answers = []
        plain = threading.Thread(
            target=lambda: answers.append(httpx.post(url + "/v1/completions", json=body, timeout=60))
        )
        plain.start()
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")  # decoding has started
            deadline = time.monotonic() + 30
            while httpx.get(url + "/health").json()["running"] < 2:  # both are in the batch
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            rest = [x for x in lines if x]
        plain.join(timeout=60)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down" and error["type"] == "server_error"
        assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
        assert "Traceback" not in log and "Cancel" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
