"""Exact resume beyond fp32: an fp16 run (the grad scaler's state) and a run whose newest checkpoint is
damaged. The references are uninterrupted runs and a clean run resumed from the previous checkpoint."""

import json
import os
import shutil
import signal

import torch
from memory_loader import MemoryLoader, loaders, tiny_config
from safetensors.torch import load_file

from lmforge.train.loop import train

# fp16 overflow on chosen batches (by index): their logits are multiplied, so the scaled gradient of the
# output layer overflows fp16 and the scaler skips the step and halves its scale. Steps 3-8 (x256) take the
# scale from 65536 down to 2048; step 22 (x32) overflows at 65536 but not at the scale the run carries.
HOT = {2: 256.0, 3: 256.0, 4: 256.0, 5: 256.0, 6: 256.0, 7: 256.0, 21: 32.0}


class StopAt(MemoryLoader):
    """Sends this process SIGTERM while serving batch ``batch``: the loop checkpoints after that step."""

    def __init__(self, base: MemoryLoader, *, batch: int):
        super().__init__(
            base.tokens, seq_len=base.seq_len, batch_size=base.batch_size, vocab_size=base.vocab_size
        )
        self.at = batch

    def next_batch(self):
        if self.batches == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().next_batch()


def hot_logits(model):
    """Scale the logits of the HOT batches (recognised by their content, so a resumed run sees the same)."""
    base, _ = loaders()
    hot = {base._batch(i).inputs.numpy().tobytes(): factor for i, factor in HOT.items()}

    def hook(module, args, output):
        factor = hot.get(args[0].cpu().numpy().tobytes()) if module.training else None
        return output if factor is None else output * factor

    model.register_forward_hook(hook)
    return model


def records(run_dir, key="loss"):
    return [
        (r["step"], r[key])
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if key in r
    ]


def weights(run_dir, step=30):
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


FP16 = ("train.precision=fp16", "train.eval_every=10", "train.ckpt_every=9")


def fp16_resumed_run(run_dir):
    loader, val = loaders()
    part = train(
        tiny_config(run_dir, *FP16), loader=StopAt(loader, batch=12), val_batches=val, adapt_model=hot_logits,
        progress=False,
    )  # fmt: skip
    assert part.stopped_by == "SIGTERM" and part.step == 13
    loader, val = loaders()
    return train(
        tiny_config(run_dir, *FP16), resume="auto", loader=loader, val_batches=val, adapt_model=hot_logits,
        progress=False,
    )  # fmt: skip


def test_fp16_resume_restores_the_grad_scaler_and_is_bitwise_exact(tmp_path, monkeypatch):
    loader, val = loaders()
    whole = train(
        tiny_config(tmp_path / "whole", *FP16), loader=loader, val_batches=val, adapt_model=hot_logits,
        progress=False,
    )  # fmt: skip
    norms = dict(records(tmp_path / "whole", "grad_norm"))
    # the test has teeth: the scaler skipped overflowing steps at the start, not at step 22 (lower scale)
    assert not all(map(torch.isfinite, torch.tensor([norms[s] for s in (3, 4)])))
    assert torch.isfinite(torch.tensor(norms[22])) and whole.bad_steps == 0

    rest = fp16_resumed_run(tmp_path / "split")
    assert rest.step == whole.step == 30 and rest.final_loss == whole.final_loss  # bitwise
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "split"))

    # and the check would catch a resume that forgets the scaler: it restarts at 65536, step 22 overflows
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: None)
    forgetful = fp16_resumed_run(tmp_path / "forgetful")
    assert forgetful.final_loss != whole.final_loss
    assert not torch.isfinite(torch.tensor(dict(records(tmp_path / "forgetful", "grad_norm"))[22]))


def test_resume_after_a_damaged_newest_checkpoint_equals_a_clean_resume_from_the_previous(tmp_path, capsys):
    extra = ("model.dropout=0.1", "train.ckpt_every=10", "train.eval_every=5")
    damaged, clean = tmp_path / "damaged", tmp_path / "clean"
    loader, val = loaders()
    part = train(
        tiny_config(damaged, *extra), loader=StopAt(loader, batch=22), val_batches=val, progress=False
    )
    assert part.step == 23  # checkpoints at 10, 20 and 23 (the stop)
    shutil.copytree(damaged, clean)
    for step in (20, 23):  # the clean run: as if it had stopped right after the checkpoint at 10
        shutil.rmtree(clean / "checkpoints" / f"step_{step:08d}")
    weights_file = damaged / "checkpoints" / "step_00000023" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])  # a crash mid-copy of the newest
    optimizer_file = next((damaged / "checkpoints" / "step_00000020").glob("train_state*"))
    optimizer_file.write_bytes(optimizer_file.read_bytes()[: optimizer_file.stat().st_size // 2])
    capsys.readouterr()

    loader, val = loaders()
    resumed = train(
        tiny_config(damaged, *extra), resume="auto", loader=loader, val_batches=val, progress=False
    )
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping a damaged checkpoint" in line]
    assert len(skipped) == 2 and "step_00000023" in skipped[0] and "step_00000020" in skipped[1]  # each named
    assert "resumed from" in err and "step_00000010" in err
    loader, val = loaders()
    reference = train(
        tiny_config(clean, *extra), resume="auto", loader=loader, val_batches=val, progress=False
    )
    assert "skipping a damaged checkpoint" not in capsys.readouterr().err
    assert resumed.step == reference.step == 30 and resumed.final_loss == reference.final_loss  # bitwise
    assert records(damaged) == records(clean) and records(damaged, "val_loss") == records(clean, "val_loss")
    assert [s for s, _ in records(damaged)] == list(range(1, 31))  # the replayed steps replaced, not doubled
    assert_same_weights(weights(damaged), weights(clean))
