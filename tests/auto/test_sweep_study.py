"""The sweep's study without training runs: validation of the spec, the storage's heartbeat settings, the
pruners' behaviour, the trial budget, a resumed sampler, and how finished trials are recorded and read back."""

from __future__ import annotations

import dataclasses
import warnings

import optuna
import pytest

from lmforge.auto.space import parse_space
from lmforge.auto.sweep import (
    Sweeper,
    SweepSpec,
    base_data,
    make_pruner,
    open_storage,
    open_study,
    row_of,
    run_sweep,
    trial_dir,
)
from lmforge.auto.trial import Outcome
from lmforge.errors import ConfigError

LR = "train.lr=loguniform(1e-4,1e-2)"


def spec_of(tmp_path, config="unused.yaml", space=(LR,), **kw) -> SweepSpec:
    (tmp_path / "s").mkdir(exist_ok=True)
    return SweepSpec(
        config=str(config), space=tuple(parse_space(list(space))), out_dir=str(tmp_path / "s"), **kw
    )


def test_the_spec_names_each_impossible_setting(tmp_path):
    assert spec_of(tmp_path, trials=1).problems() == []
    assert spec_of(tmp_path, trials=0).problems() == ["--trials=0 must be >= 1"]
    data = spec_of(tmp_path, space=(LR, "data.val_fraction=uniform(0.01,0.1)"), trials=4, workers=2)
    [problem] = data.problems()
    assert problem.startswith("--space searches data.val_fraction: trials would prepare their data")
    assert dataclasses.replace(data, workers=1).problems() == []


