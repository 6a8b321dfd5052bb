"""A task is a JSONL file plus a small YAML spec: its kind, which fields to read, the prompt, few-shot
examples, stop strings, the generation budget. Specs for the shared evaluation sets ship with the package
and are found by name (their data files under a data folder); any other spec is found by its path (its
relative data paths resolve against the spec's folder).

A spec, e.g. ``flores-zh-en.yaml``::

    kind: translation           # summarization | translation | qa | classification | multiple_choice | completion
    data: eval/flores200_devtest_zh_en.jsonl
    prompt: "Chinese: {zh}\\nEnglish:"   # str.format over the record ({answers[0]} indexes a list)
    answer: " {en}"             # how a few-shot example's answer follows its prompt
    references: en              # the field with the reference: a string or a list of strings
    document: zh                # the field cut from the left when a prompt is longer than the context
    language: en                # of the references: zh selects Chinese tokenisation in the metrics
    # language_field: lang      # or each record's own language (summarization, qa: scores per language too)
    fewshot: {k: 0, data: null, seed: 1234}   # data: a separate file; null: the same file minus the item
    stop: ["\\n"]
    max_new_tokens: 128
    chat: false
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lmforge.errors import ConfigError, DataError
from lmforge.files import jsonl_records

GENERATIVE = ("summarization", "translation", "qa", "classification")
KINDS = (*GENERATIVE, "multiple_choice", "completion")
SPEC_KEYS = {
    "name", "kind", "data", "prompt", "answer", "references", "document", "language", "labels",
    "fewshot", "stop", "max_new_tokens", "chat", "language_field",
}  # fmt: skip
FEWSHOT_KEYS = {"k", "data", "seed"}


@dataclass(frozen=True, kw_only=True)
class FewShot:
    k: int = 0
    data: Path | None = None  # None: drawn from the task's own file, the item itself excluded
    seed: int = 1234


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One task, its paths resolved."""

    name: str
    kind: str
    data: Path
    source: Path  # the spec file
    prompt: str = ""
    answer: str = ""
    references: str = ""
    document: str | None = None
    language: str = "en"
    language_field: str | None = (
        None  # a field naming each item's language (scores are also given per language)
    )
    labels: dict[str, str] = field(default_factory=dict)  # classification: reference value -> label word
    fewshot: FewShot = FewShot()
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 64
    chat: bool = False

    @property
    def fields(self) -> list[str]:
        """Record fields the prompt, the answer and the references read."""
        names = template_fields(self.prompt) + template_fields(self.answer)
        if self.references:
            names.append(self.references)
        if self.document:
            names.append(self.document)
        if self.language_field:
            names.append(self.language_field)
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "data": str(self.data),
            "spec": str(self.source),
            "prompt": self.prompt,
            "answer": self.answer,
            "references": self.references,
            "document": self.document,
            "language": self.language,
            "language_field": self.language_field,
            "labels": dict(self.labels),
            "fewshot": {
                "k": self.fewshot.k,
                "data": None if self.fewshot.data is None else str(self.fewshot.data),
                "seed": self.fewshot.seed,
            },
            "stop": list(self.stop),
            "max_new_tokens": self.max_new_tokens,
            "chat": self.chat,
        }


def template_fields(template: str) -> list[str]:
    """The record fields a str.format template reads ('answers' for '{answers[0]}')."""
    out = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            out.append(name.split("[")[0].split(".")[0])
    return out


def render(template: str, record: dict, where: str) -> str:
    try:
        return template.format_map(record)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DataError(
            f"{where}: cannot fill the template {template!r} ({type(exc).__name__}: {exc})"
        ) from None


# -- finding and reading specs ----------------------------------------------------------------------------


def shipped_specs() -> dict[str, Path]:
    """The specs in the package, by name (``flores-zh-en`` -> .../specs/flores-zh-en.yaml)."""
    folder = resources.files("lmforge.infer.tasks") / "specs"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_task(task: str | Path, data_dir: str | Path | None = None) -> TaskSpec:
    """A spec by name (a shipped one; its data under ``data_dir``) or by the path of a YAML file."""
    text = str(task)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_spec(text)
    known = shipped_specs()
    if text not in known:
        raise ConfigError(
            f"unknown task {text!r}: known tasks are {', '.join(sorted(known))}; or give the path of a "
            f"task spec (.yaml)"
        )
    if data_dir is None:
        raise ConfigError(
            f"task {text!r} reads its data from the shared data folder: give --data-dir DIR "
            f"(or set LMFORGE_DATA) to the folder holding eval/"
        )
    return load_spec(known[text], data_root=Path(data_dir))


