"""Expert parallelism (``parallel.ep``) through the training loop under torchrun (gloo) against one process.

A tiny Mixture-of-Experts model (4 experts, top 2, d_model 32, 2 layers) with the load-balancing loss and
DeepSeek-V3's bias update on, 2 micro-batches per step, 20 steps (``run_loop.py``; every run sees the same
global batches). Compared with the single-process run: loss per step and final weights of EP 2 on 2
processes (DDP and FSDP for the dense weights) and of EP 2 x 2 data-parallel replicas on 4; a checkpoint
written at EP 2 continued at EP 1, and ones written by one process and by 2 processes without EP continued
at EP 2. Then the boundary
errors, and ``lmforge launch`` training with ``parallel.ep=2`` end to end.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import ParallelConfig, load_config
from lmforge.errors import ConfigError
from tests.distributed.processes import run_group
from tests.distributed.run_loop import main as run_in_this_process
from tests.distributed.test_train_distributed import HERE, TORCHRUN, assert_same_curve, curve, torchrun

MOE = ("--experts", "4", "--aux", "0.01", "--bias-rate", "0.001", "--accum", "2")
TOLERANCE = 1e-5  # of the loss per step (relative) and of each final weight tensor (relative, in norm)


def relative_difference(weight: torch.Tensor, expected: torch.Tensor) -> float:
    """||weight - expected|| / ||expected||: the experts see their tokens in another order than in one
    process (grouped by source rank), so float sums differ in the last bits, which 20 AdamW steps grow to
    about 5e-6 of a tensor's norm (2.4e-5 at most in any one element of a ~0.2 weight)."""
    return float((weight - expected).norm() / expected.norm().clamp(min=1e-12))


def checkpoint(run, step: int):
    return run / "checkpoints" / f"step_{step:08d}"


def final_weights(run, tmp) -> dict[str, torch.Tensor]:
    """The weights of the step-20 checkpoint (a sharded one consolidated into one file first)."""
    from lmforge.checkpoint.sharded import consolidate, is_sharded

    last = checkpoint(run, 20)
    if is_sharded(last):
        last = consolidate(last, tmp / f"{run.name}-consolidated")
    return load_file(last / "model.safetensors")


def expert_chunks(run, step: int) -> list[tuple[int, int]]:
    """(offset, size) on the expert dimension of each saved piece of layer 0's ``gate_up_proj``."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(checkpoint(run, step) / "dcp").read_metadata().state_dict_metadata
    saved = metadata["model.layers.0.mlp.experts.gate_up_proj"]
    assert tuple(saved.size)[0] == 4  # the global shape: all 4 experts
    return sorted((chunk.offsets[0], chunk.sizes[0]) for chunk in saved.chunks)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The single-process reference: 20 steps, checkpoints every 5 (all kept)."""
    out = tmp_path_factory.mktemp("ep")
    run_in_this_process([*MOE, f"{out}/reference:20:auto"])
    return out


