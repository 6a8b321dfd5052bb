"""``lmforge sweep``: hyperparameter search with Optuna, each trial a real ``lmforge train`` run.

The study lives in a storage: by default ``SWEEP/study.db`` (SQLite), so stopping the sweep and running the
same command again continues it; on a cluster any database URL Optuna accepts, shared by several sweep
processes. Trials are drawn by TPE, run in ``SWEEP/trials/NNNN`` in their own process (``auto.trial``), and
pruned from their validation losses (median rule or successive halving). A trial that diverges, fails or is
killed is recorded, never fatal: the sweep goes on until the study holds ``trials`` trials.

A trial left running by a stopped sweep is recorded as failed, never run again: with the default storage
the sweep owns its folder (a lock) and fails such trials when it starts; with a shared database each
running trial sends heartbeats and one that stops sending them is failed by whichever worker sees it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.auto.space import Param, with_values
from lmforge.auto.trial import Outcome, run_trial, train_command
from lmforge.config import apply_overrides, config_from_dict, load_yaml
from lmforge.errors import ConfigError
from lmforge.files import write_text_atomic

PRUNERS = ("median", "halving", "none")
STUDY_DB = "study.db"
LOCK = "sweep.lock"


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """What to search, how long, where the study and the trials live."""

    config: str  # the YAML config every trial starts from
    overrides: tuple[str, ...] = ()  # dotted overrides applied to every trial
    space: tuple[Param, ...]
    trials: int  # trials in the study in all (failed and pruned ones count), across restarts and workers
    out_dir: str
    objective: str = "val_loss"  # a value the runs log to metrics.jsonl
    direction: Literal["minimize", "maximize"] = "minimize"
    storage: str | None = None  # None: sqlite in out_dir; else an Optuna database URL
    study_name: str | None = None  # None: the sweep folder's name
    workers: int = 1  # trials run at once by this process
    pruner: Literal["median", "halving", "none"] = "median"
    prune_warmup_steps: int = 0  # no pruning before this step
    prune_startup_trials: int = 5  # median: no pruning until this many trials have finished
    seed: int = 0
    startup_trials: int = 10  # TPE: random draws before the model of good and bad trials kicks in
    heartbeat_s: int = 30  # shared storage: a trial silent for 3x this long is failed

    def problems(self) -> list[str]:
        out = []
        if self.trials < 1:
            out.append(f"--trials={self.trials} must be >= 1")
        if self.workers < 1:
            out.append(f"--workers={self.workers} must be >= 1")
        if self.pruner not in PRUNERS:
            out.append(f"--pruner={self.pruner!r} must be one of {', '.join(PRUNERS)}")
        if self.direction not in ("minimize", "maximize"):
            out.append(f"--direction={self.direction!r} must be minimize or maximize")
        if self.prune_warmup_steps < 0 or self.prune_startup_trials < 0 or self.startup_trials < 0:
            out.append("--prune-warmup, --prune-startup and --startup-trials must be >= 0")
        if self.heartbeat_s < 1:
            out.append(f"heartbeat_s={self.heartbeat_s} must be >= 1")
        data_keys = [p.key for p in self.space if p.key.startswith("data.")]
        if data_keys and self.workers > 1:
            out.append(
                f"--space searches {data_keys[0]}: trials would prepare their data at the same time; "
                "use --workers 1 (or prepare each variant first and search data.prepared)"
            )
        return out


@dataclass(frozen=True)
class TrialRow:
    """One trial of the study, as the table, the plots and the best config see it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    value: float | None  # the final objective (COMPLETE), else the last one reported
    params: dict[str, Any]
    seconds: float | None
    last_step: int | None
    reason: str
    run_dir: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, objective) reported while running


@dataclass(frozen=True)
class SweepResult:
    out_dir: Path
    study_name: str
    storage: str
    rows: list[TrialRow]
    best: TrialRow | None
    ran: int  # trials this process ran
    stopped_by: str | None  # None, or the signal that stopped the sweep
    files: dict[str, Path] = field(default_factory=dict)  # what the report wrote: table, best config, plots


def validate(spec: SweepSpec) -> None:
    problems = spec.problems()
    if problems:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(problems))


def base_data(spec: SweepSpec) -> dict:
    """The plain config data every trial starts from (CONFIG plus the sweep's overrides), checked once."""
    data = apply_overrides(load_yaml(spec.config), list(spec.overrides))
    config_from_dict(data)
    return data


# -- the study ------------------------------------------------------------------------------------------------


def storage_url(spec: SweepSpec) -> str:
    return spec.storage or f"sqlite:///{(Path(spec.out_dir) / STUDY_DB).absolute()}"


def require_optuna():
    """Optuna, or a one-line error saying how to install it (it is an optional dependency)."""
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError(f"lmforge sweep needs Optuna ({exc}); pip install 'lmforge[sweep]'") from None
    return optuna


