"""Search-space entries: parsed into the right distributions, and every mistake named with its entry."""

from __future__ import annotations

import math

import optuna
import pytest

from lmforge.auto.space import parse_entry, parse_space, with_values
from lmforge.cli import main
from lmforge.config import config_from_dict
from lmforge.errors import ConfigError


def test_entries_parse_to_their_distributions():
    lr, warmup, layers, norm, top_k, batch = parse_space(
        [
            "train.lr=loguniform(1e-4,3e-2)",
            "train.warmup_steps=int(0, 500, 50); model.n_layers=choice(2,4,8)",
            "model.norm=choice(rmsnorm, layernorm)",
            "model.moe.top_k=int(1,4)",
            "train.micro_batch=logint(4,64)",
        ]
    )
    assert (lr.kind, lr.low, lr.high, lr.log) == ("loguniform", 1e-4, 3e-2, True)
    assert (warmup.kind, warmup.low, warmup.high, warmup.step) == ("int", 0, 500, 50)
    assert layers.choices == (2, 4, 8) and all(type(c) is int for c in layers.choices)
    assert norm.choices == ("rmsnorm", "layernorm")
    assert top_k.key == "model.moe.top_k"
    assert batch.log and batch.kind == "logint"


def test_float_fields_take_choice_values_written_like_yaml_strings():
    # PyYAML reads "1e3" as a string: it must still become the number 1000.0 for a float field.
    assert parse_entry("train.lr=choice(1e-3, 1e3)").choices == (1e-3, 1000.0)


def test_drawn_values_stay_in_bounds_and_apply_to_the_config():
    space = parse_space(
        ["train.lr=loguniform(1e-4,3e-2)", "train.warmup_steps=int(0,500,50)", "model.n_layers=choice(2,4,8)"]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    base = {"model": {"preset": "tiny"}, "train": {"steps": 10}}
    for _ in range(20):
        trial = study.ask()
        values = {p.key: p.suggest(trial) for p in space}
        assert 1e-4 <= values["train.lr"] <= 3e-2
        assert values["train.warmup_steps"] in range(0, 501, 50)
        assert values["model.n_layers"] in (2, 4, 8)
        cfg = config_from_dict(with_values(base, values))
        assert (cfg.train.lr, cfg.train.warmup_steps, cfg.model.n_layers) == (
            values["train.lr"], values["train.warmup_steps"], values["model.n_layers"]
        )  # fmt: skip
        assert cfg.model.d_model == 128 and cfg.train.steps == 10  # the rest untouched
        study.tell(trial, 0.0)
    assert base == {"model": {"preset": "tiny"}, "train": {"steps": 10}}  # with_values copied, never mutated


def test_each_kind_is_drawn_from_the_matching_optuna_distribution():
    """What Optuna records for each drawn parameter: the bounds, the step and the log scale of the entry."""
    space = parse_space(
        [
            "train.lr=loguniform(1e-4,3e-2)",
            "train.weight_decay=uniform(0,0.2)",
            "train.warmup_steps=int(0,500,50)",
            "train.micro_batch=logint(4,64)",
            "model.n_layers=choice(2,4,8)",
        ]
    )
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    for p in space:
        p.suggest(trial)
    D = optuna.distributions
    assert trial.distributions == {
        "train.lr": D.FloatDistribution(1e-4, 3e-2, log=True),
        "train.weight_decay": D.FloatDistribution(0.0, 0.2, log=False),
        "train.warmup_steps": D.IntDistribution(0, 500, step=50),
        "train.micro_batch": D.IntDistribution(4, 64, log=True),
        "model.n_layers": D.CategoricalDistribution((2, 4, 8)),
    }


def test_with_values_copies_every_section_it_sets_below():
    base = {"model": {"preset": "tiny", "moe": {"n_experts": 4}}, "train": {"lr": 0.1}}
    out = with_values(base, {"model.moe.top_k": 2, "train.lr": 0.2, "eval.every": 5})
    assert out == {
        "model": {"preset": "tiny", "moe": {"n_experts": 4, "top_k": 2}},
        "train": {"lr": 0.2},
        "eval": {"every": 5},
    }
    assert base == {"model": {"preset": "tiny", "moe": {"n_experts": 4}}, "train": {"lr": 0.1}}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("train.lrr=loguniform(1e-4,1e-2)", ["'train.lrr'", "did you mean 'lr'"]),
        ("trian.lr=loguniform(1e-4,1e-2)", ["section 'trian'", "did you mean 'train'"]),
        ("model.moe.topk=int(1,2)", ["'model.moe.topk'", "did you mean 'top_k'"]),
        ("train.lr=logunifrom(1e-4,1e-2)", ["unknown kind 'logunifrom'", "did you mean 'loguniform'"]),
        ("train.lr=loguniform(0,1e-2)", ["lower bound > 0"]),
        ("train.lr=uniform(1e-2,1e-4)", ["must be below"]),
        ("train.lr=uniform(1e-2)", ["takes uniform(a,b)", "1 value"]),
        ("train.lr=uniform(a,1)", ["'a' is not a finite number"]),
        ("train.warmup_steps=uniform(0,100)", ["is an integer", "int(a,b)"]),
        ("train.warmup_steps=int(0.5,100)", ["whole numbers"]),
        ("model.norm=uniform(0,1)", ["model.norm is not a number", "choice("]),
        ("model.norm=choice(rmsnorm,batchnorm)", ["'batchnorm'", "must be one of"]),
        ("model.n_layers=choice(2,2)", ["listed twice"]),
        ("train.out_dir=choice(a,b)", ["set by the sweep"]),
        ("train.lr 1e-3", ["expected KEY=KIND(ARGS)"]),
        ("train.lr.x=uniform(0,1)", ["has no keys below it"]),
        ("train.lr=uniform(0.1,0.1)", ["lower bound 0.1 must be below the upper 0.1"]),
        ("train.lr=uniform(0,1,2)", ["takes uniform(a,b)", "3 value"]),
        ("train.micro_batch=logint(4,64,2)", ["takes logint(a,b)", "3 value"]),
        ("train.warmup_steps=int(0,10,0)", ["step must be a whole number >= 1"]),
        ("train.warmup_steps=loguniform(1,100)", ["is an integer", "logint(a,b)"]),
        ("train.lr=uniform(0,inf)", ["'inf' is not a finite number"]),
    ],
)
def test_bad_entries_name_the_entry_and_the_fix(entry, expected):
    with pytest.raises(ConfigError) as err:
        parse_space([entry])
    message = str(err.value)
    assert f"--space {entry!r}" in message, message
    for piece in expected:
        assert piece in message, (piece, message)


