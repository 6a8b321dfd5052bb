import json

import torch

from lmforge.train.metrics import cpu_name, cpu_peak_flops, measure_matmul_flops


def _key(precision: str) -> str:
    return f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{precision}"


def test_cpu_peak_keeps_the_best_measurement(tmp_path):
    # A peak cached while other jobs shared the cores is too low: the next measurement replaces it.
    cache = tmp_path / "cpu_peak.json"
    cache.write_text(json.dumps({_key("fp32"): 1.0, "other|key": 5.0}))
    peak = cpu_peak_flops("fp32", tmp_path)
    assert peak > 1e9  # any CPU of the last decade does a 1024-square fp32 matmul at over 1 GFLOP/s
    table = json.loads(cache.read_text())
    assert table[_key("fp32")] == peak and table["other|key"] == 5.0
    # A higher cached peak stands (a measurement can only be lowered by load) and the file is left alone.
    cache.write_text(json.dumps({_key("fp32"): 1e18}))
    before = cache.stat().st_mtime_ns
    assert cpu_peak_flops("fp32", tmp_path) == 1e18
    assert cache.stat().st_mtime_ns == before
    # An unreadable cache is measured over, not an error.
    cache.write_text("{not json")
    assert cpu_peak_flops("fp32", tmp_path) > 1e9


def test_matmul_measurement_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_matmul_flops("fp32", size=64, repeats=2)
    assert torch.equal(torch.rand(4), expected)


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
