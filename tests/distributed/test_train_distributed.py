"""The training loop under torchrun (gloo, 2 processes) against the same loop in one process.

``run_loop.py`` runs ``lmforge.train.loop.train`` on a loader whose global batch is a pure function of the
step, sliced by rank, so 1 and 2 processes see the same data. Compared over 20 steps (fp32): DDP and FSDP
loss curves; checkpoints written by 2 ranks resumed on 1 and by 1 rank resumed on 2; a rank killed mid-run
under ``--max-restarts 1``; and a launch whose world size the config forbids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.processes import run_group
from tests.distributed.run_loop import main as run_in_this_process

HERE = Path(__file__).parent
TOLERANCE = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def curve(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "result.json").read_text())["curve"]


def final_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "result.json").read_text())["final_loss"]


def assert_same_curve(run: dict[str, float], reference: dict[str, float], steps: range) -> None:
    assert sorted(map(int, run)) == list(steps)
    worst = max(abs(run[str(s)] - reference[str(s)]) / reference[str(s)] for s in steps)
    assert worst <= TOLERANCE, f"relative difference {worst:.2e}"


def torchrun(
    *runs: str, options: tuple[str, ...] = (), script_options: tuple[str, ...] = (), timeout: float = 120
) -> subprocess.CompletedProcess:
    return run_group(
        [*TORCHRUN, *options, str(HERE / "run_loop.py"), *script_options, *runs],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A single-process reference run of 20 steps (checkpoints every 5, all kept)."""
    out = tmp_path_factory.mktemp("loop")
    run_in_this_process([f"{out}/reference:20:auto"])
    return out


