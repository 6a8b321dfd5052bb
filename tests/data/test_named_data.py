"""Where a run's data is named: a run that names its own data is not the demo, and a prepared folder is used as
prepared data wherever it is named (data.sources, data.prepared, data.mixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.cli import main
from lmforge.config import DataConfig, TrainConfig, config_from_dict
from lmforge.data.prepare import prepare_data
from lmforge.data.sources import expand_sources
from lmforge.distributed.parallelize import World
from lmforge.errors import DataError
from lmforge.train.data import prepared_datasets
from lmforge.train.demo import DEMO, demo_config

ONE_PROCESS = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=64",
        "train.seq_len=16", "train.micro_batch=2", "train.warmup_steps=1", "train.eval_every=3",
        "train.eval_batches=1", "train.ckpt_every=3", "train.sample_tokens=4"]  # fmt: skip


def _prepare(root: Path, name: str, words: list[str], tokenizer: str = "char") -> Path:
    src = root / f"{name}-src"
    src.mkdir()
    for i in range(6):
        (src / f"d{i}.txt").write_text(
            " ".join(words[(i + j) % len(words)] for j in range(300)), encoding="utf-8"
        )
    out = root / name
    prepare_data(DataConfig(tokenizer=tokenizer, val_fraction=0.2, seed=1), [str(src)], out, progress=False)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("named"), "prepared", ["alpha", "beta", "gamma", "delta"])


@pytest.mark.parametrize(
    "own_data", ["data.prepared=/d/p", "data.sources=[/d/raw]", "data.mixture={/d/a: 0.5, /d/b: 0.5}"]
)
def test_a_run_that_names_its_data_keeps_no_demo_data_limit_prompts_or_folder(own_data):
    demo = demo_config(["train.steps=600"])
    assert demo.train.time_limit_minutes == 3.5 and demo.data.sources == ["{stdlib}/*.py"]  # the demo itself
    cfg = demo_config([own_data, "train.steps=600"])
    assert cfg.train.time_limit_minutes == 0.0  # the report: stopped at step 433 "by time limit"
    assert cfg.train.steps == 600
    defaults = DataConfig()
    named = {k: v for k, v in cfg.data.__dict__.items() if k not in ("sources", "prepared", "mixture")}
    assert named == {
        k: v for k, v in defaults.__dict__.items() if k not in ("sources", "prepared", "mixture")
    }
    assert "{stdlib}/*.py" not in cfg.data.sources
    assert cfg.train.sample_prompts == TrainConfig().sample_prompts  # not the demo's Python prompts
    assert cfg.train.out_dir != DEMO["train"]["out_dir"]  # never into (or resuming from) the demo's run
    # The tiny model and the loop settings made for it stay.
    assert cfg.model == demo.model
    for key in ("seq_len", "micro_batch", "lr", "min_lr", "warmup_steps", "eval_every", "ckpt_every"):
        assert getattr(cfg.train, key) == DEMO["train"][key], key
    # Explicit overrides of what the demo would have set still apply.
    assert demo_config([own_data, "train.time_limit_minutes=2"]).train.time_limit_minutes == 2.0


def _resolved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))


def _steps(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_cli_train_on_named_data_without_a_config_is_not_the_demo(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = [
        "train",
        f"data.prepared={prepared}",
        f"train.out_dir={run}",
        "train.steps=3",
        "train.log_every=1",
    ]
    assert main([*argv, *TINY, "--no-progress"]) == 0
    resolved = _resolved(run)
    assert resolved["train"]["time_limit_minutes"] == 0.0
    assert resolved["data"] == {**DataConfig().__dict__, "prepared": str(prepared)}
    assert _steps(run) == [1, 2, 3]


def test_a_prepared_folder_among_data_sources_is_used_as_prepared_data(prepared, tmp_path, monkeypatch):
    """`lmforge train data.sources=[DIR]` on a prepared DIR read its meta.json as raw JSON ("no field 'text'")."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = [
        "train",
        f"data.sources=[{prepared}]",
        f"train.out_dir={run}",
        "train.steps=3",
        "train.log_every=1",
    ]
    assert main([*argv, *TINY, "--no-progress"]) == 0
    assert _steps(run) == [1, 2, 3]
    assert (
        not (tmp_path / "cache" / "prepared").exists() and not (run / "data").exists()
    )  # nothing re-prepared


def test_prepared_folders_named_anywhere(prepared, tmp_path):
    second = _prepare(tmp_path, "second", ["one", "two", "three"], tokenizer=str(prepared / "tokenizer.json"))

    def datasets(data: dict) -> dict:
        cfg = config_from_dict({"data": data, "train": {"out_dir": str(tmp_path / "run")}})
        found, raw = prepared_datasets(cfg, world=ONE_PROCESS, cache_dir=tmp_path / "cache", progress=False)
        assert raw == []
        return found

    assert datasets({"sources": [str(prepared)]}) == {str(prepared): 1.0}
    assert datasets({"sources": [str(prepared / "meta.json")]}) == {str(prepared): 1.0}
    assert datasets({"prepared": str(prepared / "meta.json")}) == {str(prepared): 1.0}
    assert datasets({"mixture": {str(second / "meta.json"): 0.3}}) == {str(second): 0.3}
    tokens = {
        d: json.loads((d / "meta.json").read_text())["splits"]["train"]["tokens"] for d in (prepared, second)
    }
    assert datasets({"sources": [str(prepared), str(second)]}) == {
        str(d): float(n) for d, n in tokens.items()
    }
    assert not (tmp_path / "cache").exists()
    raw = tmp_path / "raw.txt"
    raw.write_text("some raw text", encoding="utf-8")
    with pytest.raises(
        DataError, match=f"mixes a prepared folder .*{prepared}.* with raw data .*raw.txt.*mixture"
    ):
        datasets({"sources": [str(prepared), str(raw)]})


def test_data_prepare_refuses_a_prepared_folder_and_skips_one_nested_in_a_source(prepared, tmp_path):
    with pytest.raises(DataError, match=f"{prepared}' is a prepared folder .*data.prepared={prepared}"):
        expand_sources([str(prepared)])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a", encoding="utf-8")
    prepare_data(
        DataConfig(tokenizer="char", val_fraction=0.0), [str(corpus)], corpus / "out", progress=False
    )
    assert expand_sources([str(corpus)]) == [corpus / "a.txt"]  # an earlier output is not an input
