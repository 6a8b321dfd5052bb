"""`lmforge sweep` end to end: real trials, a sweep killed mid-trial and continued, a diverging trial, and the
best config checked against the study itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from lmforge.config import load_config

pytestmark = pytest.mark.slow


def sweep_command(config: Path, out: Path, trials: int, *space: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "lmforge.cli",
        "sweep",
        str(config),
        "--trials",
        str(trials),
        "--out",
        str(out),
    ]
    for entry in space or ("train.lr=loguniform(1e-3,1e-2)", "train.warmup_steps=int(0,4)"):
        args += ["--space", entry]
    return args


def study_trials(out: Path) -> list:
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=out.name, storage=storage).get_trials()


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def training_started(run_dir: Path) -> bool:
    log = run_dir / "train.log"
    return log.is_file() and "training " in log.read_text(errors="replace")


def processes_running(config: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(config) in (process.info["cmdline"] or []) and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_a_sweep_killed_mid_trial_continues_without_losing_or_repeating_a_trial(
    tiny_config, cache_env, tmp_path
):
    out = tmp_path / "sweep"
    command = [*sweep_command(tiny_config, out, 3), "train.steps=60"]  # long enough to be killed mid-run
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: training_started(out / "trials" / "0001"), "trial 1 to start training")
    finally:
        sweep.send_signal(signal.SIGKILL)  # the sweep dies at once, mid-trial; its trial process lives on
        sweep.wait()
    orphan_config = out / "trials" / "0001" / "trial.yaml"
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE", "RUNNING"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1, 2]  # total = --trials, the killed one counted
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "stopped while this trial ran" in trials[1].user_attrs["reason"]
    finished_now = [line.split(":")[0] for line in again.stdout.splitlines() if line.startswith("trial ")]
    assert finished_now == ["trial 2"]  # neither the complete trial nor the killed one ran again
    for number in (0, 1, 2):  # each trial's process started once, in its own folder
        log = (out / "trials" / f"{number:04d}" / "train.log").read_text(errors="replace")
        assert log.count("training ") == 1, (number, log[-1000:])
    assert processes_running(orphan_config) == []  # the killed sweep's training process was ended
    assert trials[0].params != trials[2].params  # the resumed sampler draws afresh

    # Once the study is full, the same command only reports.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and not [
        line for line in done.stdout.splitlines() if line.startswith("trial ")
    ]
    assert len(study_trials(out)) == 3


def test_a_diverging_trial_is_pruned_and_the_sweep_goes_on(tiny_config, cache_env, tmp_path):
    out = tmp_path / "sweep"
    # TPE's first two (random) draws with seed 0: lr=1000 (diverges), then lr=0.003.
    command = sweep_command(tiny_config, out, 2, "train.lr=choice(0.003,1000)")
    result = subprocess.run([*command, "--seed", "0"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    first, second = study_trials(out)
    assert first.params == {"train.lr": 1000.0} and second.params == {"train.lr": 0.003}
    assert first.state.name == "PRUNED" and first.user_attrs["reason"].startswith("diverged"), (
        first.user_attrs
    )
    assert second.state.name == "COMPLETE"

    best = load_config(
        out / "best.yaml"
    )  # ready for `lmforge train`: the best trial's values, the rest CONFIG's
    assert best.train.lr == 0.003
    base = load_config(tiny_config)
    assert best.model == base.model and best.train.steps == base.train.steps
    assert best.train.out_dir == base.train.out_dir
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# best of the sweep: trial 1, val_loss {second.value:.6g}")
    for name in ("trials.csv", "history.png", "params.png", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert "best: trial 1" in result.stdout and "diverged" in result.stdout


def test_best_yaml_is_the_study_best_trial(tiny_config, cache_env, tmp_path):
    out = tmp_path / "sweep"
    command = sweep_command(
        tiny_config,
        out,
        2,
        "train.lr=loguniform(1e-3,1e-2)",
        "train.warmup_steps=int(0,4)",
        "model.n_layers=choice(1,2)",
    )
    result = subprocess.run([*command, "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    best_trial = optuna.load_study(study_name=out.name, storage=storage).best_trial
    best = load_config(out / "best.yaml")
    assert best.train.lr == best_trial.params["train.lr"]
    assert best.train.warmup_steps == best_trial.params["train.warmup_steps"]
    assert best.model.n_layers == best_trial.params["model.n_layers"]
    # The trial's own resolved config (written by `lmforge train`) agrees with its recorded parameters.
    ran = load_config(Path(best_trial.user_attrs["run_dir"]) / "config.yaml")
    assert (ran.train.lr, ran.model.n_layers) == (best.train.lr, best.model.n_layers)
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # two at once, one study
    assert trials[0].params != trials[1].params and os.path.isdir(out / "trials" / "0001")
    first_done = min(t.datetime_complete for t in trials)
    assert max(t.datetime_start for t in trials) < first_done  # they ran at the same time


def test_sigterm_stops_the_sweep_and_records_the_running_trial_as_failed(tiny_config, cache_env, tmp_path):
    out = tmp_path / "sweep"
    command = [*sweep_command(tiny_config, out, 2), "train.steps=5000"]  # a trial that would run long
    sweep = subprocess.Popen(command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: training_started(out / "trials" / "0000"), "trial 0 to start training")
    finally:
        sweep.send_signal(signal.SIGTERM)
    stdout, stderr = sweep.communicate(timeout=300)
    assert sweep.returncode == 128 + signal.SIGTERM, stderr
    (trial,) = study_trials(out)
    assert (
        trial.state.name == "FAIL"
        and trial.user_attrs["reason"] == "the sweep was stopped while this trial ran"
    )
    assert processes_running(out / "trials" / "0000" / "trial.yaml") == []
    assert (out / "trials.csv").read_text().splitlines()[1].startswith("0,FAIL,")
