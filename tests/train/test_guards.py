"""Guards: non-finite steps are skipped and counted, K in a row roll back past the bad window, damaged
checkpoints are skipped on resume, spikes are flagged."""

import json

import pytest
import torch
from memory_loader import Batch, MemoryLoader, loaders, tiny_config

from lmforge.errors import CheckpointError
from lmforge.train.guards import BadStepGuard, SpikeDetector
from lmforge.train.loop import train

POISON = 63  # a batch made only of this token makes the (test's) model produce NaN logits


class PoisonedLoader(MemoryLoader):
    """Serves a poisoned batch at the given batch indices."""

    def __init__(self, base: MemoryLoader, bad: set[int]):
        super().__init__(
            base.tokens, seq_len=base.seq_len, batch_size=base.batch_size, vocab_size=base.vocab_size
        )
        self.bad = bad

    def _batch(self, index: int) -> Batch:
        batch = super()._batch(index)
        if index in self.bad:
            batch.inputs.fill_(POISON)
        return batch


def nan_on_poison(model):
    def hook(module, args, output):
        if bool((args[0] == POISON).all()):
            return output * float("nan")
        return output

    model.register_forward_hook(hook)
    return model


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_batch_is_skipped_and_counted(tmp_path):
    base, val = loaders()
    loader = PoisonedLoader(base, bad={7})
    result = train(
        tiny_config(tmp_path / "run"),
        loader=loader,
        val_batches=val,
        adapt_model=nan_on_poison,
        progress=False,
    )
    assert result.step == 30 and result.bad_steps == 1
    records = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert records[-1]["skipped_steps"] == 1
    assert all(
        torch.isfinite(p).all()
        for p in torch.load(result.checkpoint / "train_state.pt", weights_only=True)["optimizer"]["state"][
            0
        ].values()
        if isinstance(p, torch.Tensor)
    )
    assert records[-1]["loss"] < records[0]["loss"]


def test_consecutive_bad_steps_roll_back_past_the_bad_window(tmp_path, capsys):
    base, val = loaders()
    loader = PoisonedLoader(base, bad={13, 14, 15})
    cfg = tiny_config(tmp_path / "run", "train.max_bad_steps=3")
    result = train(cfg, loader=loader, val_batches=val, adapt_model=nan_on_poison, progress=False)
    err = capsys.readouterr().err
    assert "rolled back to" in err and "step_00000010" in err
    assert result.step == 30 and result.bad_steps == 3
    # steps 14-16 were bad, so steps 11-16 were undone, but the stream did not rewind: 30 + 6 batches drawn,
    # and the bad batches were not served again (3 bad steps in all)
    assert loader.batches == 36
    steps = [r["step"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 31))  # the rolled-back records were replaced


def test_truncated_checkpoint_is_skipped_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    loader, val = loaders()
    train(tiny_config(run, "train.steps=20"), loader=loader, val_batches=val, progress=False)
    weights = run / "checkpoints" / "step_00000020" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a crash mid-copy
    loader, val = loaders()
    result = train(
        tiny_config(run, "train.steps=25"), resume="auto", loader=loader, val_batches=val, progress=False
    )
    err = capsys.readouterr().err
    assert "skipping a damaged checkpoint" in err and "truncated" in err and "step_00000020" in err
    assert "resumed from" in err and "step_00000010" in err
    assert result.step == 25


def test_resume_auto_with_only_damaged_checkpoints_says_so(tmp_path):
    run = tmp_path / "run"
    loader, val = loaders()
    train(
        tiny_config(run, "train.steps=10", "train.keep_last=1"),
        loader=loader,
        val_batches=val,
        progress=False,
    )
    (run / "checkpoints" / "step_00000010" / "manifest.json").unlink()
    loader, val = loaders()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        train(
            tiny_config(run, "train.steps=20"), resume="auto", loader=loader, val_batches=val, progress=False
        )


def test_bad_step_guard_counts_consecutive():
    guard = BadStepGuard(max_consecutive=3)
    assert [guard.record(f) for f in (False, False, True, False, False, False)] == [False] * 5 + [True]
    assert guard.total == 5


def test_spike_detector_flags_a_jump_with_its_z_score():
    detector = SpikeDetector(zscore=6.0, decay=0.9, warmup=5)
    losses = [3.0 + 0.01 * ((-1) ** i) for i in range(50)]
    assert all(detector.check(x) is None for x in losses)
    z = detector.check(5.0)
    assert z is not None and z == pytest.approx((5.0 - detector.mean) / detector.var**0.5)
    assert detector.spikes == 1 and detector.check(3.0) is None


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    from lmforge.checkpoint import latest_valid_checkpoint, verify_checkpoint
    from lmforge.checkpoint.manager import CheckpointManager
    from lmforge.distributed.parallelize import World

    run = tmp_path / "run"
    loader, val = loaders()
    result = train(tiny_config(run, "train.steps=10"), loader=loader, val_batches=val, progress=False)
    model = torch.nn.Linear(2, 2)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(
        run, config=tiny_config(run), world=world, tokenizer_file=tmp_path / "gone.json"
    )
    with pytest.raises(CheckpointError, match="is intact"):
        manager.save(  # the copy of a vanished tokenizer fails half-way through the write
            20,
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            scaler=None,
            loop_state={},
            loader_state={},
        )
    assert latest_valid_checkpoint(run).path == result.checkpoint
    assert verify_checkpoint(result.checkpoint) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010"]
