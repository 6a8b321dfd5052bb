"""``lmforge launch`` end to end on real text: two "nodes" on this machine meet at a c10d rendezvous
endpoint and train with FSDP through the real ``lmforge train``; the sharded checkpoint is consolidated
into one safetensors file that the single-process tools read, and whose logits equal those of the same
steps trained in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model, verify_checkpoint
from lmforge.errors import CheckpointError
from tests.conftest import SHARED_DATA, require_shared_data
from tests.distributed.processes import run_group

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
RUN = [
    f"data.sources=[{SHAKESPEARE}]", "data.tokenizer=char", "model.preset=tiny", "model.n_layers=2",
    "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128", "train.steps=6", "train.seq_len=32",
    "train.micro_batch=4", "train.global_batch_tokens=256", "train.eval_every=3", "train.eval_batches=2",
    "train.ckpt_every=3", "train.device=cpu", "train.sample_tokens=8", "parallel.timeout_s=60",
]  # fmt: skip
# 2 processes x 1 micro-batch of 4 x 32 tokens = 256 tokens a step; one process accumulates the same batch.


def rendezvous_store():
    """A TCP store that binds port 0 itself and reports the port it got: no other program can take the port
    between choosing and binding it. torchrun's c10d rendezvous finds the port in use and joins as a client."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=120))


@pytest.mark.slow
def test_two_nodes_train_with_fsdp_and_the_checkpoint_consolidates(tmp_path):
    require_shared_data("tinyshakespeare.txt")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    store = rendezvous_store()  # held until both nodes have finished
    endpoint = f"127.0.0.1:{store.port}"
    command = [sys.executable, "-m", "lmforge.cli", "launch", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", endpoint, "--rdzv-timeout", "60", "--no-progress",
               *RUN, "parallel.strategy=fsdp", f"train.out_dir={tmp_path / 'run'}"]  # fmt: skip
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=150)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    last = tmp_path / "run" / "checkpoints" / "step_00000006"
    assert verify_checkpoint(last) == [] and (last / "dcp" / ".metadata").is_file()

    with pytest.raises(CheckpointError, match="it is sharded: lmforge consolidate"):
        load_model(last)  # the single-process tools say how to read it

    consolidated = tmp_path / "consolidated"
    done = run_group([sys.executable, "-m", "lmforge.cli", "consolidate", str(tmp_path / "run"),
                           str(consolidated)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    model, config, _ = load_model(consolidated)
    assert config.model.d_model == 64 and config.parallel.strategy == "fsdp"
    assert (consolidated / "tokenizer.json").is_file()

    # The same six steps in one process (the same global batches, accumulated): the same model.
    single = run_group([sys.executable, "-m", "lmforge.cli", "train", *RUN, "--no-progress",
                             f"train.out_dir={tmp_path / 'single'}"], env=env, capture_output=True, text=True,
                            timeout=150)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    reference, _, _ = load_model(tmp_path / "single")
    tokens = torch.randint(0, config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(tokens), reference(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    start = load_model(tmp_path / "single" / "checkpoints" / "step_00000003")[0](tokens).detach()
    assert (start - expected).abs().max() > 100 * 1e-4  # the last steps moved it: the comparison can fail


RESHARD = [
    f"data.sources=[{SHAKESPEARE}]", "data.tokenizer=char", "model.preset=tiny", "model.n_layers=2",
    "model.d_model=64", "model.n_heads=2", "model.ffn_hidden=128", "train.seq_len=32", "train.micro_batch=4",
    "train.global_batch_tokens=256", "train.eval_every=100", "train.ckpt_every=3", "train.device=cpu",
    "train.schedule=constant", "train.warmup_steps=0",
]  # fmt: skip


def final_loss(run_dir: Path) -> float:
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r][-1]


@pytest.mark.slow
def test_lmforge_train_on_2_processes_resumes_on_1_with_the_same_final_loss(tmp_path):
    """Real data through TokenLoader: the global batch stays 256 tokens, gradient accumulation absorbs the
    change of process count, and the loader's state (global batches) carries over unchanged."""
    require_shared_data("tinyshakespeare.txt")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    cli = [sys.executable, "-m", "lmforge.cli"]

    def run(*args: str) -> None:
        done = run_group([*cli, *args, "--no-progress"], env=env, capture_output=True, text=True, timeout=150)
        assert done.returncode == 0, done.stderr[-3000:]

    run("train", *RESHARD, "train.steps=6", f"train.out_dir={tmp_path / 'one'}")
    run("launch", "--nproc-per-node", "2", *RESHARD, "train.steps=3", "parallel.strategy=fsdp",
        f"train.out_dir={tmp_path / 'two'}")  # fmt: skip
    run("train", *RESHARD, "train.steps=6", f"train.out_dir={tmp_path / 'two'}", "--resume", "auto")
    assert final_loss(tmp_path / "two") == pytest.approx(final_loss(tmp_path / "one"), rel=1e-5)