def test_a_shared_storage_fails_a_trial_after_three_silent_heartbeats(tmp_path):
    spec = spec_of(tmp_path, trials=1, storage=f"sqlite:///{tmp_path / 'shared.db'}", heartbeat_s=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(spec)
    assert (storage.heartbeat_interval, storage.grace_period) == (7, 21)
    own = open_storage(spec_of(tmp_path, trials=1))  # the sweep's own SQLite file: no heartbeats
    assert own.heartbeat_interval is None


def report_curve(study, values: dict[int, float], value: float | None = None):
    trial = study.ask()
    for step, v in values.items():
        trial.report(v, step)
    if value is not None:
        study.tell(trial, value)
    return trial


def test_the_median_pruner_waits_for_its_startup_trials_and_warmup_steps(tmp_path):
    spec = spec_of(tmp_path, trials=1, prune_startup_trials=1, prune_warmup_steps=3)
    study = optuna.create_study(pruner=make_pruner(spec))
    report_curve(study, {s: 1.0 for s in range(1, 6)}, value=1.0)  # one finished trial: the median is 1.0
    bad = study.ask()
    bad.report(10.0, 2)
    assert not bad.should_prune()  # step 2 is inside the warmup of 3 steps
    bad.report(10.0, 3)
    assert bad.should_prune()  # past the warmup, worse than the median of the one startup trial
    patient = optuna.create_study(pruner=make_pruner(dataclasses.replace(spec, prune_startup_trials=2)))
    report_curve(patient, {s: 1.0 for s in range(1, 6)}, value=1.0)
    worse = patient.ask()
    worse.report(10.0, 4)
    assert not worse.should_prune()  # only one of its two startup trials has finished


def test_successive_halving_starts_its_rungs_at_the_warmup(tmp_path):
    pruner = make_pruner(spec_of(tmp_path, trials=1, pruner="halving", prune_warmup_steps=4))
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource == 4
    # no warmup: "auto", which Optuna keeps as None until it sets it from the first finished trial
    assert make_pruner(spec_of(tmp_path, trials=1, pruner="halving"))._min_resource is None


def test_running_trials_count_against_the_budget(tmp_path):
    study = optuna.create_study()
    sweeper = Sweeper(spec_of(tmp_path, trials=2), study, {}, cache_dir=tmp_path, on_trial=print)
    assert sweeper.budget_left()
    report_curve(study, {}, value=1.0)
    assert sweeper.budget_left()  # 1 of 2
    study.ask()  # a trial another worker runs
    assert not sweeper.budget_left()


def test_a_resumed_study_draws_afresh(tiny_config, tmp_path):
    spec = spec_of(tmp_path, config=tiny_config, trials=10)
    data = base_data(spec)
    [param] = spec.space
    storage = open_storage(spec)
    first = open_study(spec, data, storage)
    drawn = []
    for _ in range(3):  # TPE's random startup draws
        trial = first.ask()
        drawn.append(param.suggest(trial))
        first.tell(trial, 1.0)
    again = open_study(spec, data, storage)  # the sweep stopped and started again
    trial = again.ask()
    assert param.suggest(trial) not in drawn  # not the first run's draws once more


def test_a_finished_trial_is_recorded_with_its_state_reason_and_curve(tmp_path):
    study = optuna.create_study()
    rows = []
    sweeper = Sweeper(spec_of(tmp_path, trials=3), study, {}, cache_dir=tmp_path, on_trial=rows.append)
    pruned = report_curve(study, {2: 3.0, 4: 2.5, 6: 2.75})
    sweeper.tell(pruned, Outcome("pruned", 2.75, "worse than the median", 6, 1.5, 0))
    failed = study.ask()
    sweeper.tell(failed, Outcome("failed", None, "exit code 1: boom", 0, 0.25, 1, "Traceback ..."))
    done = report_curve(study, {2: 2.0})
    sweeper.tell(done, Outcome("complete", 1.75, "", 8, 3.0, 0))
    assert [(r.number, r.state, r.value, r.reason, r.last_step) for r in rows] == [
        (0, "PRUNED", 2.75, "worse than the median", 6),
        (1, "FAIL", None, "exit code 1: boom", 0),
        (2, "COMPLETE", 1.75, "", 8),
    ]
    assert rows[0].curve == [(2, 3.0), (4, 2.5), (6, 2.75)] and rows[0].seconds == 1.5
    assert study.trials[1].user_attrs["output_tail"] == "Traceback ..."
    # a pruned trial's value is the last one it reported, however the steps arrived
    late = study.ask()
    for step, value in ((5, 2.0), (1, 4.0), (3, 3.0)):
        late.report(value, step)
    study.tell(late, state=optuna.trial.TrialState.PRUNED)
    assert row_of(study.trials[-1]).value == 2.0
    # a trial failed after reporting (its worker stopped sending heartbeats): Optuna keeps no value, the row
    # shows the one at its last step
    lost = study.ask()
    for step, value in ((4, 2.5), (2, 3.5), (6, 2.25), (1, 5.0)):
        lost.report(value, step)
    study.tell(lost, state=optuna.trial.TrialState.FAIL)
    row = row_of(study.trials[-1])
    assert study.trials[-1].value is None and (row.state, row.value) == ("FAIL", 2.25)
    assert row.reason == "its worker stopped sending heartbeats" and row.curve[0] == (1, 5.0)


def test_a_trial_folder_left_by_another_study_is_not_reused(tmp_path):
    study = optuna.create_study()
    spec = spec_of(tmp_path, trials=1)
    sweeper = Sweeper(spec, study, {}, cache_dir=tmp_path, on_trial=print)
    folder = trial_dir(spec.out_dir, 0)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    outcome = sweeper.run_one(study.ask(), {"train.lr": 1e-3})
    assert (
        outcome.state == "failed"
        and outcome.reason == f"{folder.absolute()} already exists (left by another study?)"
    )
    assert (folder / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched


def test_a_transferred_sweep_may_not_search_the_base_width(tiny_config, tmp_path):
    spec = spec_of(tmp_path, config=tiny_config, space=(LR, "model.mup_base_width=choice(16,32)"), trials=1)
    with pytest.raises(
        ConfigError, match="--transfer-width sets model.mup_base_width itself; do not search it"
    ):
        run_sweep(spec, cache_dir=tmp_path / "cache", transfer_widths=(64,))
    assert list((tmp_path / "s").iterdir()) == []  # refused before anything started
