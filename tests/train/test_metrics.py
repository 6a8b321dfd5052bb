"""The run logger: metrics.jsonl, TensorBoard scalars and the progress bar, and their truncation."""

import json


def test_run_logger_writes_metrics_tensorboard_scalars_and_a_progress_bar(tmp_path):
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lmforge.train.metrics import RunLogger

    stream = io.StringIO()
    logger = RunLogger(tmp_path, is_main=True, total_steps=4, progress=True, tensorboard=True, stream=stream)
    losses = [3.5, 3.25, 3.0, 2.75]
    for step, loss in enumerate(losses, 1):
        logger.log(step, {"loss": loss, "lr": 1e-3 * step, "tokens_per_s": 1500.0, "mfu": 0.25})
        logger.advance(step)
    logger.log(4, {"val_loss": 3.125})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records if "loss" in r] == losses and records[-1] == {
        "step": 4,
        "val_loss": 3.125,
    }
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == list(enumerate(losses, 1))
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(4, 3.125)]
    shown = stream.getvalue()
    assert "4/4" in shown and "loss 2.7500" in shown and "1.5k tok/s" in shown and "MFU 25.0%" in shown
    assert "val loss 3.1250" in shown  # evaluation lines print above the bar
