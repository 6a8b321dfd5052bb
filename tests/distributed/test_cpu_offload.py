"""FSDP2 with ``parallel.cpu_offload=true`` on the CPU (gloo, 2 processes) through the training loop: the
same loss curve as one process without FSDP, and the same as FSDP without offload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.distributed.processes import run_group
from tests.distributed.run_loop import main as run_in_this_process

HERE = Path(__file__).parent
TOLERANCE = 1e-5  # the single-process reference sums in another order than two ranks do
STEPS = 12


def curve(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "result.json").read_text())["curve"]


@pytest.mark.slow
def test_fsdp_with_cpu_offload_on_gloo_follows_the_single_process_curve(tmp_path):
    run_in_this_process([f"{tmp_path}/reference:{STEPS}:single"])
    completed = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "run_loop.py"), f"{tmp_path}/fsdp:{STEPS}:fsdp", "--offload", "1",
         f"{tmp_path}/offload:{STEPS}:fsdp"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    reference, fsdp, offload = (curve(tmp_path / name) for name in ("reference", "fsdp", "offload"))
    assert reference[str(STEPS)] < reference["1"] - 0.5  # it learns: a flat curve would prove nothing
    assert sorted(map(int, offload)) == list(range(1, STEPS + 1))
    worst = max(abs(offload[s] - reference[s]) / reference[s] for s in reference)
    assert worst <= TOLERANCE, f"relative difference to one process {worst:.2e}"
    assert offload == fsdp  # the offloaded optimizer step computes what the on-device one does, bit for bit
    checkpoint = tmp_path / "offload" / "checkpoints" / f"step_{STEPS:08d}"
    assert (checkpoint / "dcp" / ".metadata").is_file()
