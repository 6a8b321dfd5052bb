"""The data side of a run: prepare raw sources on demand, build the loader, and reject a config that
cannot train (vocabulary, context, batch size) before any weight is allocated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import Config, ModelConfig
from lmforge.data.storage import is_remote
from lmforge.errors import ConfigError, DataError
from lmforge.model.info import count_params
from lmforge.train.metrics import plain_log_lines

# ``{stdlib}`` in data.sources stands for the running interpreter's standard library (the demo's corpus).
PLACEHOLDERS = {"stdlib": sysconfig.get_paths()["stdlib"]}

# DataConfig fields that do not change what preparation writes (so they do not change the cache key).
_NOT_IN_KEY = (
    "prepared", "mixture", "workers", "document_mask", "storage_options", "cache_dir", "cache_gb", "read_ahead",
    "retries",
)  # fmt: skip


@dataclass
class RunData:
    config: Config  # with model.vocab_size resolved against the tokenizer
    loader: Any  # TokenLoader interface; None until build_loader when built from cfg.data
    tokenizer: Any | None
    tokenizer_path: str | None
    datasets: dict[str, float]  # prepared folder -> mixture weight (empty for an external loader)
    sources: list[str]
    report: dict | None  # the cleaning report of the (first) prepared folder
    stream: Any = None  # data.stream.StreamSettings when a prepared folder is a URL (streamed from storage)

    @property
    def parameters(self) -> int:
        return count_params(self.config.model)


def expand_sources(sources: list[str]) -> list[str]:
    return [s.format(**PLACEHOLDERS) if "{" in s else s for s in sources]


def _folder_stem(source: str) -> str:
    """A readable, shell-safe folder name for a source: its last path part without glob characters
    (``/usr/lib/python3.11/*.py`` -> ``python3.11``)."""
    plain = [part for part in Path(source).parts if not any(c in part for c in "*?[]{}")]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", plain[-1] if plain else "").strip("._")
    return name or "data"


def prepared_dir_for(cfg: Config, sources: list[str], cache_dir: str | Path | None) -> Path | str:
    """Where raw sources are prepared: ``data.prepared`` (a folder or a URL), else a cache folder keyed by
    sources and settings."""
    if cfg.data.prepared:
        return cfg.data.prepared if is_remote(cfg.data.prepared) else Path(cfg.data.prepared)
    settings = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _NOT_IN_KEY}
    settings["sources"] = [
        str(Path(s).expanduser().absolute()) if "*" not in s and not is_remote(s) else s for s in sources
    ]
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    stem = _folder_stem(sources[0])
    if cache_dir is None:
        return Path(cfg.train.out_dir) / "data" / f"{stem}-{key}"
    return Path(cache_dir) / "prepared" / f"{stem}-{key}"


def _as_prepared(name: str) -> str:
    """A prepared folder named by its ``meta.json`` stands for the folder."""
    if is_remote(name):
        return name[: -len("/meta.json")] if name.endswith("/meta.json") else name.rstrip("/")
    path = Path(name)
    return str(path.parent) if path.name == "meta.json" and path.is_file() else name


def prepared_datasets(cfg: Config, *, world, cache_dir: str | Path | None, progress: bool | None) -> tuple:
    """The prepared folders and their weights, preparing ``data.sources`` first when they are not prepared.

    A prepared folder (``meta.json`` from ``lmforge data prepare``) is used as prepared data wherever it is
    named: in ``data.mixture``, ``data.prepared`` or among ``data.sources`` (several prepared sources are
    weighted by their training tokens, as raw sources read together would be)."""
    import torch.distributed as dist

    from lmforge.data.prepare import prepare_data

    def problem(name: str | Path) -> str | None:
        """Why ``name`` is not a complete prepared folder, or None when it is one."""
        if is_remote(name):
            from lmforge.data.remote import is_prepared_url, storage_for

            return None if is_prepared_url(str(name), storage_for(cfg.data)) else "no meta.json"
        from lmforge.data.prepare import prepared_problem

        return prepared_problem(name)

    def is_prepared(name: str | Path) -> bool:
        return problem(name) is None

    if cfg.data.mixture:
        datasets = {_as_prepared(d): w for d, w in cfg.data.mixture.items()}
        missing = [(d, problem(d)) for d in datasets if not is_prepared(d)]
        if missing:
            name, why = missing[0]
            raise DataError(
                f"data.mixture names {name!r}, which is not a prepared folder ({why}); "
                "prepare it with `lmforge data prepare` or list raw files in data.sources"
            )
        return datasets, []
    sources = [_as_prepared(s) for s in expand_sources(list(cfg.data.sources))]
    ready = [s for s in sources if is_prepared(s)]
    if ready:
        raw = [s for s in sources if s not in ready]
        if raw:
            raise DataError(
                f"data.sources mixes a prepared folder ({ready[0]}) with raw data ({raw[0]}); prepare the raw "
                f"data with `lmforge data prepare {raw[0]} --out DIR data.tokenizer="
                f"{Path(ready[0]) / 'tokenizer.json'}` and name both folders in data.mixture"
            )
        if len(ready) == 1:
            return {ready[0]: 1.0}, []
        return {s: float(_train_tokens(s, cfg) or 1) for s in ready}, []
    if not sources and not cfg.data.prepared:
        raise ConfigError("no training data: set data.sources (raw files, folders, globs) or data.prepared")
    out = _as_prepared(str(prepared_dir_for(cfg, sources, cache_dir)))
    if not is_prepared(out):
        if not sources:
            raise DataError(
                f"data.prepared={str(out)!r} is not a prepared folder ({problem(out)}) and "
                "data.sources is empty"
            )
        if world.is_main:
            bar = sys.stderr.isatty() if progress is None else progress
            with plain_log_lines(None if bar else sys.stderr):  # no bar: a few plain lines instead
                prepare_data(cfg.data, sources, out, progress=bar)
        if world.distributed:
            dist.barrier()
    return {str(out): 1.0}, sources


def default_vocab_size(model: ModelConfig) -> int:
    from lmforge.config import PRESETS

    if model.preset in PRESETS:
        return PRESETS[model.preset].vocab_size
    return ModelConfig().vocab_size


def resolve_vocab(cfg: Config, data_vocab: int, tokenizer_name: str) -> Config:
    """The model takes the tokenizer's vocabulary unless ``model.vocab_size`` was set explicitly (then it
    must be at least as large)."""
    model_vocab = cfg.model.vocab_size
    if model_vocab == default_vocab_size(cfg.model):
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=data_vocab))
    if model_vocab < data_vocab:
        raise ConfigError(
            f"vocabulary mismatch: model.vocab_size={model_vocab} but the data's tokenizer ({tokenizer_name}) "
            f"has {data_vocab} ids; raise model.vocab_size to at least {data_vocab} or leave it unset"
        )
    return cfg


def check_shapes(cfg: Config, dataset_tokens: dict[str, int]) -> None:
    """Context against the model's positions, and one micro-batch against each dataset's size."""
    tc = cfg.train
    problems = []
    if tc.seq_len > cfg.model.max_seq_len:
        problems.append(
            f"train.seq_len={tc.seq_len} is longer than the model's positions, "
            f"model.max_seq_len={cfg.model.max_seq_len}; lower train.seq_len or raise model.max_seq_len"
        )
    needed = tc.micro_batch * (tc.seq_len + 1)
    for name, n_tokens in dataset_tokens.items():
        if n_tokens < needed:
            problems.append(
                f"one batch needs train.micro_batch x (train.seq_len + 1) = {tc.micro_batch} x {tc.seq_len + 1} = "
                f"{needed} tokens but the training split of {name} holds only {n_tokens}; "
                "lower train.micro_batch or train.seq_len, or add data"
            )
    if problems:
        raise ConfigError("this config cannot train:\n  " + "\n  ".join(problems))


def _train_tokens(prepared: str, cfg: Config) -> int | None:
    if is_remote(prepared):
        from lmforge.data.remote import read_json_at

        return int(read_json_at(prepared, "meta.json", cfg.data)["splits"]["train"]["tokens"])
    return train_split_tokens(prepared)


def train_split_tokens(prepared: str | Path) -> int | None:
    """Tokens in a prepared folder's training split, from its meta.json (None when not recorded)."""
    try:
        meta = json.loads((Path(prepared) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    splits = meta.get("splits")
    if isinstance(splits, dict) and isinstance(splits.get("train"), dict):
        tokens = splits["train"].get("tokens")
        return int(tokens) if tokens is not None else None
    for key in ("train_tokens", "n_train_tokens"):
        if key in meta:
            return int(meta[key])
    return None


def read_report(prepared: str | Path) -> dict | None:
    try:
        return json.loads((Path(prepared) / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def resolve_data(
    cfg: Config, *, loader, world, cache_dir: str | Path | None, progress: bool | None
) -> RunData:
    """Everything the loop needs from the data, with every check that can fail done before the model exists.

    A loader built from ``cfg.data`` is left to ``build_loader`` (``loader`` None), once the micro-batch is
    settled (``parallel.strategy: auto`` may shrink it)."""
    datasets: dict[str, float] = {}
    sources: list[str] = []
    folders: dict[str, Any] = {}
    stream = None
    if loader is None:
        from lmforge.data.tokenizer import load_tokenizer

        datasets, sources = prepared_datasets(cfg, world=world, cache_dir=cache_dir, progress=progress)
        folders = {d: d for d in datasets}  # URLs stand in by a local copy of their small files
        if any(is_remote(d) for d in datasets):
            from lmforge.data.remote import local_copy
            from lmforge.data.stream import StreamSettings

            stream = StreamSettings.from_config(cfg.data, cache_dir)
            folders = {
                d: local_copy(d, stream.storage, stream.cache_dir) if is_remote(d) else d for d in datasets
            }
        first = next(iter(datasets))
        tokenizer_path = str(Path(folders[first]) / "tokenizer.json")
        tokenizer = load_tokenizer(tokenizer_path)
        cfg = resolve_vocab(cfg, tokenizer.vocab_size, tokenizer_path)
        sizes = {d: n for d in datasets if (n := train_split_tokens(folders[d])) is not None}
        check_shapes(cfg, sizes)
    else:
        tokenizer_path = getattr(loader, "tokenizer_path", None)
        tokenizer = None
        if tokenizer_path:
            from lmforge.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path)
        cfg = resolve_vocab(cfg, loader.vocab_size, tokenizer_path or "the given loader")
        check_shapes(cfg, {})
    report = read_report(folders[next(iter(datasets))]) if datasets else None
    return RunData(cfg, loader, tokenizer, tokenizer_path, datasets, sources, report, stream)


def build_loader(data: RunData, cfg: Config, world):
    """The training stream over the prepared folders at ``cfg``'s micro-batch (one disjoint stream per rank)."""
    from lmforge.data.loader import TokenLoader

    return TokenLoader(
        data.datasets,
        split="train",
        seq_len=cfg.train.seq_len,
        batch_size=cfg.train.micro_batch,
        seed=cfg.train.seed,
        rank=world.dp_rank,  # tensor-parallel peers read the same stream
        world_size=world.dp_size,
        with_doc_ids=cfg.data.document_mask,
        stream=data.stream,
    )


def validation_batches(data: RunData, cfg: Config):
    """The validation batches of every prepared folder (a fresh iterable each call)."""
    from lmforge.data.loader import eval_batches

    for dataset in data.datasets:
        yield from eval_batches(
            dataset,
            seq_len=cfg.train.seq_len,
            batch_size=cfg.train.micro_batch,
            max_batches=cfg.train.eval_batches,
            with_doc_ids=cfg.data.document_mask,
            stream=data.stream,
        )