def open_storage(spec: SweepSpec):
    """The study's storage; a shared database records heartbeats so a lost worker's trial is failed."""
    optuna = require_optuna()

    url = storage_url(spec)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None  # threads wait on locks
    if spec.storage is None:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=spec.heartbeat_s, grace_period=3 * spec.heartbeat_s
    )


def make_pruner(spec: SweepSpec):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.prune_startup_trials, n_warmup_steps=spec.prune_warmup_steps
        )
    if spec.pruner == "halving":  # rungs from the first reported step; a warmup sets the smallest rung
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.prune_warmup_steps or "auto", reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def fingerprint(spec: SweepSpec, data: dict) -> dict:
    """What must not change between runs of one study (the trial budget may)."""
    return {
        "config": data,
        "space": [p.spec for p in spec.space],
        "objective": spec.objective,
        "direction": spec.direction,
    }


def open_study(spec: SweepSpec, data: dict, storage):
    """Create or continue the study; a study started with another config, space or objective is refused."""
    import optuna

    name = spec.study_name or Path(spec.out_dir).absolute().name
    if name in [s.study_name for s in storage.get_all_studies()]:
        study = optuna.load_study(study_name=name, storage=storage)
        done = len(study.get_trials(deepcopy=False))
    else:
        done = 0
    # A resumed sweep draws afresh (not the first run's startup draws again); sweep processes sharing a
    # database each draw their own.
    seed = spec.seed + 1000 * done + (os.getpid() if spec.storage else 0)
    sampler = optuna.samplers.TPESampler(seed=seed % 2**32, n_startup_trials=spec.startup_trials)
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(spec),
        study_name=name,
        direction=spec.direction,
        load_if_exists=True,
    )
    wanted = fingerprint(spec, data)
    found = study.user_attrs.get("lmforge_sweep")
    if found is None:
        study.set_user_attr("lmforge_sweep", wanted)
    else:
        changed = [key for key in wanted if found.get(key) != wanted[key]]
        if changed:
            raise ConfigError(
                f"study '{name}' in {storage_url(spec)} was started with another {' and '.join(changed)}; "
                "continue it with the same command, or start a new sweep with another --out / --study"
            )
    return study


class FolderLock:
    """The sweep folder's lock (``SWEEP/sweep.lock``): held while a sweep with the default storage runs,
    so its trials left RUNNING can only be those of a sweep that was stopped. The kernel drops it when the
    process dies, however it dies."""

    def __init__(self, path: Path, blocking: bool = False):
        self.path, self.blocking, self.handle = path, blocking, None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another `lmforge sweep` ({owner}); wait for it, or run "
                "several workers with --workers K or a shared --storage database"
            ) from None
        self.handle.truncate(0)
        self.handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _kill_orphan(attrs: dict) -> None:
    """End the training process of a trial whose sweep was killed, when it still runs on this host."""
    import psutil

    pid, host, config = attrs.get("pid"), attrs.get("host"), attrs.get("config")
    if not pid or host != socket.gethostname():
        return
    try:
        process = psutil.Process(int(pid))
        if config and config in process.cmdline():  # the very trial, not a reused pid
            os.killpg(process.pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError, PermissionError):
        pass


def fail_stopped_trials(study, *, owned: bool) -> list[int]:
    """Record the trials a stopped sweep left RUNNING as failed (never run again). ``owned``: this process
    holds the sweep folder's lock, so every RUNNING trial is such a one; otherwise only those whose
    heartbeats stopped."""
    import optuna
    from optuna.trial import TrialState

    if not owned:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        return sorted(t.number for t in after if t.number not in before)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        _kill_orphan(trial.user_attrs)
        study._storage.set_trial_user_attr(
            trial._trial_id, "reason", "the sweep was stopped while this trial ran (found running on restart)"
        )
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        failed.append(trial.number)
    return failed


# -- running trials -------------------------------------------------------------------------------------------


def prepare_data_once(data: dict, cache_dir: Path, lock_path: Path) -> None:
    """Prepare the trials' data before the first trial (K workers would otherwise prepare it K times at once),
    where each trial's ``lmforge train`` will look for it (the same cache), by the code train itself uses."""
    import torch

    from lmforge.distributed.parallelize import World
    from lmforge.train.data import prepared_datasets

    one_process = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with FolderLock(lock_path, blocking=True):  # sweep processes sharing a folder prepare it once
        prepared_datasets(config_from_dict(data), world=one_process, cache_dir=cache_dir, progress=False)


def trial_dir(out_dir: str | Path, number: int) -> Path:
    return Path(out_dir) / "trials" / f"{number:04d}"


