"""Experiment trackers a run reports to: TensorBoard (the default), MLflow, Weights & Biases.

``train.trackers`` names them. Each gets the config (as parameters), every scalar ``RunLogger`` logs (with
the same step numbers) and, when the run closes, the loss plot and the model card as artifacts.

- MLflow logs to ``train.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else a local store in ``RUN/mlruns``
  (``sqlite:///RUN/mlruns/mlflow.db`` and the artifacts in ``RUN/mlruns/artifacts``).
- W&B runs offline (files under ``RUN/wandb``; ``wandb sync`` uploads them later) unless ``$WANDB_MODE`` is
  set or the user has logged in (``$WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai).

The tracker run ids are kept in ``RUN/trackers.json`` so a resumed run continues the same tracker runs.
A tracker that fails (not installed, server gone, an exception while logging) warns once and is dropped:
it never stops training.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from lmforge.config import TRACKERS
from lmforge.files import write_text_atomic

__all__ = ["TRACKERS", "Tracker", "Trackers"]
IDS_FILE = "trackers.json"
ARTIFACTS = ("loss.png", "MODEL_CARD.md", "samples.txt")  # whichever the run wrote


class Tracker(Protocol):
    name: str

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, artifacts: list[Path]) -> None: ...


def scalars(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (what a tracker can plot)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}`` (values cut to 500 characters)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


def read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _save_id(run_dir: Path, name: str, run_id: str) -> None:
    ids = read_ids(run_dir)
    ids[name] = run_id
    write_text_atomic(run_dir / IDS_FILE, json.dumps(ids, indent=2) + "\n")


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, start_step: int = 0, **_: Any):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, artifacts: list[Path]) -> None:
        self.writer.close()


def mlflow_uri(run_dir: Path, configured: str | None = None) -> str | None:
    """Where MLflow logs: the config's URI, else ``$MLFLOW_TRACKING_URI``, else None (``RUN/mlruns``)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


def local_store(run_dir: Path) -> tuple[str, str]:
    """The default store in the run folder: an SQLite database (MLflow 3 keeps its plain-file store only
    behind an opt-out) and the artifacts beside it, both in ``RUN/mlruns``."""
    folder = (run_dir / "mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(
        self, run_dir: Path, *, config: dict | None, resume: bool, mlflow_uri_: str | None = None, **_: Any
    ):
        from mlflow.tracking import MlflowClient

        uri, artifacts = mlflow_uri(run_dir, mlflow_uri_), None
        if uri is None:
            uri, artifacts = local_store(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        run_id = read_ids(run_dir).get(self.name) if resume else None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("lmforge")
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment("lmforge", artifact_location=artifacts)
            )
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            _save_id(run_dir, self.name, run_id)
            if config:
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in flat_params(config).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                    self.client.log_batch(run_id, params=params[i : i + 100])
        self.run_id = run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


def wandb_mode() -> str:
    """``$WANDB_MODE`` if set; online when the user has logged in; else offline (no network)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, *, config: dict | None, resume: bool, **_: Any):
        import wandb

        run_id = read_ids(run_dir).get(self.name) if resume else None
        self.run = wandb.init(
            project="lmforge",
            name=run_dir.name,
            dir=str(run_dir),
            mode=wandb_mode(),
            id=run_id or uuid.uuid4().hex[:8],
            resume="allow" if run_id else None,
            config=config or {},
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),  # lmforge prints its own log lines
        )
        if not run_id:
            _save_id(run_dir, self.name, self.run.id)
        self.run_dir = run_dir

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.run.save(str(path), base_path=str(self.run_dir), policy="now")
        self.run.finish()


FACTORIES: dict[str, Callable[..., Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


class Trackers:
    """The trackers of one run. Each failure warns once (through ``warn``) and drops that tracker."""

    def __init__(self, trackers: Iterable[Tracker], warn: Callable[[str], None]):
        self.active = list(trackers)
        self.warn = warn

    @classmethod
    def open(
        cls,
        names: Iterable[str | Tracker],
        run_dir: Path,
        *,
        warn: Callable[[str], None],
        config: dict | None = None,
        resume: bool = False,
        start_step: int = 0,
        mlflow_uri: str | None = None,
    ) -> Trackers:
        opened = []
        for name in names:
            if not isinstance(name, str):  # an already built tracker object
                opened.append(name)
                continue
            try:
                opened.append(
                    FACTORIES[name](
                        run_dir, config=config, resume=resume, start_step=start_step, mlflow_uri_=mlflow_uri
                    )
                )
            except ImportError as exc:
                extra = "" if name == "tensorboard" else " (pip install 'lmforge[trackers]')"
                warn(f"tracker {name} is not importable ({exc}); training goes on without it{extra}")
            except Exception as exc:  # a tracker must never stop training
                warn(
                    f"tracker {name} could not start ({type(exc).__name__}: {exc}); training goes on without it"
                )
        return cls(opened, warn)

    def _call(self, what: str, fn: Callable[[Tracker], None]) -> None:
        for tracker in list(self.active):
            try:
                fn(tracker)
            except Exception as exc:  # a tracker must never stop training
                self.active.remove(tracker)
                self.warn(
                    f"tracker {getattr(tracker, 'name', tracker)} failed while {what} "
                    f"({type(exc).__name__}: {exc}); training goes on without it"
                )

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = scalars(values)
        if numbers:
            self._call("logging", lambda t: t.log(step, numbers))

    def finish(self, run_dir: Path) -> None:
        artifacts = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
        self._call("finishing", lambda t: t.finish(artifacts))
        self.active = []