def test_a_key_searched_twice_and_an_empty_space_are_errors():
    with pytest.raises(ConfigError, match="train.lr is searched twice"):
        parse_space(["train.lr=uniform(0.1,1)", "train.lr=loguniform(1e-4,1)"])
    with pytest.raises(ConfigError, match="nothing to search"):
        parse_space([" ; "])


def test_a_yaml_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: loguniform(1e-4, 1e-2)\nmodel.n_layers: choice(1, 2)\n")
    lr, layers = parse_space([str(path)])
    assert math.isclose(lr.high, 1e-2) and layers.choices == (1, 2)


def test_the_cli_reports_a_bad_space_in_one_line(tiny_config, tmp_path, capsys):
    code = main(
        [
            "sweep",
            str(tiny_config),
            "--space",
            "train.lrr=loguniform(1e-4,1e-2)",
            "--trials",
            "1",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lmforge sweep: error:" in err and "did you mean 'lr'" in err, err
    assert not (tmp_path / "s").exists()  # nothing started


def test_a_slurm_array_runs_the_same_sweep_on_every_task(tiny_config, tmp_path, capsys):
    import shlex

    from lmforge.auto.sweep import sweep_arguments
    from lmforge.cli import build_parser
    from lmforge.cli.sweep import spec_from_args

    script_path = tmp_path / "sweep.sh"
    argv = [
        "sweep", str(tiny_config), "train.steps=50", "--space", "train.lr=loguniform(1e-4,1e-2)",
        "--space", "model.n_layers=choice(1,2)", "--trials", "64", "--out", str(tmp_path / "s"),
        "--storage", "postgresql://u@db/sweeps", "--pruner", "halving", "--transfer-width", "256", "512",
        "--slurm", str(script_path), "--slurm-tasks", "8", "--gpus-per-task", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "8 sweep workers" in capsys.readouterr().out
    script = script_path.read_text().splitlines()
    assert "#SBATCH --array=0-7" in script and "#SBATCH --gpus-per-task=1" in script
    command = shlex.split(script[-1])
    assert command[:2] == ["lmforge", "sweep"]
    # Each task's command line describes the very sweep the one above did, without the --slurm options.
    args = build_parser().parse_args(command[1:])
    assert spec_from_args(args) == spec_from_args(build_parser().parse_args(argv))
    assert args.transfer_width == [256, 512] and args.slurm is None
    assert command[2:] == sweep_arguments(spec_from_args(args), (256, 512))


def test_a_slurm_array_needs_a_shared_database(tiny_config, tmp_path, capsys):
    argv = ["sweep", str(tiny_config), "--space", "train.lr=loguniform(1e-4,1e-2)", "--trials", "4"]
    assert main([*argv, "--slurm", str(tmp_path / "x.sh")]) == 2
    assert "--storage URL" in capsys.readouterr().err and not (tmp_path / "x.sh").exists()