class Sweeper:
    """Runs trials of one study on ``workers`` threads, each owning one training process at a time."""

    def __init__(self, spec: SweepSpec, study, data: dict, *, cache_dir: Path, on_trial: Callable):
        self.spec, self.study, self.data, self.cache_dir, self.on_trial = (
            spec,
            study,
            data,
            cache_dir,
            on_trial,
        )
        self.ask_lock = threading.Lock()
        self.stopping = threading.Event()
        self.ran = 0
        self.errors: list[BaseException] = []
        self.beats: dict[int, float] = {}  # trial id -> when its last heartbeat was recorded

    def budget_left(self) -> bool:
        from optuna.trial import TrialState

        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
        return len(self.study.get_trials(deepcopy=False, states=counted)) < self.spec.trials

    def worker(self) -> None:
        try:
            while not self.stopping.is_set():
                with self.ask_lock:  # count and ask together: this process never overshoots the budget
                    if self.spec.storage is not None:
                        fail_stopped_trials(self.study, owned=False)
                    if not self.budget_left():
                        return
                    with warnings.catch_warnings():  # heartbeats are ours to send, not Study.optimize's
                        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                        trial = self.study.ask()
                    self._heartbeat(trial, force=True)
                    params = {p.key: p.suggest(trial) for p in self.spec.space}
                self.ran += 1
                try:
                    outcome = self.run_one(trial, params)
                except Exception as exc:  # the sweep's own failure (a folder it cannot write): record it
                    self.tell(
                        trial, Outcome("failed", None, f"the sweep could not run it: {exc}", 0, 0.0, None)
                    )
                    raise
                self.tell(trial, outcome)
        except BaseException as exc:  # a storage error, say: stop the others and report it from the caller
            self.errors.append(exc)
            self.stopping.set()

    def _heartbeat(self, trial, force: bool = False) -> None:
        """Shared storage: tell the other workers this trial is alive (every third of ``heartbeat_s``)."""
        if self.spec.storage is None:
            return
        now = time.monotonic()
        if force or now - self.beats.get(trial._trial_id, 0.0) >= self.spec.heartbeat_s / 3:
            self.beats[trial._trial_id] = now
            self.study._storage.record_heartbeat(trial._trial_id)

    def run_one(self, trial, params: dict[str, Any]) -> Outcome:
        run_dir = trial_dir(self.spec.out_dir, trial.number).absolute()
        trial.set_user_attr("run_dir", str(run_dir))
        if run_dir.exists() and any(run_dir.iterdir()):
            return Outcome("failed", None, f"{run_dir} already exists (left by another study?)", 0, 0.0, None)
        data = with_values(self.data, {**params, "train.out_dir": str(run_dir)})
        try:
            config_from_dict(data)
        except ConfigError as exc:  # an impossible combination (say d_model not divisible by n_heads)
            return Outcome("failed", None, str(exc), 0, 0.0, None)
        config_path = run_dir / "trial.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

        def on_start(pid: int) -> None:
            for key, value in (("pid", pid), ("host", socket.gethostname()), ("config", str(config_path))):
                trial.set_user_attr(key, value)

        def report(step: int, value: float) -> bool:
            trial.report(value, step)
            return trial.should_prune()

        env = {**os.environ, "LMFORGE_CACHE": str(self.cache_dir), "PYTHONUNBUFFERED": "1"}
        return run_trial(
            train_command(config_path),
            run_dir,
            objective=self.spec.objective,
            report=report,
            should_stop=self.stopping.is_set,
            heartbeat=lambda: self._heartbeat(trial),
            on_start=on_start,
            env=env,
        )

    def tell(self, trial, outcome: Outcome) -> None:
        from optuna.trial import TrialState

        attrs = {
            "reason": outcome.reason,
            "seconds": round(outcome.seconds, 3),
            "last_step": outcome.last_step,
        }
        if outcome.output_tail:
            attrs["output_tail"] = outcome.output_tail
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if outcome.state == "complete":
            frozen = self.study.tell(trial, outcome.value)
        else:
            state = TrialState.PRUNED if outcome.state == "pruned" else TrialState.FAIL
            frozen = self.study.tell(trial, state=state)
        self.on_trial(row_of(frozen))

    def run(self, signals) -> None:
        """Run the workers until the budget is spent, or a stop signal (each running trial then fails)."""
        threads = [threading.Thread(target=self.worker, daemon=True) for _ in range(self.spec.workers)]
        for thread in threads:
            thread.start()
        try:
            while any(t.is_alive() for t in threads):
                for thread in threads:
                    thread.join(timeout=0.2)
                if signals.received:
                    self.stopping.set()
        except BaseException:  # a second Ctrl-C: still end every trial's process before leaving
            self.stopping.set()
            for thread in threads:
                thread.join()
            raise
        if self.errors:
            raise self.errors[0]


