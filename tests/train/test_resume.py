"""Exact resume: a run stopped and resumed ends bit for bit where an uninterrupted run ends (CPU, fp32)."""

import os
import signal

import torch
from memory_loader import MemoryLoader, loaders, tiny_config
from safetensors.torch import load_file

from lmforge.train.loop import train


class SignalAt(MemoryLoader):
    """Sends this process ``signum`` while serving batch ``batch`` (the loop stops after that step)."""

    def __init__(self, base: MemoryLoader, *, batch: int, signum: int):
        super().__init__(
            base.tokens, seq_len=base.seq_len, batch_size=base.batch_size, vocab_size=base.vocab_size
        )
        self.at, self.signum = batch, signum

    def next_batch(self):
        if self.batches == self.at:
            os.kill(os.getpid(), self.signum)
        return super().next_batch()


def final_weights(result):
    return load_file(result.checkpoint / "model.safetensors")


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    # dropout on: the resumed run must also restore the RNG stream
    extra = ("model.dropout=0.1", "train.eval_every=7", "train.ckpt_every=9")
    loader, val = loaders()
    whole = train(tiny_config(tmp_path / "whole", *extra), loader=loader, val_batches=val, progress=False)

    loader, val = loaders()
    first = train(
        tiny_config(tmp_path / "split", *extra, "train.time_limit_minutes=1e-9"),
        loader=loader,
        val_batches=val,
        progress=False,
    )
    assert first.stopped_by == "time limit" and first.step == 1
    loader, val = loaders()
    loader = SignalAt(loader, batch=12, signum=signal.SIGTERM)  # a preemption during step 13
    part = train(
        tiny_config(tmp_path / "split", *extra), resume="auto", loader=loader, val_batches=val, progress=False
    )
    assert part.stopped_by == "SIGTERM" and part.step == 13
    assert (tmp_path / "split" / "checkpoints" / "step_00000013").is_dir()
    loader, val = loaders()
    rest = train(
        tiny_config(tmp_path / "split", *extra), resume="auto", loader=loader, val_batches=val, progress=False
    )
    assert rest.step == whole.step == 30
    assert rest.final_loss == whole.final_loss  # bitwise
    a, b = final_weights(whole), final_weights(rest)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bf16_and_fp16_runs_learn(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        loader, val = loaders()
        cfg = tiny_config(tmp_path / precision, f"train.precision={precision}", "train.steps=20")
        result = train(cfg, loader=loader, val_batches=val, progress=False)
        assert result.bad_steps == 0 and result.step == 20
        losses[precision] = result.val_loss
    # mixed precision follows fp32 closely on the same batches
    assert abs(losses["bf16"] - losses["fp32"]) < 0.15 and abs(losses["fp16"] - losses["fp32"]) < 0.15
    assert losses["fp32"] < 3.5  # from ln(64) = 4.16 at the start


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import pytest

    from lmforge import checkpoint as ckpt
    from lmforge.errors import CheckpointError

    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step-10 checkpoint: the optimizer state does not fit any more
            real_save(obj, path, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    loader, val = loaders()
    cfg = tiny_config(tmp_path / "run", "train.steps=10", "train.ckpt_every=5", "train.eval_every=10")
    with pytest.raises(
        CheckpointError,
        match=r"step_00000010: .*No space left.*previous checkpoint .*step_00000005 is intact",
    ):
        train(cfg, loader=loader, val_batches=val, progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000005"]  # nothing half-written beside it
    assert ckpt.verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005") == []
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from step 5
    loader, val = loaders()
    resumed = train(cfg, resume="auto", loader=loader, val_batches=val, progress=False)
    assert resumed.step == 10 and (tmp_path / "run" / "checkpoints" / "step_00000010").is_dir()
