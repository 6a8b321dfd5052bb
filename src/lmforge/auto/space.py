"""Search spaces for ``lmforge sweep``: ``KEY=KIND(ARGS)`` entries over any config key, checked against the
config's own dataclasses before a trial starts.

    train.lr=loguniform(1e-4,3e-2)      a float, log-uniform between the bounds
    train.weight_decay=uniform(0,0.2)   a float, uniform
    train.warmup_steps=int(0,500)       an integer, bounds included (int(0,500,50): steps of 50)
    train.micro_batch=logint(4,64)      an integer, log-uniform
    model.n_layers=choice(2,4,8)        one of the values (numbers, true/false, strings)

A ``--space`` argument holds one entry, several separated by ``;``, or names a YAML file mapping each key to
its ``KIND(ARGS)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.config import Config, coerce, load_yaml, suggest
from lmforge.errors import ConfigError

KINDS = ("uniform", "loguniform", "int", "logint", "choice")
USAGE = "uniform(a,b), loguniform(a,b), int(a,b[,step]), logint(a,b), choice(v1,v2,...)"
# Keys the sweep itself sets for every trial.
RESERVED = ("train.out_dir",)

_ENTRY = re.compile(r"^\s*(?P<key>[^=\s]+)\s*=\s*(?P<kind>[A-Za-z_]\w*)\s*\((?P<args>.*)\)\s*$", re.S)


@dataclass(frozen=True)
class Param:
    """One searched config key and how its values are drawn."""

    key: str  # dotted config key, e.g. "train.lr"; also the Optuna parameter name
    kind: Literal["uniform", "loguniform", "int", "logint", "choice"]
    spec: str  # the entry as the user wrote it, for messages
    low: float = 0.0
    high: float = 0.0
    step: int | None = None
    choices: tuple = ()

    @property
    def log(self) -> bool:
        return self.kind in ("loguniform", "logint")

    def suggest(self, trial) -> Any:
        """Draw this parameter's value for an Optuna ``trial``."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind in ("int", "logint"):
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def field_type(key: str, spec: str) -> Any:
    """The annotated type of the dotted config ``key`` (``model.moe.top_k`` included); unknown keys are
    errors with a "did you mean"."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--space {spec!r}: {key!r} must be a dotted config key such as train.lr")
    cls: Any = Config
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            where = ".".join(parts[:depth]) or "config"
            what = "section" if depth == 0 else "key"
            raise ConfigError(
                f"--space {spec!r}: unknown config {what} '{'.'.join(parts[: depth + 1])}'"
                f"{suggest(part, names)} (the keys of {where}: {', '.join(names)})"
            )
        tp = typing.get_type_hints(cls)[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--space {spec!r}: '{'.'.join(parts[: depth + 1])}' has no keys below it")
            cls = tp
    return tp


def _numeric_kind(tp: Any) -> str | None:
    """ "int", "float" or None (not a number) for a field type, looking through ``X | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
    if typing.get_origin(tp) is Literal or len(args) != 1:
        return None
    return {int: "int", float: "float"}.get(args[0])


def _number(text: str, spec: str) -> float:
    try:
        value = float(yaml.safe_load(text)) if text.strip() else math.nan
    except (ValueError, TypeError, yaml.YAMLError):
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--space {spec!r}: {text.strip()!r} is not a finite number")
    return value


def parse_entry(spec: str) -> Param:
    """One ``KEY=KIND(ARGS)`` entry -> a checked ``Param`` (a ConfigError names the entry otherwise)."""
    match = _ENTRY.match(spec)
    if match is None:
        raise ConfigError(
            f"--space {spec!r}: expected KEY=KIND(ARGS), e.g. train.lr=loguniform(1e-4,3e-2); kinds: {USAGE}"
        )
    key, kind, raw = match["key"], match["kind"], match["args"]
    if kind not in KINDS:
        raise ConfigError(f"--space {spec!r}: unknown kind '{kind}'{suggest(kind, KINDS)}; kinds: {USAGE}")
    if key in RESERVED:
        raise ConfigError(
            f"--space {spec!r}: {key} is set by the sweep (each trial runs in SWEEP/trials/NNNN)"
        )
    tp = field_type(key, spec)
    args = [a for a in raw.split(",")] if raw.strip() else []
    if kind == "choice":
        if not args:
            raise ConfigError(f"--space {spec!r}: choice() needs at least one value")
        values = []
        for text in args:
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text.strip()
            if not (value is None or isinstance(value, bool | int | float | str)):
                raise ConfigError(
                    f"--space {spec!r}: {text.strip()!r} is not a plain value (number, true/false, text)"
                )
            try:
                values.append(coerce(value, tp, key))
            except ConfigError as exc:
                raise ConfigError(f"--space {spec!r}: {exc}") from None
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--space {spec!r}: a value is listed twice")
        return Param(key=key, kind="choice", spec=spec, choices=tuple(values))
    numeric = _numeric_kind(tp)
    if numeric is None:
        raise ConfigError(f"--space {spec!r}: {key} is not a number; use choice(v1,v2,...)")
    if numeric == "int" and kind in ("uniform", "loguniform"):
        raise ConfigError(f"--space {spec!r}: {key} is an integer; use int(a,b) or logint(a,b)")
    wanted = 3 if kind == "int" else 2
    if not 2 <= len(args) <= wanted:
        shape = "int(a,b) or int(a,b,step)" if kind == "int" else f"{kind}(a,b)"
        raise ConfigError(f"--space {spec!r}: {kind} takes {shape}, got {len(args)} value(s)")
    low, high = (_number(a, spec) for a in args[:2])
    step = None
    if kind in ("int", "logint"):
        if not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"--space {spec!r}: {kind} bounds must be whole numbers")
        if len(args) == 3:
            step_value = _number(args[2], spec)
            if not step_value.is_integer() or step_value < 1:
                raise ConfigError(f"--space {spec!r}: the step must be a whole number >= 1")
            step = int(step_value)
    if not low < high:
        raise ConfigError(
            f"--space {spec!r}: the lower bound {args[0].strip()} must be below the upper {args[1].strip()}"
        )
    if kind in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"--space {spec!r}: {kind} needs a lower bound > 0 (got {args[0].strip()})")
    return Param(key=key, kind=kind, spec=spec, low=low, high=high, step=step)


def _entries(item: str) -> list[str]:
    """The entries of one ``--space`` argument: a YAML file of KEY: KIND(ARGS), or entries split at ';'."""
    if item.strip().endswith((".yaml", ".yml")) and "=" not in item:
        data = load_yaml(Path(item.strip()))
        return [f"{key}={value}" for key, value in data.items()]
    return [part for part in item.split(";") if part.strip()]


def parse_space(items: typing.Sequence[str]) -> list[Param]:
    """Every ``--space`` argument -> checked parameters, each key at most once."""
    params: list[Param] = []
    for item in items:
        for entry in _entries(item):
            param = parse_entry(entry.strip())
            if any(p.key == param.key for p in params):
                raise ConfigError(f"--space {param.spec!r}: {param.key} is searched twice")
            params.append(param)
    if not params:
        raise ConfigError(
            f"--space: nothing to search; give entries such as train.lr=loguniform(1e-4,3e-2) ({USAGE})"
        )
    return params


def with_values(data: dict, values: dict[str, Any]) -> dict:
    """A copy of plain config data with each dotted key set (nested sections copied, never shared)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for key, value in values.items():
        *sections, name = key.split(".")
        target = out
        for section in sections:
            child = target.get(section)
            target[section] = dict(child) if isinstance(child, dict) else {}
            target = target[section]
        target[name] = value
    return out
