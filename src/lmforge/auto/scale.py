"""``lmforge scale``: train a grid of model sizes x token budgets (or read finished run folders), fit the
scaling law (``plan.scaling``), plot it, and turn a compute or GPU-hour budget into a model, a token count,
a predicted loss and a plan.

A grid spec is YAML:

    config: base.yaml              # optional: the config every run starts from (default: the demo's)
    overrides: [train.lr=2e-3]     # optional: dotted overrides for every run
    models:                        # model keys (a preset and/or its fields), optional name and lr
      - {d_model: 64, n_layers: 2, n_heads: 2}
      - {preset: tiny, lr: 1e-3}
    tokens: [500K, 1M, 2M]         # token budgets: each model trains on each, its schedule ending there
    warmup_fraction: 0.05          # optional: warmup steps as a fraction of each run's steps

Each grid point trains in its own folder ``SCALE/runs/NAME``, with ``train.steps`` set so that the run ends
at its budget (the learning-rate schedule decays to that end), an evaluation only at the end and no text
samples. A finished folder (a validation loss at its last step) is read, not retrained; an interrupted one
resumes from its newest checkpoint, so re-running the command continues the grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.config import Config, ModelConfig, load_config, load_yaml, parse_number, suggest
from lmforge.errors import ConfigError, DataError
from lmforge.files import write_text_atomic
from lmforge.plan.scaling import Fit, fit_law, non_embedding_params

GRID_KEYS = ("config", "overrides", "models", "tokens", "warmup_fraction")
ENTRY_KEYS = ("name", "lr")  # the rest of a model entry are model.* keys
# What a grid run does unless the grid's overrides say otherwise: no samples, no trackers, no time limit.
RUN_DEFAULTS = ("train.sample_prompts=[]", "train.trackers=[]", "train.time_limit_minutes=0")


# -- the grid -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPoint:
    name: str
    overrides: tuple[str, ...]  # the model's and the budget's, after the grid's own
    tokens: int


@dataclass(frozen=True)
class Grid:
    path: Path
    config: Path | None
    overrides: tuple[str, ...]
    points: tuple[GridPoint, ...]

    def config_of(self, point: GridPoint, out_dir: Path | None = None) -> Config:
        extra = (f"train.out_dir={out_dir}",) if out_dir is not None else ()
        return _load(self.config, (*RUN_DEFAULTS, *self.overrides, *point.overrides, *extra))


def _load(config: Path | None, overrides) -> Config:
    if config is not None:
        return load_config(config, overrides)
    from lmforge.train.demo import demo_config

    return demo_config(list(overrides))


def tokens_label(tokens: float) -> str:
    """1500000 -> '1.5M' (names of run folders)."""
    for suffix, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.4g}{suffix}"
    return str(int(tokens))


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid spec; every problem is named with the file and the entry, before any run."""
    path = Path(path)
    data = load_yaml(path)
    problems = [f"unknown key '{k}'{suggest(str(k), GRID_KEYS)}" for k in data if k not in GRID_KEYS]
    config = data.get("config")
    if config is not None:
        config = (path.parent / str(config)).resolve()
        if not config.is_file():
            problems.append(f"config: {config} not found")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        problems.append("overrides: must be a list of dotted overrides such as train.lr=2e-3")
        overrides = []
    models, budgets = data.get("models"), data.get("tokens")
    if not isinstance(models, list) or not models:
        problems.append("models: must be a non-empty list, e.g. [{d_model: 64, n_layers: 2, n_heads: 2}]")
        models = []
    if not isinstance(budgets, list) or not budgets:
        problems.append("tokens: must be a non-empty list of token budgets, e.g. [500K, 1M, 2M]")
        budgets = []
    tokens = []
    for i, value in enumerate(budgets):
        try:
            count = int(parse_number(str(value)))
        except ValueError:
            count = 0
        if count <= 0:
            problems.append(f"tokens[{i}]={value!r} is not a positive token count (examples: 500K, 2M, 1e9)")
        tokens.append(count)
    warmup = data.get("warmup_fraction")
    if warmup is not None and not (isinstance(warmup, int | float) and 0 <= warmup < 1):
        problems.append(f"warmup_fraction={warmup!r} must be a number in [0, 1)")
    if problems:
        raise ConfigError(f"{path}: invalid scaling grid:\n  " + "\n  ".join(problems))
    overrides = tuple(overrides)
    try:
        base = _load(config, (*RUN_DEFAULTS, *overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: the base config: {exc}") from None
    step_tokens = base.train.global_batch_tokens or base.train.micro_batch * base.train.seq_len
    points, names = [], set()
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: models[{i}] must be a mapping of model keys or a preset name")
        keys = [f"model.{k}={json.dumps(v)}" for k, v in entry.items() if k not in ENTRY_KEYS]
        if "lr" in entry:
            keys.append(f"train.lr={entry['lr']}")
        try:
            model = _load(config, (*RUN_DEFAULTS, *overrides, *keys)).model
        except ConfigError as exc:
            raise ConfigError(f"{path}: models[{i}]: {exc}") from None
        name = str(entry.get("name") or f"d{model.d_model}-l{model.n_layers}")
        for count in tokens:
            steps = max(1, math.ceil(count / step_tokens))
            run_keys = [f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}"]
            if warmup is not None:
                run_keys.append(f"train.warmup_steps={int(warmup * steps)}")
            point = GridPoint(f"{name}-{tokens_label(count)}", (*keys, *run_keys), count)
            if point.name in names:
                raise ConfigError(f"{path}: models[{i}]: run name {point.name!r} twice (give entries a name)")
            names.add(point.name)
            points.append(point)
    return Grid(path=path, config=config, overrides=overrides, points=tuple(points))


# -- run folders ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPoint:
    """One finished run as the law sees it."""

    run_dir: Path
    params: int  # N: non-embedding parameters
    total_params: int
    tokens: int  # D: tokens trained on
    loss: float  # the final validation loss
    model: ModelConfig

    def to_dict(self) -> dict:
        return {
            "run": str(self.run_dir),
            "N": self.params,
            "total_params": self.total_params,
            "D": self.tokens,
            "val_loss": self.loss,
            "d_model": self.model.d_model,
            "n_layers": self.model.n_layers,
        }


def read_run(run_dir: str | Path) -> RunPoint | None:
    """The run's N, D and final validation loss; None when the folder holds no finished run (no
    config.yaml yet, or no validation loss at its last step)."""
    from lmforge.model.info import count_params
    from lmforge.train.metrics import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return None
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as exc:
        raise DataError(f"{run_dir}/config.yaml: {exc}") from None
    finals = [r for r in read_metrics(run_dir) if "val_loss" in r and r.get("step") == cfg.train.steps]
    if not finals:
        return None
    last = finals[-1]
    if "tokens" not in last or not math.isfinite(last["val_loss"]):
        raise DataError(
            f"{run_dir}/metrics.jsonl: the final validation record has no tokens or no finite loss"
        )
    return RunPoint(
        run_dir=run_dir,
        params=non_embedding_params(cfg.model),
        total_params=count_params(cfg.model),
        tokens=int(last["tokens"]),
        loss=float(last["val_loss"]),
        model=cfg.model,
    )


def run_grid(
    grid: Grid, scale_dir: Path, *, cache_dir: str | Path | None = None, log=print
) -> list[RunPoint]:
    """Train every grid point not finished yet (resuming interrupted ones), in order; the points' results."""
    from lmforge.train.loop import train

    out = []
    for index, point in enumerate(grid.points, 1):
        run_dir = scale_dir / "runs" / point.name
        found = read_run(run_dir)
        if found is None:
            log(f"[{index}/{len(grid.points)}] training {point.name} ({tokens_label(point.tokens)} tokens)")
            cfg = grid.config_of(point, run_dir)
            train(cfg, resume="auto", cache_dir=cache_dir or scale_dir / "cache", progress=False)
            found = read_run(run_dir)
            if found is None:
                raise DataError(f"{run_dir}: the run stopped before its last step (re-run to continue it)")
        else:
            log(f"[{index}/{len(grid.points)}] {point.name}: finished, val loss {found.loss:.4f}")
        out.append(found)
    return out


def read_runs(folders: list[str | Path]) -> list[RunPoint]:
    """Finished runs from run folders, or from scale folders (their runs/*)."""
    out = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder")
        candidates = sorted((folder / "runs").iterdir()) if (folder / "runs").is_dir() else [folder]
        found = [p for p in (read_run(c) for c in candidates) if p is not None]
        if not found:
            raise DataError(f"{folder}: no finished run (a config.yaml and a final validation loss)")
        out += found
    return out


# -- the result -----------------------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    runs: list[RunPoint]
    fit: Fit
    scale_dir: Path
    files: list[Path] = field(default_factory=list)
    recommendation: dict | None = None

    def to_dict(self) -> dict:
        return {
            **self.fit.to_dict(),
            "run_folders": [r.to_dict() for r in self.runs],
            "recommendation": self.recommendation,
        }


def fit_runs(runs: list[RunPoint], *, bootstrap: int, seed: int) -> Fit:
    return fit_law(
        [r.params for r in runs],
        [r.tokens for r in runs],
        [r.loss for r in runs],
        bootstrap=bootstrap,
        seed=seed,
    )


def scale(
    grid_path: str | Path | None,
    scale_dir: str | Path,
    *,
    run_folders: list[str | Path] = (),
    bootstrap: int = 200,
    seed: int = 0,
    budget=None,
    cache_dir: str | Path | None = None,
    log=print,
) -> ScaleResult:
    """Train (or continue) the grid in ``scale_dir``, add any other finished ``run_folders``, fit the law,
    write fit.json, fit.md and the plots there, and recommend a model for ``budget`` (a ``Budget``)."""
    from lmforge.auto.scale_report import check_budget, plot_fit, recommend, render_table

    if budget is not None:
        check_budget(budget)  # a mistyped GPU fails now, not after the grid has trained
    scale_dir = Path(scale_dir)
    runs = []
    if grid_path is not None:
        grid = load_grid(grid_path)
        scale_dir.mkdir(parents=True, exist_ok=True)
        runs += run_grid(grid, scale_dir, cache_dir=cache_dir, log=log)
    runs += read_runs(list(run_folders))
    if not runs:
        raise ConfigError("nothing to fit: give a grid spec or run folders")
    scale_dir.mkdir(parents=True, exist_ok=True)
    fit = fit_runs(runs, bootstrap=bootstrap, seed=seed)
    result = ScaleResult(runs=runs, fit=fit, scale_dir=scale_dir)
    if budget is not None:
        base = runs[int(np.argmax([r.params for r in runs]))].model
        result.recommendation = recommend(fit, budget, base)
    result.files.append(plot_fit(fit, runs, scale_dir / "scaling.png", budget=result.recommendation))
    write_text_atomic(scale_dir / "fit.json", json.dumps(result.to_dict(), indent=2) + "\n")
    write_text_atomic(scale_dir / "fit.md", render_table(result) + "\n")
    result.files[:0] = [scale_dir / "fit.json", scale_dir / "fit.md"]
    return result
