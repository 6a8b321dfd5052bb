"""One trial: a real `lmforge train` process, followed through its metrics.jsonl, pruned, diverged or failed,
and a trial left running by a killed sweep failed (and its process ended) when the sweep starts again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from lmforge.auto.sweep import fail_stopped_trials
from lmforge.auto.trial import MetricsFollower, run_trial, train_command


def test_the_follower_reads_whole_lines_once_and_starts_over_after_a_rollback(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.new_records() == []  # no file yet
    lines = [json.dumps({"step": s, "loss": 5.0 - s}) for s in (1, 2, 3)]
    path.write_text(lines[0] + "\n" + lines[1][:7])  # the second line is still being written
    assert [r["step"] for r in follower.new_records()] == [1]
    path.write_text("\n".join(lines) + "\n" + json.dumps({"step": 3, "val_loss": 1.5}) + "\n")
    assert [(r["step"], sorted(r)) for r in follower.new_records()] == [
        (2, ["loss", "step"]), (3, ["loss", "step"]), (3, ["step", "val_loss"])
    ]  # fmt: skip
    # A rollback rewrites the file shorter (records after step 1 dropped), then logs steps 2.. again.
    path.write_text(lines[0] + "\n")
    assert follower.new_records() == []
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + json.dumps({"step": 4, "loss": 0.5}) + "\n")
    assert [r["step"] for r in follower.new_records()] == [4]  # step 2 was already seen


def deadline(seconds: float = 240.0):
    """A should_stop for run_trial: a trial that never ends the way a test expects fails it, never hangs."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() > end


def trial_config(tiny_config, run_dir, **train):
    data = yaml.safe_load(tiny_config.read_text())
    data["train"].update(out_dir=str(run_dir), **train)
    path = run_dir / "trial.yaml"
    run_dir.mkdir(parents=True)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_a_pruned_trial_is_stopped_at_once(tiny_config, cache_env, tmp_path):
    run_dir = tmp_path / "t"
    config = trial_config(tiny_config, run_dir, steps=5000)
    reported = []

    def report(step, value):
        reported.append((step, value))
        return True  # prune at the first validation loss

    outcome = run_trial(
        train_command(config), run_dir, objective="val_loss", report=report, should_stop=deadline()
    )
    assert outcome.state == "pruned" and outcome.reason.startswith("pruned at step 4 (val_loss"), outcome
    assert reported[0][0] == 4 and outcome.value == reported[0][1]
    assert outcome.last_step < 5000 and not (run_dir / "checkpoints" / "step_00005000").exists()
    assert outcome.returncode == -9  # killed, not left to checkpoint and finish
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert reported[0][1] == [r["val_loss"] for r in records if "val_loss" in r][0]


@pytest.mark.slow
def test_a_diverging_trial_is_pruned_with_its_reason(tiny_config, cache_env, tmp_path):
    run_dir = tmp_path / "t"
    config = trial_config(tiny_config, run_dir, lr=1000.0, min_lr=0.0, warmup_steps=0, steps=60)
    outcome = run_trial(
        train_command(config),
        run_dir,
        objective="val_loss",
        report=lambda s, v: False,
        should_stop=deadline(),
    )
    assert outcome.state == "pruned" and outcome.reason.startswith("diverged"), outcome
    assert outcome.last_step < 60


@pytest.mark.slow
def test_a_failing_trial_keeps_the_error(tiny_config, cache_env, tmp_path):
    run_dir = tmp_path / "t"
    config = trial_config(tiny_config, run_dir, micro_batch=100_000)  # more tokens than the data holds
    outcome = run_trial(
        train_command(config),
        run_dir,
        objective="val_loss",
        report=lambda s, v: False,
        should_stop=deadline(),
    )
    assert outcome.state == "failed" and outcome.returncode == 2, outcome
    assert (
        outcome.reason.startswith("exit code 2: lmforge train: error:")
        and "train.micro_batch" in outcome.reason
    )
    assert "train.micro_batch" in outcome.output_tail


def test_a_trial_left_running_by_a_killed_sweep_is_failed_and_its_process_ended(tmp_path):
    config = tmp_path / "trials" / "0000" / "trial.yaml"
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(config)], start_new_session=True
    )
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    for key, value in (("pid", orphan.pid), ("host", socket.gethostname()), ("config", str(config))):
        running.set_user_attr(key, value)
    unrelated = study.ask()
    unrelated.set_user_attr("pid", orphan.pid)  # same pid, but not its config: never killed for it
    unrelated.set_user_attr("host", socket.gethostname())
    try:
        assert fail_stopped_trials(study, owned=True) == [1, 2]
        assert orphan.wait(timeout=10) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
    states = {t.number: (t.state.name, t.user_attrs.get("reason", "")) for t in study.get_trials()}
    assert states[0] == ("COMPLETE", "")
    assert states[1][0] == "FAIL" and "stopped while this trial ran" in states[1][1]
    assert fail_stopped_trials(study, owned=True) == []  # nothing left running


def test_without_the_folder_lock_only_silent_trials_are_failed(tmp_path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(storage=storage, study_name="s")
    silent, alive = study.ask(), study.ask()
    storage.record_heartbeat(silent._trial_id)
    time.sleep(2.2)
    storage.record_heartbeat(alive._trial_id)
    assert fail_stopped_trials(study, owned=False) == [silent.number]
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "RUNNING"]


def test_a_study_continues_only_with_the_same_config_space_and_objective(tiny_config, tmp_path):
    import dataclasses

    from lmforge.auto.space import parse_space
    from lmforge.auto.sweep import SweepSpec, base_data, open_storage, open_study
    from lmforge.errors import ConfigError

    (tmp_path / "s").mkdir()
    space = tuple(parse_space(["train.lr=loguniform(1e-4,1e-2)"]))
    spec = SweepSpec(config=str(tiny_config), space=space, trials=2, out_dir=str(tmp_path / "s"))
    data = base_data(spec)
    storage = open_storage(spec)
    assert open_study(spec, data, storage).study_name == "s"
    open_study(dataclasses.replace(spec, trials=10), data, storage)  # a larger budget continues it
    wider = dataclasses.replace(spec, space=tuple(parse_space(["train.lr=loguniform(1e-4,1e-1)"])))
    with pytest.raises(ConfigError, match="was started with another space"):
        open_study(wider, data, storage)
    with pytest.raises(ConfigError, match="another config and objective"):
        open_study(dataclasses.replace(spec, objective="loss"), {**data, "eval": {"every": 5}}, storage)


def test_one_sweep_process_per_folder(tmp_path):
    from lmforge.auto.sweep import FolderLock
    from lmforge.errors import ConfigError

    with FolderLock(tmp_path / "sweep.lock"):
        with pytest.raises(
            ConfigError, match=rf"in use by another `lmforge sweep` \(pid \d+ on {socket.gethostname()}\)"
        ):
            with FolderLock(tmp_path / "sweep.lock"):
                pass
    with FolderLock(tmp_path / "sweep.lock"):  # free again once the first is released
        pass