def load_spec(path: str | Path, *, data_root: Path | None = None) -> TaskSpec:
    """Read and check a spec; relative data paths resolve against ``data_root`` (shipped specs) or the
    spec's folder. Every problem is listed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such task spec")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task spec is a mapping (kind:, data:, prompt:, ...)")
    root = data_root if data_root is not None else path.parent
    problems = [
        f"unknown key {k!r} (known: {', '.join(sorted(SPEC_KEYS))})" for k in raw if k not in SPEC_KEYS
    ]
    kind = raw.get("kind")
    if kind not in KINDS:
        problems.append(f"kind={kind!r} must be one of {', '.join(KINDS)}")
    if not isinstance(raw.get("data"), str):
        problems.append("data: the task's JSONL file is required")
    if kind in GENERATIVE:
        for key in ("prompt", "references"):
            if not isinstance(raw.get(key), str) or not raw.get(key):
                problems.append(f"{key}: required for a {kind} task")
    if kind == "classification" and not raw.get("labels"):
        problems.append("labels: a classification task maps reference values to label words")
    fewshot_raw = raw.get("fewshot") or {}
    if not isinstance(fewshot_raw, dict):
        problems.append("fewshot: a mapping with k, data, seed")
        fewshot_raw = {}
    problems += [f"fewshot.{k}: unknown key" for k in fewshot_raw if k not in FEWSHOT_KEYS]
    stop = raw.get("stop", ["\n"])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        problems.append(f"stop={stop!r} must be a list of non-empty strings")
        stop = []
    max_new = raw.get("max_new_tokens", 64)
    if not isinstance(max_new, int) or max_new < 1:
        problems.append(f"max_new_tokens={max_new!r} must be an integer >= 1")
    k = fewshot_raw.get("k", 0)
    if not isinstance(k, int) or k < 0:
        problems.append(f"fewshot.k={k!r} must be an integer >= 0")
    if problems:
        raise ConfigError(f"{path}: invalid task spec:\n  " + "\n  ".join(problems))
    fewshot_data = fewshot_raw.get("data")
    labels = {str(key): str(value) for key, value in (raw.get("labels") or {}).items()}
    return TaskSpec(
        name=str(raw.get("name") or path.stem),
        kind=kind,
        data=root / raw["data"],
        source=path,
        prompt=raw.get("prompt", ""),
        answer=raw.get("answer", ""),
        references=raw.get("references", ""),
        document=raw.get("document"),
        language=str(raw.get("language", "en")),
        language_field=raw.get("language_field"),
        labels=labels,
        fewshot=FewShot(
            k=k,
            data=None if fewshot_data is None else root / fewshot_data,
            seed=int(fewshot_raw.get("seed", 1234)),
        ),
        stop=tuple(stop),
        max_new_tokens=max_new,
        chat=bool(raw.get("chat", False)),
    )


# -- reading items ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    record: dict
    where: str  # file:line

    def language(self, spec: TaskSpec) -> str:
        return str(self.record[spec.language_field]) if spec.language_field else spec.language

    def references(self, spec: TaskSpec) -> list[str]:
        value = self.record[spec.references]
        if spec.kind == "classification":
            return [spec.labels.get(str(value), str(value))]
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
        raise DataError(f"{self.where}: field {spec.references!r} must be a string or a list of strings")


def read_items(spec: TaskSpec, path: Path | None = None, limit: int | None = None) -> list[Item]:
    """The records of the task's file (or ``path``, e.g. the few-shot file), each checked for the fields the
    spec reads: a missing one names file:line and the fields found."""
    path = path or spec.data
    needed = spec.fields
    items = []
    for record, where in jsonl_records(path, f"data file of task {spec.name!r}"):
        if limit is not None and len(items) >= limit:
            break
        missing = [name for name in needed if name not in record]
        if missing:
            raise DataError(
                f"{where}: no field {', '.join(repr(m) for m in missing)} for task {spec.name!r} "
                f"(found: {', '.join(sorted(record))})"
            )
        items.append(Item(record, where))
    if not items:
        raise DataError(f"{path}: no items")
    return items


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """How to run a task; None leaves the spec's value."""

    num_fewshot: int | None = None
    limit: int | None = None
    chat: bool | None = None
    batch_size: int = 16
    temperature: float = 0.0  # greedy
    seed: int = 0  # sampling seed (only used when temperature > 0)
    max_new_tokens: int | None = None


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict  # metric -> value, with <metric>_stderr where one exists, n, truncated
    config: dict  # the spec and the options, as run
    samples: list[dict] = field(default_factory=list)  # per item: prompt, prediction, references, scores

    def to_dict(self, samples: bool = True) -> dict:
        out = {"kind": self.kind, "metrics": self.metrics, "config": self.config}
        if samples:
            out["samples"] = self.samples
        return out
