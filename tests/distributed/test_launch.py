"""``lmforge launch``: the torchrun command it runs, the Slurm script it writes, and the launch mistakes it
refuses before any process starts (a world size the config does not allow, an unreachable rendezvous)."""

from __future__ import annotations

import shlex
import socket

import pytest

from lmforge.cli import main
from lmforge.distributed import launch
from lmforge.distributed.launch import (
    LaunchSpec,
    slurm_script,
    torchrun_command,
    train_arguments,
    wait_for_endpoint,
)
from lmforge.errors import ConfigError


def test_one_machine_uses_a_standalone_rendezvous(capsys):
    assert main(["launch", "--nproc-per-node", "2", "--dry-run", "train.steps=20"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[0].endswith("torchrun") or words[1:3] == ["-m", "torch.distributed.run"]
    start = words.index("--standalone")
    assert words[start:] == [
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lmforge.cli",
        "train",
        "train.steps=20",
    ]


def test_restarts_resume_from_the_latest_checkpoint_by_themselves(capsys):
    assert (
        main(["launch", "--nproc-per-node", "2", "--max-restarts", "1", "--dry-run", "train.steps=20"]) == 0
    )
    words = shlex.split(capsys.readouterr().out)
    assert words[words.index("--max-restarts") + 1] == "1"
    assert words[-2:] == ["--resume", "auto"]


def test_multi_node_meets_at_the_endpoint(capsys):
    argv = ["launch", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "node001:29500",
            "--rdzv-id", "job7", "--dry-run", "train.steps=20"]  # fmt: skip
    assert main(argv) == 0
    command = capsys.readouterr().out
    for part in ("--nnodes 2", "--nproc-per-node 8", "--rdzv-backend c10d", "--rdzv-endpoint node001:29500",
                 "--rdzv-id job7", "--rdzv-conf join_timeout=120"):  # fmt: skip
        assert part in command
    assert "--standalone" not in command


def test_slurm_script_runs_one_torchrun_per_node_meeting_on_the_first(tmp_path):
    script = slurm_script(
        LaunchSpec(nnodes=4, nproc_per_node=8, max_restarts=2),
        train_arguments("cfg.yaml", ["train.steps=100"], resume=None, spec=LaunchSpec(max_restarts=2)),
        gpus_per_node=8,
        partition="gpu",
    )
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for directive in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --partition=gpu"):  # fmt: skip
        assert directive in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert '--rdzv-endpoint "$head_node:29500" --rdzv-id "$SLURM_JOB_ID"' in srun
    assert srun.endswith("--max-restarts 2 -m lmforge.cli train cfg.yaml train.steps=100 --resume auto")


def test_the_cli_writes_the_slurm_script(tmp_path, capsys):
    path = tmp_path / "job.sh"
    assert (
        main(["launch", "--nnodes", "2", "--nproc-per-node", "4", "--slurm", str(path), "train.steps=5"]) == 0
    )
    script = path.read_text()
    assert "#SBATCH --nodes=2" in script and "sbatch" in capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=4" in script  # one GPU per process unless told otherwise
    assert main(["launch", "--nproc-per-node", "4", "--slurm", str(path), "train.device=cpu"]) == 0
    assert "--gpus-per-node" not in path.read_text()
    assert main(["launch", "--nproc-per-node", "4", "--gpus-per-node", "8", "--slurm", str(path)]) == 0
    assert "#SBATCH --gpus-per-node=8" in path.read_text()


def test_a_world_size_the_config_does_not_allow_is_refused_before_launching(capsys):
    code = main(["launch", "--nproc-per-node", "2", "parallel.world_size=4", "train.steps=5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "parallel.world_size=4 but this launch starts 2 processes" in err


def test_bad_launch_options_are_listed_together():
    with pytest.raises(ConfigError) as info:
        torchrun_command(LaunchSpec(nnodes=2, nproc_per_node=0, max_restarts=-1), [])
    message = str(info.value)
    assert "--nproc-per-node=0" in message and "--max-restarts=-1" in message and "--rdzv-endpoint" in message
    with pytest.raises(ConfigError, match="HOST:PORT"):
        torchrun_command(LaunchSpec(nnodes=2, rdzv_endpoint="node001:http"), [])


class FakeClock:
    """monotonic() and sleep() over a counter: the retry schedule is checked without waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_an_unreachable_rendezvous_retries_until_the_timeout_and_then_fails(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(launch, "time", clock)
    attempts = []  # (clock time, connect timeout) of every connection attempt
    connect = socket.create_connection

    def counted_connect(address, *, timeout):
        attempts.append((clock.now, timeout))
        return connect(address, timeout=timeout)

    monkeypatch.setattr(launch.socket, "create_connection", counted_connect)
    # bound but not listening, and held for the whole test: nobody else can take the port meanwhile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(
            ConfigError,
            match=rf"cannot reach the rendezvous endpoint 127.0.0.1:{port} within 1.5s \(.*refused",
        ):
            wait_for_endpoint(f"127.0.0.1:{port}", 1.5, retry_s=0.25)
    # one attempt every 0.25 s from 0 up to the deadline, each bounded by the time left, and no sleep past it
    assert attempts == [(0.25 * i, 1.5 - 0.25 * i) for i in range(6)]
    assert clock.sleeps == [0.25] * 6 and clock.now == 1.5


def test_a_reachable_rendezvous_is_accepted():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_endpoint(f"127.0.0.1:{server.getsockname()[1]}", 5.0)
