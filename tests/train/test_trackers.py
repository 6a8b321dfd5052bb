"""Experiment trackers (train/trackers.py): what MLflow and W&B received equals metrics.jsonl, a resumed run
continues the same tracker runs, and a failing tracker warns once without stopping training."""

from __future__ import annotations

import json
import math
import struct

import pytest
from memory_loader import loaders, tiny_config

from lmforge.errors import ConfigError
from lmforge.train import trackers
from lmforge.train.loop import train
from lmforge.train.metrics import read_metrics
from tests.conftest import require_module

QUIET = ("train.sample_prompts=[]",)


def jsonl_values(run_dir) -> dict[str, set[tuple[int, float]]]:
    """Every (step, value) metrics.jsonl holds, per numeric key."""
    out: dict[str, set[tuple[int, float]]] = {}
    for record in read_metrics(run_dir):
        for key, value in trackers.scalars({k: v for k, v in record.items() if k != "step"}).items():
            out.setdefault(key, set()).add((record["step"], value))
    return out


def close(a: set[tuple[int, float]], b: set[tuple[int, float]]) -> bool:
    """Same steps, values equal within float32 rounding."""
    a, b = sorted(a), sorted(b)
    return len(a) == len(b) and all(
        sa == sb and math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-12) for (sa, va), (sb, vb) in zip(a, b)
    )


def wandb_history(run_folder) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of protobuf
    records: 32 KiB blocks, 7-byte headers crc/length/type, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, block, buf = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.HasField("history"):
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_mlflow_and_wandb_receive_what_metrics_jsonl_holds_and_resume_continues(tmp_path, monkeypatch):
    require_module("mlflow", "trackers")
    require_module("wandb", "trackers")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, even where the user has logged in
    run = tmp_path / "run"
    extra = ("train.trackers=[mlflow,wandb]", *QUIET)
    loader, val = loaders()
    train(tiny_config(run, "train.steps=20", *extra), loader=loader, val_batches=val, progress=False)
    ids = json.loads((run / "trackers.json").read_text())
    assert not (run / "tensorboard").exists()  # only the trackers named

    # W&B, first run: every scalar at its step (W&B keeps one row per step: the last value of each key)
    (first,) = (run / "wandb").glob("offline-run-*")
    expected = {}
    for record in read_metrics(run):
        for key, value in trackers.scalars(record).items():
            if key != "step":
                expected[(record["step"], key)] = value
    got = {
        (row["_step"], k): v for row in wandb_history(first) for k, v in row.items() if not k.startswith("_")
    }
    assert got.keys() == expected.keys()
    assert all(math.isclose(got[k], expected[k], rel_tol=1e-6, abs_tol=1e-12) for k in expected)
    assert {p.name for p in (first / "files").iterdir()} >= {"loss.png", "MODEL_CARD.md"}

    # resume to step 30: the same MLflow run and W&B run id continue
    loader, val = loaders()
    train(
        tiny_config(run, "train.steps=30", *extra),
        resume="auto",
        loader=loader,
        val_batches=val,
        progress=False,
    )
    assert json.loads((run / "trackers.json").read_text()) == ids
    client = MlflowClient(trackers.local_store(run)[0])
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["train.lr"] == "0.01" and mlrun.data.params["model.n_layers"] == "2"
    wanted = jsonl_values(run)
    assert [s for s, _ in sorted(wanted["loss"])] == list(range(1, 31))
    for key, values in wanted.items():
        history = {(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key)}
        assert close(history, values), key
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert artifacts == {"loss.png", "MODEL_CARD.md"}
    (second,) = set((run / "wandb").glob("offline-run-*")) - {first}
    assert second.name.endswith(ids["wandb"])
    assert sorted({row["_step"] for row in wandb_history(second)}) == list(range(21, 31))


class Broken:
    name = "broken"

    def __init__(self, *args, **kwargs):
        self.calls = 0

    def log(self, step, values):
        raise ConnectionError("tracking server gone")

    def finish(self, artifacts):
        raise AssertionError("a failed tracker is not called again")


def test_a_failing_tracker_warns_once_and_training_finishes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.FACTORIES, "tensorboard", Broken)
    loader, val = loaders()
    result = train(
        tiny_config(tmp_path / "run", "train.steps=10", *QUIET),
        loader=loader,
        val_batches=val,
        progress=False,
    )
    err = capsys.readouterr().err
    assert result.step == 10
    assert err.count("tracker broken failed") == 1
    assert "ConnectionError: tracking server gone" in err and "training goes on without it" in err
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 11))


def test_a_tracker_that_cannot_start_warns_and_is_skipped(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'mlflow'")

    monkeypatch.setitem(trackers.FACTORIES, "mlflow", missing)
    warnings = []
    opened = trackers.Trackers.open(["mlflow"], tmp_path, warn=warnings.append)
    opened.log(1, {"loss": 1.0, "note": "text", "nan": float("nan")})
    opened.finish(tmp_path)
    assert len(warnings) == 1 and "lmforge[trackers]" in warnings[0]


def test_unknown_tracker_names_the_key_and_the_close_one(tmp_path):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "train.trackers=[tensorboard,mlfow]")
    assert "train.trackers" in str(err.value) and "did you mean 'mlflow'" in str(err.value)
