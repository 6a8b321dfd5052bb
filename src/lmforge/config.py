"""Typed configuration: dataclasses built once at the boundary from YAML and dotted overrides, validated once.

A config file has one section per dataclass below (``model``, ``data``, ``train``, ``parallel``, ``eval``).
``model.preset`` names one of ``PRESETS`` (``lmforge.shapes``, with ``ModelConfig``); the other ``model`` keys
override it.
Overrides on the command line use dotted keys: ``train.lr=3e-4 model.n_layers=8``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.errors import ConfigError
from lmforge.files import write_text_atomic
from lmforge.shapes import PRESETS, ModelConfig, MoEConfig  # noqa: F401  the model section; re-exported for callers

TRACKERS = ("tensorboard", "mlflow", "wandb")  # train.trackers (train/trackers.py)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training text comes from and how it becomes token shards."""

    sources: list[str] = field(default_factory=list)  # raw files, folders or globs; prepared on demand
    prepared: str | None = None  # a folder written by `lmforge data prepare` (default: derived from out_dir)
    mixture: dict[str, float] = field(default_factory=dict)  # prepared folder -> weight
    tokenizer: str = "bpe"  # "bpe" (train byte-level BPE), "char", or a path to tokenizer.json / HF folder
    vocab_size: int = 4096
    text_field: str = "text"
    val_fraction: float = 0.01
    seed: int = 1234
    workers: int = 2
    min_chars: int = 1
    max_chars: int = 10_000_000
    max_repeated_line_fraction: float = 1.0
    dedup: bool = True
    near_dedup: bool = False
    near_dedup_threshold: float = 0.8
    scrub_pii: bool = False
    # Language identification (data/language.py, py3langid): keep documents whose language is one of these
    # ISO 639-1 codes ('und': undetermined); empty keeps all. language_id: identify and count without removing.
    languages: list[str] = field(default_factory=list)
    language_id: bool = False
    language_threshold: float = 0.0  # a document whose top language probability is lower is 'und'
    # Learned quality filter (data/quality.py, `lmforge data train-quality`): a safetensors model; documents
    # scoring below quality_threshold are removed (report.json keeps the histogram of scores)
    quality_model: str | None = None
    quality_threshold: float = 0.5
    document_mask: bool = False  # pass document boundaries to attention (no attending across documents)
    # text files: documents cut after blank lines (of ~text_chunk_chars), one per line, or one per file; any
    # document longer than max_chars is cut into pieces of at most max_chars (at line ends), never dropped
    split: Literal["blank", "lines", "file"] = "blank"
    # text and JSON inputs: a Python codec name (latin-1, gb18030, ...); a UTF-16/32 byte-order mark wins
    encoding: str = "utf-8"
    text_chunk_chars: int = 8192  # split=blank: documents of ~this size cut at blank lines (0: whole file)
    shard_tokens: int = 50_000_000  # tokens per shard file
    tokenizer_train_chars: int = 200_000_000  # characters of kept text a bpe/char tokenizer is trained on
    encoder: Literal["auto", "tokenizers"] = "auto"  # auto: tiktoken where it gives the very same ids
    # stream: one pass in input order in this process (tokenizing in `workers` processes); local: the
    # partitioned stages on `workers` local processes; ray: the same stages as Ray tasks (data/partitioned.py)
    executor: Literal["stream", "local", "ray"] = "stream"
    ray_address: str | None = None  # ray.init(address=...); None: a local Ray with `workers` CPUs
    worker_memory_mb: int = 1024  # partitioned stages: the partition count is derived from this bound
    # Object storage (s3://... and other fsspec URLs as sources, prepared folders or --out; docs/data.md):
    storage_options: dict[str, Any] = field(default_factory=dict)  # passed to fsspec (endpoint_url, key, ...)
    cache_dir: str | None = None  # local cache of streamed shards and staged files (None: the user cache)
    cache_gb: float = 20.0  # streamed shards of one split kept on local disk at most (oldest use goes first)
    read_ahead: int = 4  # streaming: download the shards of this many coming batches in the background
    retries: int = 5  # transient storage errors retried this many times, with exponential backoff

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.vocab_size < 2:
            out.append(f"data.vocab_size={self.vocab_size} must be >= 2")
        if self.workers < 1:
            out.append(f"data.workers={self.workers} must be >= 1")
        if not 0.0 < self.near_dedup_threshold <= 1.0:
            out.append(f"data.near_dedup_threshold={self.near_dedup_threshold} must be in (0, 1]")
        if not 0.0 < self.max_repeated_line_fraction <= 1.0:
            out.append(f"data.max_repeated_line_fraction={self.max_repeated_line_fraction} must be in (0, 1]")
        if not 0.0 <= self.language_threshold < 1.0:
            out.append(f"data.language_threshold={self.language_threshold} must be in [0, 1)")
        if not 0.0 <= self.quality_threshold <= 1.0:
            out.append(f"data.quality_threshold={self.quality_threshold} must be in [0, 1]")
        for code in self.languages:
            if not (isinstance(code, str) and code.isascii() and code.isalpha() and code.islower()):
                out.append(f"data.languages: {code!r} is not a lower-case ISO 639 code such as 'en' or 'zh'")
        if self.min_chars > self.max_chars:
            out.append(f"data.min_chars={self.min_chars} is larger than data.max_chars={self.max_chars}")
        for name, weight in self.mixture.items():
            if weight <= 0:
                out.append(f"data.mixture[{name!r}]={weight} must be > 0")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            out.append(
                f"data.encoding={self.encoding!r} is not a known encoding (utf-8, latin-1, gb18030, ...)"
            )
        if self.text_chunk_chars < 0:
            out.append(f"data.text_chunk_chars={self.text_chunk_chars} must be >= 0 (0: a document per file)")
        if self.worker_memory_mb < 1:
            out.append(f"data.worker_memory_mb={self.worker_memory_mb} must be >= 1")
        if self.cache_gb <= 0:
            out.append(f"data.cache_gb={self.cache_gb} must be > 0")
        for name in ("read_ahead", "retries"):
            if getattr(self, name) < 0:
                out.append(f"data.{name}={getattr(self, name)} must be >= 0")
        for name in ("shard_tokens", "tokenizer_train_chars"):
            if getattr(self, name) < 1:
                out.append(f"data.{name}={getattr(self, name)} must be >= 1")
        return out


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation loop."""

    out_dir: str = "runs/demo"
    # Continued pre-training: a fresh run starts from these weights (an lmforge run/checkpoint or a Hugging
    # Face folder) and takes the model's shape from it (the model section then only sets model.dropout).
    init_from: str | None = None
    steps: int = 1000
    seq_len: int = 128
    micro_batch: int = 8
    global_batch_tokens: int | None = None  # None: one micro-batch per process per step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 200
    keep_last: int = 3
    max_bad_steps: int = 5  # consecutive non-finite steps before rolling back to the last checkpoint
    spike_zscore: float = 6.0
    sample_every: int = 0  # 0: samples only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    sample_tokens: int = 200
    time_limit_minutes: float = 0.0  # 0: no limit; otherwise stop (with a checkpoint) after this long
    # Emissions of the energy train.energy measures: the grid of a region in plan.energy.GRID_INTENSITY, or
    # an intensity in g CO2eq/kWh (which wins), and the data centre's PUE (default: plan.energy.DEFAULT_PUE).
    energy_region: str = "world"
    grid_intensity: float | None = None
    pue: float = 1.2
    # Experiment trackers the run reports to (train/trackers.py): tensorboard, mlflow, wandb.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    mlflow_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else a file store in RUN/mlruns

    def problems(self) -> list[str]:
        out = []
        for name in self.trackers:
            if name not in TRACKERS:
                out.append(
                    f"train.trackers: unknown tracker '{name}'{suggest(name, TRACKERS)}; "
                    f"choose from {', '.join(TRACKERS)}"
                )
        for name in ("steps", "seq_len", "micro_batch", "log_every", "eval_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                out.append(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch_tokens is not None and self.global_batch_tokens < 1:
            out.append(f"train.global_batch_tokens={self.global_batch_tokens} must be >= 1")
        if self.lr <= 0:
            out.append(f"train.lr={self.lr} must be > 0")
        if self.min_lr < 0 or self.min_lr > self.lr:
            out.append(f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}]")
        if self.warmup_steps < 0:
            out.append(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            out.append(f"train.decay_fraction={self.decay_fraction} must be in [0, 1]")
        if self.grad_clip < 0:
            out.append(f"train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            out.append(f"train.beta1={self.beta1} and train.beta2={self.beta2} must be in [0, 1)")
        if self.max_bad_steps < 1:
            out.append(f"train.max_bad_steps={self.max_bad_steps} must be >= 1")
        if self.sample_prompts and self.sample_tokens < 1:
            out.append(
                f"train.sample_tokens={self.sample_tokens} must be >= 1 "
                f"(for no samples set train.sample_prompts=[])"
            )
        if self.pue < 1.0:
            out.append(f"train.pue={self.pue} must be >= 1 (facility energy / IT energy)")
        if self.grid_intensity is not None and self.grid_intensity < 0:
            out.append(f"train.grid_intensity={self.grid_intensity} must be >= 0 (g CO2eq/kWh)")
        return out


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model is spread over processes. Applied from outside the model by ``distributed.parallelize``."""

    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    cpu_offload: bool = False
    tp: int = 1  # tensor-parallel degree (second mesh dimension)
    ep: int = 1  # expert-parallel degree: the routed experts of each MoE layer spread over this many ranks
    backend: str = "auto"  # auto: nccl on CUDA, gloo otherwise
    world_size: int | None = None  # when set, must match the launcher's WORLD_SIZE
    timeout_s: float = 600.0  # a collective waiting longer than this on a lost peer ends the job
    device_memory_gib: float | None = None  # memory per process the planner plans for (None: the device's)

    def problems(self) -> list[str]:
        out = []
        if self.tp < 1:
            out.append(f"parallel.tp={self.tp} must be >= 1")
        if self.ep < 1:
            out.append(f"parallel.ep={self.ep} must be >= 1")
        if self.timeout_s <= 0:
            out.append(f"parallel.timeout_s={self.timeout_s} must be > 0")
        if self.world_size is not None and self.world_size < 1:
            out.append(f"parallel.world_size={self.world_size} must be >= 1")
        if self.device_memory_gib is not None and self.device_memory_gib <= 0:
            out.append(f"parallel.device_memory_gib={self.device_memory_gib} must be > 0")
        return out


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Evaluation tasks run inside training every ``every`` steps (0: never)."""

    every: int = 0
    tasks: list[str] = field(default_factory=list)  # multiple-choice JSONL files (HellaSwag format)
    limit: int = 200  # items per task

    def problems(self) -> list[str]:
        out = []
        if self.every < 0:
            out.append(f"eval.every={self.every} must be >= 0")
        if self.limit < 1:
            out.append(f"eval.limit={self.limit} must be >= 1")
        return out


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole run: what to train, on what, how, and where."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def problems(self) -> list[str]:
        out = self.model.problems() + self.data.problems() + self.train.problems()
        out += self.parallel.problems() + self.eval.problems()
        tp = self.parallel.tp
        if tp > 1:
            shares = {"model.n_heads": self.model.n_heads, "model.n_kv_heads": self.model.kv_heads}
            shares["model.ffn_hidden"] = self.model.hidden_dim
            uneven = [f"{key}={value}" for key, value in shares.items() if value % tp]
            if uneven:
                out.append(
                    f"parallel.tp={tp} must divide {', '.join(uneven)} (each rank holds whole heads and an "
                    "equal share of the feed-forward)"
                )
            if self.model.qk_norm:
                out.append(
                    f"parallel.tp={tp} with model.qk_norm=true is not supported: the q/k norm weights are shared "
                    "by heads on every rank, so their gradients would need summing over ranks; use parallel.tp=1"
                )
        ep, n_experts = self.parallel.ep, self.model.moe.n_experts
        if ep > 1 and n_experts == 0:
            out.append(
                f"parallel.ep={ep} needs a Mixture-of-Experts model: set model.moe.n_experts (a multiple of "
                f"{ep}) or parallel.ep=1"
            )
        elif ep > 1 and n_experts % ep:
            out.append(
                f"parallel.ep={ep} must divide model.moe.n_experts={n_experts} (each rank holds whole experts); "
                f"choose an ep that divides {n_experts}"
            )
        if ep > 1 and tp > 1:
            out.append(f"parallel.ep={ep} with parallel.tp={tp} is not supported: choose one of them")
        if self.train.seq_len > self.model.max_seq_len and self.model.position != "rope":
            out.append(
                f"train.seq_len={self.train.seq_len} is longer than model.max_seq_len={self.model.max_seq_len} "
                f"(the model's {self.model.position} positions stop there)"
            )
        return out


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with coercion and "did you mean" for unknown keys.


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when ``name`` is close to one of ``choices``, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}={value!r} is not a valid {_type_name(tp)}")
    if tp is Any:  # free-form values handed to a library as given (data.storage_options)
        return value
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{key}={value!r} must be one of {', '.join(repr(a) for a in args)}{suggest(str(value), map(str, args))}"
        )
    if origin is list:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {coerce(k, args[0], key): coerce(v, args[1], f"{key}[{k!r}]") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = parse_number(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():  # '4k' -> 4000, but '3.5' is not an integer
                return int(number)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(parse_number(value))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a programming error


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_number(text: str) -> float:
    """Parse '3e-4', '4M', '1T', '1_000' as numbers (suffixes are powers of 1000)."""
    text = text.strip().replace("_", "")
    if text and text[-1].lower() in _SUFFIXES:
        return float(text[:-1]) * _SUFFIXES[text[-1].lower()]
    return float(text)


def build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{suggest(str(key), names)}")
        kwargs[key] = coerce(value, hints[key], dotted)
    return cls(**kwargs)


def resolve_model_dict(model: dict) -> dict:
    """Expand ``model.preset`` into its values; explicit keys win over the preset's."""
    name = model.get("preset")
    if name is None:
        return model
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset model.preset={name!r}{suggest(str(name), PRESETS)}; known: {', '.join(PRESETS)}"
        )
    merged = dataclasses.asdict(PRESETS[name])
    for key, value in model.items():  # nested sections (model.moe) merge key by key
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def config_from_dict(data: dict) -> Config:
    """Build and validate a whole Config from plain data (a parsed YAML file with overrides applied)."""
    data = dict(data or {})
    if isinstance(data.get("model"), dict):
        data["model"] = resolve_model_dict(data["model"])
    cfg = build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    problems = cfg.problems()
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")  # one problem, one line
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, turning unreadable files into one clear ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply ``section.key=value`` overrides to plain config data; values are parsed as YAML scalars."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    sections = [f.name for f in dataclasses.fields(Config)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. model.n_layers=8)")
        section, *inner, name = parts
        if section not in sections:
            raise ConfigError(
                f"unknown config section '{section}' in override {item!r}{suggest(section, sections)}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        for depth, part in enumerate(inner):  # nested sections, e.g. model.moe.n_experts
            child = target.get(part)
            child = dict(child) if isinstance(child, dict) else ({} if child is None else child)
            if not isinstance(child, dict):
                raise ConfigError(
                    f"config key '{'.'.join([section, *inner[: depth + 1]])}' must be a mapping"
                )
            target[part] = child
            target = child
        target[name] = value
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The one entry point: YAML file (optional) + dotted overrides -> validated Config."""
    data = load_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