def row_of(trial) -> TrialRow:
    attrs = trial.user_attrs
    curve = sorted(trial.intermediate_values.items())
    value = trial.value if trial.value is not None else (curve[-1][1] if curve else None)
    return TrialRow(
        number=trial.number,
        state=trial.state.name,
        value=value,
        params=dict(trial.params),
        seconds=attrs.get("seconds"),
        last_step=attrs.get("last_step"),
        reason=attrs.get(
            "reason", "" if trial.state.name != "FAIL" else "its worker stopped sending heartbeats"
        ),
        run_dir=attrs.get("run_dir"),
        curve=curve,
    )


def run_sweep(
    spec: SweepSpec,
    *,
    cache_dir: str | Path,
    on_trial: Callable[[TrialRow], None] = lambda row: None,
    transfer_widths: tuple[int, ...] = (),
) -> SweepResult:
    """Run (or continue) the sweep ``spec`` until its study holds ``spec.trials`` trials, then write the
    report: ``trials.csv``, ``best.yaml`` (and ``best_d{WIDTH}.yaml`` per transfer width), plots.

    ``cache_dir``: where prepared data is kept (passed to every trial as ``LMFORGE_CACHE``); ``on_trial`` is
    called with each trial this process finishes."""
    from lmforge.auto.report import best_row, write_report
    from lmforge.auto.transfer import SHAPE_KEYS, check_transfer
    from lmforge.train.guards import StopSignals

    validate(spec)
    data = base_data(spec)
    for width in transfer_widths:  # a width the model cannot take fails now, not after the sweep
        searched = [p.key for p in spec.space if p.key in SHAPE_KEYS]
        if searched:
            raise ConfigError(f"--transfer-width sets {searched[0]} itself; do not search it")
        check_transfer(data, width)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out_dir / LOCK) if spec.storage is None else None
    with lock or contextlib.nullcontext(), StopSignals() as signals:
        storage = open_storage(spec)
        study = open_study(spec, data, storage)
        fail_stopped_trials(study, owned=lock is not None)
        sweeper = Sweeper(spec, study, data, cache_dir=Path(cache_dir), on_trial=on_trial)
        if sweeper.budget_left():
            prepare_data_once(data, Path(cache_dir), out_dir / "prepare.lock")
            sweeper.run(signals)
        rows = [row_of(t) for t in study.get_trials(deepcopy=False)]
        files = write_report(spec, data, rows, transfer_widths=transfer_widths)
    best = best_row(rows, spec.direction)
    return SweepResult(
        out_dir=out_dir,
        study_name=study.study_name,
        storage=storage_url(spec),
        rows=rows,
        best=best,
        ran=sweeper.ran,
        stopped_by=signals.received,
        files=files,
    )


# -- a Slurm array of sweep workers ---------------------------------------------------------------------------


def sweep_arguments(spec: SweepSpec, transfer_widths: tuple[int, ...] = ()) -> list[str]:
    """The ``lmforge sweep`` arguments that run ``spec`` (what every worker of an array runs)."""
    args = [spec.config, *spec.overrides]
    for param in spec.space:
        args += ["--space", param.spec]
    args += ["--trials", str(spec.trials), "--out", spec.out_dir, "--objective", spec.objective]
    args += ["--direction", spec.direction, "--workers", str(spec.workers), "--pruner", spec.pruner]
    args += [
        "--prune-warmup",
        str(spec.prune_warmup_steps),
        "--prune-startup",
        str(spec.prune_startup_trials),
    ]
    args += ["--seed", str(spec.seed), "--startup-trials", str(spec.startup_trials)]
    if spec.storage:
        args += ["--storage", spec.storage]
    if spec.study_name:
        args += ["--study", spec.study_name]
    if transfer_widths:
        args += ["--transfer-width", *map(str, transfer_widths)]
    return args


def slurm_array_script(
    spec: SweepSpec,
    *,
    tasks: int,
    transfer_widths: tuple[int, ...] = (),
    time_limit: str = "24:00:00",
    gpus_per_task: int = 0,
    partition: str | None = None,
    job_name: str = "lmforge-sweep",
) -> str:
    """A batch script for ``sbatch``: an array of ``tasks`` sweep processes sharing one study through
    ``spec.storage`` (a database every node reaches), each running its trials one at a time by default."""
    import shlex

    validate(spec)
    if not spec.storage:
        raise ConfigError(
            "--slurm-tasks: the workers share the study through --storage URL (e.g. postgresql://user@host/db); "
            "the default SQLite file belongs to one sweep process"
        )
    if tasks < 1:
        raise ConfigError(f"--slurm-tasks={tasks} must be >= 1")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{tasks - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --output={job_name}-%A_%a.out",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    command = shlex.join(["lmforge", "sweep", *sweep_arguments(spec, transfer_widths)])
    return "\n".join([*lines, "", "set -euo pipefail", command, ""])
