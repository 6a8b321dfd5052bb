"""A GRPO run on 2 processes with FSDP (gloo, CPU) equals the same run in one process: the same prompts and
sampling seeds (each generate call is seeded by round and call, not by process), so the same completions,
and losses, gradient norms and the final weights within 1e-5. (The objective's own figures, KL, clipping,
entropy, are the loop's per-process metrics: rank 0's micro-batches only, so they are not compared.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.processes import run_group
from tests.tune.grpo_fsdp import run
from tests.tune.test_grpo_run import prompts

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.mark.slow
def test_two_fsdp_processes_equal_one(base_checkpoint, tmp_path):
    data = prompts(tmp_path / "p.jsonl", n=16)
    one = run(str(base_checkpoint), str(data), str(tmp_path / "one"), "single")
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    completed = run_group(
        [*TORCHRUN, str(Path(__file__).parent / "grpo_fsdp.py"), str(base_checkpoint), str(data),
         str(tmp_path / "two"), "fsdp"],
        capture_output=True, text=True, timeout=300, cwd=root, env=env,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (tmp_path / "two" / "checkpoints" / "step_00000004" / "dcp").is_dir()  # it did shard

    def logged(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if "loss" in r}

    a, b = logged(one.run_dir), logged(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["reward"] == b[step]["reward"]  # the same completions, scored the same
        assert a[step]["completion_length"] == b[step]["completion_length"]
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, (step, a[step]["loss"], b[step]["loss"])
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= 1e-5 * a[step]["grad_norm"]
    assert a[4]["grad_norm"] > 0 and a[4]["kl"] > 0  # the run moved away from the reference
    w1, w2 = (
        load_file(one.model_dir / "model.safetensors"),
        load_file(tmp_path / "two" / "model" / "model.safetensors"),
    )
    assert w1.keys() == w2.keys()
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) <= 1e-5
    assert any(not torch.equal(w1[k], load_file(base_checkpoint / "model.safetensors")[k]) for k in w1)