@pytest.fixture(scope="module")
def data_parallel_runs(out):
    for strategy in ("ddp", "fsdp"):
        completed = torchrun(f"{out}/{strategy}:20:{strategy}")
        assert completed.returncode == 0, completed.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_loop_under_torchrun_reproduces_the_single_process_loss_curve(data_parallel_runs, strategy):
    reference = curve(data_parallel_runs / "reference")
    assert reference["20"] < reference["1"] - 1.0  # it learns: a flat curve would prove nothing
    assert_same_curve(curve(data_parallel_runs / strategy), reference, range(1, 21))
    sharded = data_parallel_runs / strategy / "checkpoints" / "step_00000010"
    assert (sharded / "dcp" / ".metadata").is_file() and (sharded / "rank_00001.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_checkpoint_written_by_2_ranks_continues_on_1(data_parallel_runs, strategy):
    out = data_parallel_runs
    checkpoint = out / strategy / "checkpoints" / "step_00000010"
    run_in_this_process([f"{out}/{strategy}-on-1:20:auto:{checkpoint}"])
    assert_same_curve(curve(out / f"{strategy}-on-1"), curve(out / "reference"), range(11, 21))


@pytest.mark.slow
def test_a_checkpoint_written_by_1_rank_continues_on_2(out):
    checkpoint = out / "reference" / "checkpoints" / "step_00000010"
    completed = torchrun(f"{out}/on-2:20:fsdp:{checkpoint}")
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert_same_curve(curve(out / "on-2"), curve(out / "reference"), range(11, 21))


@pytest.mark.slow
def test_ddp_with_two_micro_batches_per_step_sums_the_gradients_once(out):
    """Each rank accumulates 2 micro-batches. DDP reduces the accumulated gradient, so summing after both
    backward passes would count the first micro-batch twice (measured: 7.4% off the curve by step 20);
    ``no_sync`` before the last keeps the curve."""
    completed = torchrun(f"{out}/ddp-accum:20:ddp", script_options=("--accum", "2"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert_same_curve(curve(out / "ddp-accum"), curve(out / "reference"), range(1, 21))


DIE_AT = 13  # rank 1 kills itself drawing this step's batch: past the step-10 checkpoint, before step 15's


@pytest.mark.slow
def test_a_killed_rank_restarts_the_job_which_resumes_and_ends_with_the_same_loss(out):
    """Rank 1 SIGKILLs itself at step 13 of the first attempt. Both ranks had finished step 12 together
    (its gradients are all-reduced), so the step-10 checkpoint was complete: the restarted group resumes
    from it and ends with the uninterrupted run's loss."""
    run = out / "fault"
    completed = torchrun(
        f"{run}:20:ddp:auto", options=("--max-restarts", "1"), script_options=("--die-at", str(DIE_AT))
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = completed.stdout + completed.stderr
    assert "exitcode: -9" in output  # the first attempt lost a rank to SIGKILL
    # the first attempt ended at step 13; the restarted group continued from the step-10 checkpoint
    first_attempt, resumed = output.split(
        f"resumed from {run / 'checkpoints' / 'step_00000010'} at step 10\n"
    )
    assert "step 12/20" in first_attempt and "step 13/20" not in first_attempt
    assert "step 11/20" in resumed and "step 20/20" in resumed
    assert (run / "checkpoints" / "step_00000020").is_dir()
    reference = final_loss(out / "reference")
    assert abs(final_loss(run) - reference) / reference <= TOLERANCE


@pytest.mark.slow
def test_a_world_size_the_config_forbids_ends_every_rank_with_a_clear_message(tmp_path):
    completed = run_group(
        [*TORCHRUN, "-m", "lmforge.cli", "train", "parallel.world_size=4", f"train.out_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode != 0
    message = "lmforge train: error: parallel.world_size=4 but the launcher started WORLD_SIZE=2 processes"
    assert completed.stderr.count(message) == 2  # every rank says why, in one line
    # refused at the boundary: nothing was built, trained or written, and no rank waited in a collective
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "timed out" not in completed.stderr.lower() and "timeout" not in completed.stderr.lower()


@pytest.mark.slow
def test_a_sharded_checkpoint_of_another_model_shape_is_refused_with_the_fields_named(data_parallel_runs):
    import dataclasses

    from lmforge.errors import CheckpointError
    from lmforge.train.loop import train
    from tests.distributed.run_loop import SlicedLoader, config

    cfg = config(str(data_parallel_runs / "wider"), 20, "auto", 1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=48))
    checkpoint = data_parallel_runs / "fsdp" / "checkpoints" / "step_00000010"
    with pytest.raises(CheckpointError, match=r"model\.d_model: checkpoint 32, config 48"):
        train(cfg, resume=str(checkpoint), loader=SlicedLoader(rank=0, world_size=1, seed=0), progress=False)


# -- tensor parallelism (parallel.tp) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensor_parallel_runs(tmp_path_factory):
    """An untied model (so the output head is split too): a single-process reference; TP over 2 processes,
    stopped at step 10 and resumed; 2-D FSDP x TP over 4 processes (2 data-parallel x 2 tensor-parallel)."""
    out = tmp_path_factory.mktemp("tp")
    run_in_this_process(["--untied", "1", f"{out}/reference:20:auto"])
    for nproc, runs in (
        (2, [f"{out}/tp:10:auto", f"{out}/tp:20:auto:auto"]),
        (4, [f"{out}/fsdp-tp:20:fsdp"]),
    ):
        completed = run_group(
            [*TORCHRUN[:-1], str(nproc), str(HERE / "run_loop.py"), "--tp", "2", "--untied", "1", *runs],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-4000:]
        (out / f"log-{nproc}.txt").write_text(completed.stdout + completed.stderr)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp", "fsdp-tp"])
def test_tensor_parallel_reproduces_the_single_process_loss_curve(tensor_parallel_runs, run):
    reference = curve(tensor_parallel_runs / "reference")
    assert reference["20"] < reference["1"] - 1.0
    assert_same_curve(curve(tensor_parallel_runs / run), reference, range(1, 21))
    sharded = tensor_parallel_runs / run / "checkpoints" / "step_00000020"
    assert (sharded / "dcp" / ".metadata").is_file() and (sharded / "rank_00001.pt").is_file()
    if run == "tp":  # the second half resumed from the sharded step-10 checkpoint of the first
        assert "step_00000010 at step 10" in (tensor_parallel_runs / "log-2.txt").read_text()