@pytest.fixture(scope="module")
def two_processes(out):
    """On 2 processes: EP 2 with DDP, then with FSDP, for the dense weights; EP 2 continuing the
    single-process checkpoint of step 10; 10 steps without EP (DDP), continued at EP 2 from its sharded
    checkpoint."""
    reference_10, ep1_10 = checkpoint(out / "reference", 10), checkpoint(out / "ep1", 10)
    runs = [f"{out}/ep-ddp:20:ddp", f"{out}/ep-fsdp:20:fsdp", f"{out}/from-1:20:fsdp:{reference_10}"]
    runs += ["--ep", "1", f"{out}/ep1:10:ddp", "--ep", "2", f"{out}/from-ep1:20:fsdp:{ep1_10}"]
    completed = torchrun(*runs, script_options=(*MOE, "--ep", "2"), timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dense", ["ddp", "fsdp"])
def test_ep2_reproduces_the_single_process_run(two_processes, dense, tmp_path):
    out = two_processes
    reference = curve(out / "reference")
    assert reference["20"] < reference["1"] - 1.0  # it learns: a flat curve would prove nothing
    assert_same_curve(curve(out / f"ep-{dense}"), reference, range(1, 21))
    assert expert_chunks(out / f"ep-{dense}", 20) == [(0, 2), (2, 2)]  # each rank held 2 of the 4 experts

    weights, expected = (
        final_weights(out / f"ep-{dense}", tmp_path),
        final_weights(out / "reference", tmp_path),
    )
    assert sorted(weights) == sorted(expected)
    worst = max(relative_difference(weights[name], expected[name]) for name in expected)
    assert worst <= TOLERANCE, f"largest relative weight difference {worst:.2e}"
    bias = expected["layers.1.mlp.expert_bias"]
    assert bias.abs().max() > 0  # the DeepSeek-V3 update moved the biases (alike on every rank)
    assert torch.equal(weights["layers.1.mlp.expert_bias"], bias)


@pytest.mark.slow
def test_a_checkpoint_written_at_ep2_continues_at_ep1(two_processes):
    out = two_processes
    run_in_this_process([*MOE, f"{out}/on-1:20:auto:{checkpoint(out / 'ep-ddp', 10)}"])
    assert_same_curve(curve(out / "on-1"), curve(out / "reference"), range(11, 21))


@pytest.mark.slow
def test_a_single_process_checkpoint_continues_at_ep2(two_processes):
    assert_same_curve(curve(two_processes / "from-1"), curve(two_processes / "reference"), range(11, 21))


@pytest.mark.slow
def test_a_checkpoint_written_without_ep_on_2_processes_continues_at_ep2(two_processes):
    """Without EP the 2 DDP ranks hold every expert; their balancing losses still cover the whole batch,
    so that run follows the single-process curve too, and its sharded checkpoint reshards into EP 2."""
    out = two_processes
    assert expert_chunks(out / "ep1", 10) == [(0, 4)]  # every expert whole on each rank (saved once)
    assert_same_curve(curve(out / "ep1"), curve(out / "reference"), range(1, 11))
    assert_same_curve(curve(out / "from-ep1"), curve(out / "reference"), range(11, 21))


@pytest.mark.slow
def test_ep2_times_2_data_parallel_replicas_on_4_processes(out):
    """World 4 = 2 replicas x EP 2: the experts' gradients are summed over the replicas holding the same
    experts (DDP: by their own hook; FSDP: sharded over the replicas too)."""
    runs = [f"{out}/ep4-ddp:20:ddp", f"{out}/ep4-fsdp:20:fsdp"]
    completed = run_group(
        [*TORCHRUN[:-1], "4", str(HERE / "run_loop.py"), *MOE, "--ep", "2", *runs],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    for run in ("ep4-ddp", "ep4-fsdp"):
        assert_same_curve(curve(out / run), curve(out / "reference"), range(1, 21))


# -- errors at the boundary ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.ep=2"], r"parallel.ep=2 needs a Mixture-of-Experts model"),
        (["parallel.ep=3", "model.moe.n_experts=4"], r"parallel.ep=3 must divide model.moe.n_experts=4"),
        (["parallel.ep=2", "parallel.tp=2", "model.moe.n_experts=4"], r"parallel.ep=2 with parallel.tp=2"),
    ],
)
def test_a_config_expert_parallelism_cannot_split_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_an_ep_that_does_not_divide_the_processes_is_refused_before_any_group_starts():
    from lmforge.distributed.parallelize import init_world

    assert "WORLD_SIZE" not in os.environ  # one process
    with pytest.raises(ConfigError, match=r"parallel.ep=2 must divide the number of processes, WORLD_SIZE=1"):
        init_world(ParallelConfig(ep=2), torch.device("cpu"))


def test_parallelize_refuses_expert_parallelism_for_a_dense_model_naming_every_problem():
    from lmforge.distributed.parallelize import World, parallelize
    from lmforge.model.transformer import build_model

    model = build_model(load_config(None, ["model.preset=tiny"]).model, device="cpu", seed=0)
    world = World(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), ep=2)
    with pytest.raises(ConfigError) as error:
        parallelize(model, ParallelConfig(ep=2), world)
    assert "parallel.ep=2 must divide the number of processes, WORLD_SIZE=3" in str(error.value)
    assert "parallel.ep=2 needs a Mixture-of-Experts model" in str(error.value)


# -- the command line ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lmforge_launch_trains_with_ep2_end_to_end(tmp_path):
    """``lmforge launch --nproc-per-node 2 ... parallel.ep=2`` on real text: the sharded checkpoint holds each
    rank's 2 experts, consolidates with ``lmforge consolidate``, and its logits equal those of the same steps
    in one process (``parallel.ep=1``, the same global batches accumulated)."""
    from lmforge.checkpoint import load_model
    from tests.conftest import require_shared_data
    from tests.distributed.test_launch_cli import RUN

    require_shared_data("tinyshakespeare.txt")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    moe = ["model.moe.n_experts=4", "model.moe.top_k=2", "--no-progress"]
    launched = run_group(
        [sys.executable, "-m", "lmforge.cli", "launch", "--nproc-per-node", "2", *RUN, *moe, "parallel.ep=2",
         f"train.out_dir={tmp_path / 'ep'}"], env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert expert_chunks(tmp_path / "ep", 6) == [(0, 2), (2, 2)]
    consolidated = run_group(
        [sys.executable, "-m", "lmforge.cli", "consolidate", str(tmp_path / "ep"), str(tmp_path / "whole")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert consolidated.returncode == 0, consolidated.stderr
    model, config, _ = load_model(tmp_path / "whole")
    assert config.parallel.ep == 2 and config.model.moe.n_experts == 4

    single = run_group(
        [sys.executable, "-m", "lmforge.cli", "train", *RUN, *moe, f"train.out_dir={tmp_path / 'single'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    reference, _, _ = load_model(tmp_path / "single")
    tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)
