"""Start ``lmforge train`` on several processes and nodes through ``torchrun``, or write a Slurm script.

One machine: ``torchrun --standalone --nproc-per-node N``. Several machines: every node runs the same
``torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT`` and they meet at the endpoint, which
the node on HOST serves. With ``--max-restarts K`` torchrun restarts the whole group after a failure; the
training command then carries ``--resume auto``, so the restarted processes continue from the newest valid
checkpoint by themselves. This module (with ``cli``) is the one place that reads the environment.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from lmforge.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """How many processes on how many nodes, where they meet, and how often a failed group restarts."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST[:PORT]; needed when nnodes > 1
    rdzv_id: str = "lmforge"
    max_restarts: int = 0
    rdzv_timeout_s: float = 120.0  # how long a node waits for the endpoint and for the other nodes

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def problems(self) -> list[str]:
        out = []
        if self.nproc_per_node < 1:
            out.append(f"--nproc-per-node={self.nproc_per_node} must be >= 1")
        if self.nnodes < 1:
            out.append(f"--nnodes={self.nnodes} must be >= 1")
        if self.max_restarts < 0:
            out.append(f"--max-restarts={self.max_restarts} must be >= 0")
        if self.rdzv_timeout_s <= 0:
            out.append(f"--rdzv-timeout={self.rdzv_timeout_s} must be > 0")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            out.append(
                f"--nnodes={self.nnodes} needs --rdzv-endpoint HOST:PORT (the address of one node, "
                f"port {DEFAULT_PORT} by default) so the nodes can find each other"
            )
        if self.rdzv_endpoint:
            try:
                split_endpoint(self.rdzv_endpoint)
            except ConfigError as exc:
                out.append(str(exc))
        return out


def validate(spec: LaunchSpec) -> None:
    problems = spec.problems()
    if problems:
        raise ConfigError("invalid launch:\n  " + "\n  ".join(problems))


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--rdzv-endpoint={endpoint!r} must look like HOST:PORT (e.g. node001:{DEFAULT_PORT})"
        )
    return host, int(port)


def train_arguments(
    config: str | None, overrides: list[str], *, resume: str | None, spec: LaunchSpec
) -> list[str]:
    """The ``lmforge train`` arguments each process runs; restarts need ``--resume auto`` to continue."""
    args = ([config] if config else []) + list(overrides)
    if resume is None and spec.max_restarts > 0:
        resume = "auto"
    if resume is not None:
        args += ["--resume", resume]
    return args


def torchrun_prefix() -> list[str]:
    """``torchrun`` beside this Python when installed there, else the same program as a module."""
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def torchrun_arguments(
    spec: LaunchSpec, *, endpoint: str | None = None, rdzv_id: str | None = None
) -> list[str]:
    """torchrun's own options for ``spec``; ``endpoint`` / ``rdzv_id`` may be shell words (Slurm)."""
    args = ["--nproc-per-node", str(spec.nproc_per_node)]
    if spec.nnodes == 1 and spec.rdzv_endpoint is None:
        args = ["--standalone", *args]
    else:
        args = [
            "--nnodes", str(spec.nnodes), *args,
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint or spec.rdzv_endpoint,
            "--rdzv-id", rdzv_id or spec.rdzv_id,
            "--rdzv-conf", f"join_timeout={int(spec.rdzv_timeout_s)}",
        ]  # fmt: skip
    if spec.max_restarts:
        args += ["--max-restarts", str(spec.max_restarts)]
    return args


def torchrun_command(spec: LaunchSpec, train_args: list[str]) -> list[str]:
    validate(spec)
    return [*torchrun_prefix(), *torchrun_arguments(spec), "-m", "lmforge.cli", "train", *train_args]


def slurm_script(
    spec: LaunchSpec,
    train_args: list[str],
    *,
    job_name: str = "lmforge",
    time_limit: str = "24:00:00",
    gpus_per_node: int | None = None,
    partition: str | None = None,
) -> str:
    """A batch script for ``sbatch``: one task per node, each running torchrun; the first node of the
    allocation serves the rendezvous, and Slurm's job id names it."""
    port = split_endpoint(spec.rdzv_endpoint)[1] if spec.rdzv_endpoint else DEFAULT_PORT
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={spec.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={job_name}-%j.out",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    multi = dataclasses.replace(spec, rdzv_endpoint=f"head:{port}")  # always the c10d rendezvous
    validate(multi)
    torchrun = torchrun_arguments(multi, endpoint="__ENDPOINT__", rdzv_id="__JOBID__")
    command = shlex.join(["torchrun", *torchrun, "-m", "lmforge.cli", "train", *train_args])
    command = command.replace("__ENDPOINT__", f'"$head_node:{port}"').replace("__JOBID__", '"$SLURM_JOB_ID"')
    lines += [
        "",
        "set -euo pipefail",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun {command}",
        "",
    ]
    return "\n".join(lines)


def is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (then torchrun here serves the rendezvous)."""
    if host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    import psutil

    local = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(addresses & local)


def wait_for_endpoint(endpoint: str, timeout_s: float, *, retry_s: float = 1.0) -> None:
    """Return once ``endpoint`` accepts a TCP connection; raise ConfigError after ``timeout_s``."""
    host, port = split_endpoint(endpoint)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConfigError(
                f"cannot reach the rendezvous endpoint {host}:{port} within {timeout_s:g}s ({last}); start the "
                f"job on the node {host} first, check the address and that port {port} is open between the "
                "nodes, or wait longer with --rdzv-timeout"
            )
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 5.0)):
                return
        except OSError as exc:
            last = exc.strerror or str(exc) or type(exc).__name__
        time.sleep(min(retry_s, max(0.0, deadline - time.monotonic())))


def check_world_size(spec: LaunchSpec, config_world_size: int | None) -> None:
    if config_world_size is not None and config_world_size != spec.world_size:
        raise ConfigError(
            f"parallel.world_size={config_world_size} but this launch starts {spec.world_size} processes "
            f"({spec.nnodes} node(s) x {spec.nproc_per_node}); change --nproc-per-node/--nnodes or the config"
        )


def run(spec: LaunchSpec, train_args: list[str], *, config_world_size: int | None) -> int:
    """Check what can be checked before any process starts (world size, a reachable rendezvous), then run
    torchrun and return its exit code."""
    command = torchrun_command(spec, train_args)
    check_world_size(spec, config_world_size)
    if spec.rdzv_endpoint and not is_local_host(split_endpoint(spec.rdzv_endpoint)[0]):
        wait_for_endpoint(spec.rdzv_endpoint, spec.rdzv_timeout_s)
    return subprocess.call(command)
