"""`lmforge scale`: the grid spec (its errors), real tiny grid runs (read back, skipped when finished), and a
fit plus recommendation from run folders written the way `lmforge train` writes them."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmforge.auto.scale import load_grid, read_run, read_runs, run_grid, scale
from lmforge.auto.scale_report import Budget
from lmforge.cli import main
from lmforge.config import load_config, save_config
from lmforge.errors import ConfigError
from lmforge.plan.scaling import Law, non_embedding_params

TEXT = str(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py")  # ~20 KB of characters
TINY = [
    f"data.sources=[{TEXT}]",
    "data.tokenizer=char",
    "data.val_fraction=0.1",
    "model.preset=tiny",
    "model.max_seq_len=16",
    "train.seq_len=16",
    "train.micro_batch=4",
    "train.eval_batches=2",
    "train.device=cpu",
]


def write_grid(path: Path, **fields) -> Path:
    spec = {"overrides": TINY, "models": [{"d_model": 16, "n_layers": 1, "n_heads": 2}], "tokens": ["2K"]}
    path.write_text(yaml.safe_dump({**spec, **fields}))
    return path


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"tokenz": ["1M"]}, "unknown key 'tokenz' (did you mean 'tokens'?)"),
        ({"models": []}, "models: must be a non-empty list"),
        ({"tokens": ["lots"]}, "tokens[0]='lots' is not a positive token count"),
        ({"tokens": [-5]}, "tokens[0]=-5 is not a positive token count"),
        ({"warmup_fraction": 2}, "warmup_fraction=2 must be a number in [0, 1)"),
        ({"config": "missing.yaml"}, "missing.yaml not found"),
        (
            {"models": [{"d_modl": 16}]},
            "models[0]: unknown config key 'model.d_modl' (did you mean 'd_model'?)",
        ),
        (
            {"models": [{"d_model": 30, "n_heads": 4}]},
            "models[0]: invalid config: model.d_model=30 is not divisible",
        ),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "run name 'a-2K' twice"),
    ],
)
def test_a_bad_grid_spec_is_one_clear_error_naming_the_file_and_entry(tmp_path, fields, message):
    grid = write_grid(tmp_path / "grid.yaml", **fields)
    with pytest.raises(ConfigError) as err:
        load_grid(grid)
    assert str(grid) in str(err.value) and message in str(err.value)


def test_the_cli_turns_a_bad_grid_into_one_line_and_exit_code_2(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", tokens="1M")
    assert main(["scale", str(grid), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "tokens: must be a non-empty list" in err and "Traceback" not in err


def test_real_grid_runs_are_read_back_and_skipped_when_finished(tmp_path):
    grid = load_grid(write_grid(tmp_path / "grid.yaml", tokens=["1K", "2K"], warmup_fraction=0.1))
    assert [p.name for p in grid.points] == ["d16-l1-1K", "d16-l1-2K"]
    said = []
    runs = run_grid(grid, tmp_path / "s", log=said.append)
    assert [r.run_dir.name for r in runs] == ["d16-l1-1K", "d16-l1-2K"]
    for run, steps in zip(runs, (16, 32)):  # ceil(1000 / 64) and ceil(2000 / 64) steps of 4 x 16 tokens
        cfg = load_config(run.run_dir / "config.yaml")
        assert cfg.train.steps == steps and cfg.train.warmup_steps == int(0.1 * steps)
        records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if "val_loss" in r][-1]
        assert run.tokens == steps * 64 == final["tokens"]
        assert run.loss == final["val_loss"]
        assert run.params == non_embedding_params(cfg.model) == 1 * (4 * 16 * 16 + 3 * 16 * 384 + 2 * 16) + 16
    assert runs[1].loss < runs[0].loss  # more tokens, lower loss
    stamps = [(r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in runs]
    said.clear()
    again = run_grid(grid, tmp_path / "s", log=said.append)
    assert [r.loss for r in again] == [r.loss for r in runs]
    assert all("finished" in line for line in said), said
    assert [(r.run_dir / "metrics.jsonl").stat().st_mtime_ns for r in again] == stamps


LAW = Law(E=1.2, A=30.0, B=200.0, alpha=0.3, beta=0.35)


def write_run_folders(root: Path) -> Path:
    """Run folders as `lmforge train` leaves them (config.yaml, metrics.jsonl), losses from LAW."""
    rng = np.random.default_rng(0)
    for d_model, n_layers in ((32, 2), (64, 2), (64, 4), (128, 4)):
        for steps in (100, 200, 400):
            cfg = load_config(
                None,
                [
                    "model.preset=tiny",
                    f"model.d_model={d_model}",
                    f"model.n_layers={n_layers}",
                    f"model.n_heads={d_model // 16}",
                    f"train.steps={steps}",
                    "train.seq_len=64",
                    "train.micro_batch=32",
                ],
            )
            run = root / "runs" / f"d{d_model}-l{n_layers}-{steps}"
            save_config(cfg, run / "config.yaml")
            tokens = steps * 64 * 32
            loss = float(LAW.loss(non_embedding_params(cfg.model), tokens)) * np.exp(rng.normal(0, 0.001))
            lines = [
                {"step": steps, "loss": loss + 0.05, "tokens": tokens},
                {"step": steps, "val_loss": loss, "val_ppl": float(np.exp(loss)), "tokens": tokens},
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    unfinished = root / "runs" / "zz-unfinished"  # no final validation loss yet: not read
    save_config(load_config(None, ["train.steps=50"]), unfinished / "config.yaml")
    (unfinished / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0, "tokens": 100}) + "\n")
    return root


def test_fit_and_recommendation_from_run_folders(tmp_path):
    folders = write_run_folders(tmp_path / "grid")
    assert read_run(folders / "runs" / "zz-unfinished") is None
    assert len(read_runs([folders])) == 12
    budget = Budget(compute=1e15, gpu="h100", gpus=1)
    result = scale(None, tmp_path / "out", run_folders=[folders], bootstrap=20, budget=budget)
    assert result.fit.law.alpha == pytest.approx(LAW.alpha, abs=0.03)
    assert result.fit.law.beta == pytest.approx(LAW.beta, abs=0.03)
    saved = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert saved["params"]["beta"]["value"] == pytest.approx(result.fit.law.beta)
    lo, hi = saved["params"]["E"]["interval"]
    assert lo <= LAW.E <= hi
    rec = saved["recommendation"]
    n_opt = rec["frontier"]["params"]
    assert n_opt == pytest.approx(float(result.fit.law.optimal_params(1e15)))
    assert rec["shape"]["non_embedding_params"] == pytest.approx(n_opt, rel=0.1)
    assert 6 * rec["shape"]["non_embedding_params"] * rec["tokens"] == pytest.approx(1e15, rel=1e-6)
    assert rec["plan"]["total_tokens"] == rec["tokens"] and rec["plan"]["fits"]
    assert (tmp_path / "out" / "scaling.png").stat().st_size < 200_000
    assert "predicted validation loss" in (tmp_path / "out" / "fit.md").read_text()


def test_the_cli_recommends_for_gpu_hours_at_the_planners_peak_and_efficiency(tmp_path, capsys):
    folders = write_run_folders(tmp_path / "grid")
    out = tmp_path / "out"
    argv = ["scale", "--runs", str(folders), "--out", str(out), "--gpu-hours", "0.001", "--gpu", "h100"]
    assert main([*argv, "--bootstrap", "5", "--gpus", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    assert rec["compute"] == pytest.approx(0.001 * 3600 * 989e12 * 0.6)  # H100-80GB: 989 TFLOP/s bf16, 60%
    assert "H100-80GB GPU-hours" in rec["budget"]


def test_a_bad_budget_fails_before_any_run_trains(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml")
    assert main(["scale", str(grid), "--out", str(tmp_path / "s"), "--compute", "1e15", "--gpu", "h10"]) == 2
    assert "unknown GPU 'h10'" in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()
