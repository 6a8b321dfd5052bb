"""Documents -> token shards + ``meta.json``. With ``data.executor=stream`` (the default), three resumable
stages in one pass; with ``local`` or ``ray``, or as array tasks, the partitioned stages of
``data/partitioned.py`` (same documents, same tokens per document, shards in partition order).

1. ``stage``: read and clean the sources, assign each kept document to train or val (by a hash of its text
   and the seed, so a document and its exact copies always land in the same split), and write them to
   ``kept.bin`` (records of split, length, UTF-8 text) plus the cleaning ``report.json``.
2. ``tokenizer``: train a BPE or char tokenizer on the kept text, or load the configured one.
3. ``tokenize``: encode the kept documents in worker processes (in order) and append them, each followed by
   end-of-text, to ``{split}_{index:05d}.bin`` shards of ``uint16`` (``uint32`` for vocabularies > 65536).

Every file is written to ``*.tmp`` and renamed when complete; ``progress.json`` lists the finished shards,
so a rerun after a crash continues from the last one. ``meta.json`` is written last: a folder with it is
complete, and preparing it again is a no-op (or an error, if the settings or tokenizer differ).
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import shutil
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig, load_config
from lmforge.data.clean import Cleaner, empty_message
from lmforge.data.job import Task, prepare_partitioned
from lmforge.data.partitioned import PLAN
from lmforge.data.shards import (
    TIKTOKEN_SAMPLE_CHARS,
    DocumentEncoder,
    ShardWriter,
    choose_encoder,
    dtype_for,
    read_json,
    split_score,
    write_json,
)
from lmforge.data.sources import SourceStats, expand_sources, read_documents
from lmforge.data.storage import is_remote, sha256_file
from lmforge.data.tokenizer import (
    Tokenizer,
    is_trained_kind,
    iter_sample,
    load_tokenizer,
    train_tokenizer,
)
from lmforge.errors import DataError
from lmforge.files import write_text_atomic

# A few lines per preparation (start, cleaned, tokenizer, done): what a run without a progress bar shows.
log = logging.getLogger(__name__)
FORMAT = "lmforge-shards-v1"
CHUNK_DOCS = 256  # at most this many documents per task sent to a worker
CHUNK_CHARS = 100_000  # or this many characters: small tasks keep every worker busy to the end
KEPT_HEADER = struct.Struct("<?Q")  # a kept.bin record: is it a validation document, UTF-8 length
# Settings that change the shards; the rest (workers, ...) only change how fast they are written.
RECIPE_FIELDS = (
    "tokenizer", "vocab_size", "text_field", "val_fraction", "seed", "min_chars", "max_chars",
    "max_repeated_line_fraction", "dedup", "near_dedup", "near_dedup_threshold", "scrub_pii",
    "text_chunk_chars", "shard_tokens", "tokenizer_train_chars", "split",
    "encoding", "languages", "language_threshold", "quality_model", "quality_threshold",
)  # fmt: skip
# Recipe fields added after folders were prepared without them: the value those folders were prepared with.
RECIPE_ADDED = {
    "split": "blank", "encoding": "utf-8", "languages": [], "language_threshold": 0.0, "quality_model": None,
    "quality_threshold": 0.5,
}  # fmt: skip
LANGUAGES_FILE = "languages.bin"  # stage 1 with language identification: per kept document, its language


def prepared_problem(out_dir: str | Path, *, checksums: bool = False) -> str | None:
    """What keeps ``out_dir`` from being a complete prepared dataset (None when it is one): no meta.json,
    an unreadable one, or a shard that is missing or shorter/longer than meta.json says. ``checksums`` also
    reads every shard and compares its SHA-256 with the one meta.json records (``lmforge data verify``)."""
    out = Path(out_dir)
    if not (out / "meta.json").is_file():
        return "no meta.json"
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        shards = [shard for split in meta["splits"].values() for shard in split["shards"]]
        for shard in shards:
            path = out / shard["file"]
            if not path.is_file():
                return f"shard {shard['file']} is missing"
            size, expected = path.stat().st_size, shard["tokens"] * itemsize
            if size != expected:
                what = "truncated" if size < expected else "longer than meta.json says"
                return f"shard {shard['file']} is {what} ({size:,} bytes, meta.json says {expected:,})"
        for shard in shards if checksums else ():
            if "sha256" not in shard:
                return f"meta.json records no SHA-256 for shard {shard['file']} (prepared before checksums)"
            digest = sha256_file(out / shard["file"])
            if digest != shard["sha256"]:
                return (
                    f"shard {shard['file']} is damaged: its SHA-256 is {digest[:16]}..., meta.json records "
                    f"{shard['sha256'][:16]}... (same size: changed in place)"
                )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"meta.json is unreadable ({type(exc).__name__}: {exc})"
    return None


def is_prepared(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a complete prepared dataset (meta.json and every shard at full size)."""
    return prepared_problem(out_dir) is None


def prepare_data(
    cfg: DataConfig,
    sources: list[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
    strict: bool = False,
    task: Task | None = None,
) -> dict:
    """Prepare ``sources`` into ``out_dir`` and return its meta: in one stream (``data.executor=stream``,
    the module docstring) or as partitioned stages (``local``, ``ray``, or array ``task`` i of N, which
    runs its share of the first stage and returns its counts; ``data/partitioned.py``). Without ``task``,
    a folder where array tasks ran is merged, whatever the executor. Object storage
    URLs (sources or ``out_dir``) go through ``data/remote.py``, which stages them locally."""
    sources = [str(s) for s in sources]
    if is_remote(out_dir) or any(is_remote(s) for s in sources):  # object storage: data/remote.py
        if task is not None:
            raise DataError(
                "array tasks (--task-index/--tasks) need local sources and --out; "
                "copy the sources locally or run one prepare with data.executor=local or ray"
            )
        from lmforge.data.remote import prepare_remote

        return prepare_remote(
            cfg,
            sources,
            out_dir,
            prepare=prepare_data,
            recipe_fields=RECIPE_FIELDS,
            recipe_added=RECIPE_ADDED,
            progress=progress,
            strict=strict,
        )
    out = Path(out_dir)
    recipe = {"sources": sources, **{name: getattr(cfg, name) for name in RECIPE_FIELDS}}
    wanted = None if is_trained_kind(cfg.tokenizer) else load_tokenizer(cfg.tokenizer)
    if (out / "meta.json").exists():
        meta = read_json(out / "meta.json")
        _check_same(out, meta.get("recipe", {}), meta.get("tokenizer_fingerprint"), recipe, wanted)
        problem = prepared_problem(out)
        if problem is not None:
            raise DataError(f"{out}: meta.json is there but {problem}; delete the folder and prepare again")
        return meta
    if not sources:
        raise DataError("no data sources given (pass files, folders or globs, or set data.sources)")
    started = time.perf_counter()
    named = sources[0] + (f" and {len(sources) - 1} more" if len(sources) > 1 else "")
    log.info(f"data: preparing {named} into {out} (once: later runs reuse it)")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "recipe.json").exists():
        old = read_json(out / "recipe.json")
        old_fp = read_tokenizer_fingerprint(out)
        _check_same(out, old, old_fp, recipe, wanted)
    else:
        write_json(out / "recipe.json", recipe)

    # Array tasks leave their plan in out/work: the same command without --task-index merges their work,
    # whatever data.executor says (with `stream`, the merge runs on `data.workers` local processes).
    merge = task is None and (out / "work" / PLAN).exists()
    if merge and cfg.executor == "stream":
        log.info(f"data: merging the array tasks' work in {out / 'work'}")
    if task is not None or cfg.executor != "stream" or merge:
        paths = input_paths(sources, out)
        result = prepare_partitioned(
            cfg, paths, out, wanted=wanted, progress=progress, strict=strict, task=task
        )
        if task is not None:
            return result
        tokenizer, use_tiktoken, splits = result["tokenizer"], result["use_tiktoken"], result["splits"]
    else:
        tokenizer, use_tiktoken, splits = _prepare_stream(cfg, sources, out, wanted, progress, strict)
        if (out / LANGUAGES_FILE).exists():
            report = read_json(out / "report.json")
            report["language_tokens"] = tokens_by_language(out, splits, tokenizer)
            write_json(out / "report.json", report)
    meta = {
        "format": FORMAT,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer": "tokenizer.json",
        "dtype": dtype_for(tokenizer.vocab_size),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "encoder": "tiktoken" if use_tiktoken else "tokenizers",
        "documents": sum(s["docs"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "sources": sources,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "recipe": recipe,
    }
    write_json(out / "meta.json", meta)
    for name in ("kept.bin", "progress.json", "staged.json", "recipe.json", LANGUAGES_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    log.info(
        f"data: prepared {meta['documents']:,} documents, {meta['tokens']:,} tokens "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return meta


def _prepare_stream(
    cfg: DataConfig, sources: list[str], out: Path, wanted: Tokenizer | None, progress: bool, strict: bool
) -> tuple[Tokenizer, bool, dict]:
    """``data.executor=stream``: the stages of the module docstring in one pass over the sources."""
    if wanted is not None and not (out / "staged.json").exists():
        # The tokenizer is known: clean and tokenize in one pass, the workers busy while sources are read.
        if not (out / "tokenizer.json").exists():
            wanted.save(out / "tokenizer.json")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        stream = _stage_documents(cfg, sources, out, progress=False, strict=strict)  # one bar: tokenize
        head = list(_take_chars(stream, TIKTOKEN_SAMPLE_CHARS))
        use_tiktoken = choose_encoder(cfg, tokenizer, [text for _, text in head])
        documents = itertools.chain(head, stream)
        splits = _tokenize(cfg, out, tokenizer, documents, use_tiktoken, forced_val=None, progress=progress)
        staged = read_json(out / "staged.json")
        if staged["forced_val"] is not None:  # a tiny corpus drew no validation document: write it again
            documents = _kept(out, staged["forced_val"])
            splits = _tokenize(
                cfg,
                out,
                tokenizer,
                documents,
                use_tiktoken,
                forced_val=staged["forced_val"],
                progress=progress,
            )
    else:
        if not (out / "staged.json").exists():
            for _ in _stage_documents(cfg, sources, out, progress=progress, strict=strict):
                pass
        staged = read_json(out / "staged.json")
        if not (out / "tokenizer.json").exists():
            if wanted is not None:
                tokenizer = wanted
            else:
                sample = iter_sample((text for _, text in _kept(out)), cfg.tokenizer_train_chars)
                tokenizer = train_tokenizer(cfg.tokenizer, sample, cfg.vocab_size)
                log.info(f"data: trained a {cfg.tokenizer} tokenizer of {tokenizer.vocab_size:,} tokens")
            tokenizer.save(out / "tokenizer.json")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        head = iter_sample((text for _, text in _kept(out)), TIKTOKEN_SAMPLE_CHARS)
        use_tiktoken = choose_encoder(cfg, tokenizer, list(head))
        documents = _kept(out, staged["forced_val"])
        splits = _tokenize(
            cfg, out, tokenizer, documents, use_tiktoken, forced_val=staged["forced_val"], progress=progress
        )
    return tokenizer, use_tiktoken, splits


def split_arguments(items: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """``lmforge data prepare [CONFIG] [SOURCES...] [overrides]`` as (config, sources, overrides): a first
    item ending in .yaml/.yml (without '=') is the config; an item with '=' that is not an existing path is
    a dotted override; everything else is a source (file, folder or glob)."""
    items = list(items)
    config = items.pop(0) if items and items[0].endswith((".yaml", ".yml")) and "=" not in items[0] else None
    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    sources = [i for i in items if i not in overrides]
    return config, sources, overrides


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """A prepared dataset folder: its ``meta.json`` (splits, tokenizer) and cleaning ``report.json``; for an
    array task, only ``task`` (its counts) and empty ``meta``/``report``."""

    out: Path | str  # a URL for object storage
    meta: dict
    report: dict
    task: dict | None = None


def prepare_from_arguments(
    items: Sequence[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
    strict: bool = False,
    task: Task | None = None,
) -> PreparedData:
    """Prepare a dataset from the data verb's arguments (see ``split_arguments``); sources default to the
    config's ``data.sources``. With ``task``: run that array task's share (see ``prepare_data``)."""
    config, sources, overrides = split_arguments(items)
    cfg = load_config(config, overrides)
    sources = sources or list(cfg.data.sources)
    meta = prepare_data(cfg.data, sources, out_dir, progress=progress, strict=strict, task=task)
    if task is not None and "task" in meta:
        return PreparedData(out=Path(out_dir), meta={}, report={}, task=meta)
    if is_remote(out_dir):
        from lmforge.data.remote import read_json_at

        return PreparedData(
            out=str(out_dir), meta=meta, report=read_json_at(out_dir, "report.json", cfg.data)
        )
    return PreparedData(out=Path(out_dir), meta=meta, report=read_json(Path(out_dir) / "report.json"))


def write_slurm_script(items: Sequence[str], out_dir: str | Path, *, tasks: int, path: str | Path) -> Path:
    """An sbatch script for ``tasks`` array tasks of this preparation and the merge job after them
    (``bash SCRIPT submit`` submits both, the merge with ``--dependency=afterok``)."""
    import shlex

    config, _, overrides = split_arguments(items)
    cfg = load_config(config, overrides)  # fail now, not on the cluster
    if tasks < 1:
        raise DataError(f"--tasks={tasks} must be >= 1")
    args = " ".join(shlex.quote(str(i)) for i in items) + " --out " + shlex.quote(str(out_dir))
    script = f"""#!/bin/bash
#SBATCH --job-name=lmforge-prepare
#SBATCH --cpus-per-task=1
#SBATCH --mem={cfg.data.worker_memory_mb + 1024}M
# Written by `lmforge data prepare --slurm`. Submit with: bash {shlex.quote(str(path))} submit
# (array tasks 0..{tasks - 1} each read, clean and hash their share of the inputs; the merge job, which
# waits for all of them, deduplicates, tokenizes and writes meta.json. Rerunning continues where it stopped.)
set -euo pipefail
case "${{1:-task}}" in
  submit)
    array=$(sbatch --parsable --array=0-{tasks - 1} "$0" task)
    sbatch --dependency=afterok:"$array" "$0" merge ;;
  task)
    exec lmforge data prepare {args} --task-index "$SLURM_ARRAY_TASK_ID" --tasks {tasks} --no-progress ;;
  merge)
    exec lmforge data prepare {args} --no-progress ;;
esac
"""
    target = Path(path)
    write_text_atomic(target, script)
    target.chmod(0o755)
    return target


def read_tokenizer_fingerprint(out: Path) -> str | None:
    return load_tokenizer(out / "tokenizer.json").fingerprint if (out / "tokenizer.json").exists() else None


def _check_same(out: Path, old: dict, old_fp: str | None, new: dict, wanted: Tokenizer | None) -> None:
    """Refuse to reuse a folder prepared (or being prepared) with another tokenizer or other settings."""
    old = {**RECIPE_ADDED, **old}
    if wanted is not None and old_fp is not None and old_fp != wanted.fingerprint:
        raise DataError(
            f"{out} was prepared with a different tokenizer (fingerprint {old_fp}, requested "
            f"{wanted.fingerprint} from {new['tokenizer']}); mixing them would corrupt the data: "
            f"use another --out folder or delete this one"
        )
    if wanted is not None and old_fp is not None:
        old = {**old, "tokenizer": new["tokenizer"], "vocab_size": new["vocab_size"]}
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        what = "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        kind = "a different tokenizer" if {"tokenizer", "vocab_size"} & set(changed) else "different settings"
        raise DataError(
            f"{out} was prepared with {kind} ({what}); use another --out folder or delete this one"
        )


# -- stage 1: read, clean, split -----------------------------------------------------------------------------


def input_paths(sources: list[str], out: Path) -> list[Path]:
    """The inputs of ``sources``; an output folder inside a source folder is not an input."""
    inside_out = out.resolve()
    return [p for p in expand_sources(sources) if inside_out not in p.resolve().parents]


def _stage_documents(
    cfg: DataConfig, sources: list[str], out: Path, *, progress: bool, strict: bool
) -> Iterator[tuple[str, str]]:
    """Read and clean the sources, yielding each kept document as (split, text) while writing kept.bin;
    at the end write report.json and staged.json (or raise, naming the stage that removed everything)."""
    from tqdm import tqdm

    paths = input_paths(sources, out)
    stats = SourceStats()
    cleaner = Cleaner(cfg)
    counts = {"train": 0, "val": 0}
    lowest = (2.0, -1)  # the lowest split score and its document index: val's member of last resort
    read = 0
    tmp = out / "kept.bin.tmp"
    codes: dict[str, int] = {}  # language -> its number in languages.bin
    languages = bytearray()  # per kept document: uint16 language number
    docs = read_documents(
        paths,
        text_field=cfg.text_field,
        chunk_chars=cfg.text_chunk_chars,
        stats=stats,
        strict=strict,
        split=cfg.split,
        max_chars=cfg.max_chars,
        encoding=cfg.encoding,
    )
    with (
        open(tmp, "wb") as f,
        tqdm(desc="clean", unit="doc", disable=not progress, mininterval=1.0) as bar,
    ):
        for doc in docs:
            bar.update(1)
            read += 1
            kept = cleaner(doc.text)
            if kept is None:
                continue
            text, key = kept
            score = split_score(key, cfg.seed)
            split = "val" if score < cfg.val_fraction else "train"
            index = counts["train"] + counts["val"]
            lowest = min(lowest, (score, index))
            counts[split] += 1
            if cleaner.language is not None:
                languages += struct.pack("<H", codes.setdefault(cleaner.language, len(codes)))
            data = text.encode("utf-8")
            f.write(KEPT_HEADER.pack(split == "val", len(data)) + data)
            yield split, text
    report = {"sources": stats.as_dict(), **cleaner.report.as_dict()}
    write_json(out / "report.json", report)
    kept_docs = counts["train"] + counts["val"]
    if kept_docs == 0:
        tmp.unlink()
        raise DataError(empty_message(report, sources))
    # A tiny corpus can draw no validation document at all; then the lowest-scoring one goes there.
    forced_val = lowest[1] if cfg.val_fraction > 0 and counts["val"] == 0 and kept_docs >= 2 else None
    os.replace(tmp, out / "kept.bin")
    staged = {"counts": counts, "forced_val": forced_val}
    if cleaner.identifier is not None:
        (out / (LANGUAGES_FILE + ".tmp")).write_bytes(bytes(languages))
        os.replace(out / (LANGUAGES_FILE + ".tmp"), out / LANGUAGES_FILE)
        staged["languages"] = list(codes)
    write_json(out / "staged.json", staged)
    log.info(f"data: cleaned {read:,} documents, kept {kept_docs:,}")


def tokens_by_language(out: Path, splits: dict, tokenizer: Tokenizer) -> dict[str, dict[str, int]]:
    """Documents and tokens (end-of-text included) in the shards per language, from ``languages.bin`` and
    the end-of-text tokens that close each document in the shards; {} when they do not line up (a document
    whose text encodes to the end-of-text id)."""
    staged = read_json(out / "staged.json")
    names = staged["languages"]
    codes = np.frombuffer((out / LANGUAGES_FILE).read_bytes(), dtype="<u2")
    is_val = np.zeros(len(codes), dtype=bool)
    with open(out / "kept.bin", "rb") as f:  # the split of each kept document: the record headers
        for i in range(len(codes)):
            flag, length = KEPT_HEADER.unpack(f.read(KEPT_HEADER.size))
            is_val[i] = flag or i == staged["forced_val"]
            f.seek(length, os.SEEK_CUR)
    dtype = np.dtype(dtype_for(tokenizer.vocab_size))
    totals: dict[str, dict[str, int]] = {}
    for split, info in splits.items():
        ends = []  # per document of this split, the position after its end-of-text token
        offset = 0
        for shard in info["shards"]:
            ids = np.fromfile(out / shard["file"], dtype=dtype)
            ends.append(np.flatnonzero(ids == tokenizer.eot_id) + offset + 1)
            offset += len(ids)
        lengths = np.diff(np.concatenate([[0], *ends])) if ends else np.zeros(0, dtype=np.int64)
        mine = codes[is_val] if split == "val" else codes[~is_val]
        if len(lengths) != len(mine):
            log.warning(f"data: {split} shards do not line up with the documents; no tokens per language")
            return {}
        for number, name in enumerate(names):
            chosen = lengths[mine == number]
            if len(chosen):
                total = totals.setdefault(name, {"docs": 0, "tokens": 0})
                total["docs"] += len(chosen)
                total["tokens"] += int(chosen.sum())
    return dict(sorted(totals.items()))


def _kept(out: Path, forced_val: int | None = None) -> Iterator[tuple[str, str]]:
    """The kept documents of stage 1 in order, as (split, text); document ``forced_val`` goes to val."""
    with open(out / "kept.bin", "rb") as f:
        index = 0
        while header := f.read(KEPT_HEADER.size):
            is_val, length = KEPT_HEADER.unpack(header)
            yield "val" if is_val or index == forced_val else "train", f.read(length).decode("utf-8")
            index += 1


def _take_chars(documents: Iterator[tuple[str, str]], max_chars: int) -> Iterator[tuple[str, str]]:
    """Documents from the front of ``documents`` until ``max_chars`` characters (the rest stay in it)."""
    seen = 0
    while seen < max_chars:
        item = next(documents, None)
        if item is None:
            return
        yield item
        seen += len(item[1])


# -- stage 3: tokenize into shards -------------------------------------------------------------------------


_worker_encoder: DocumentEncoder | None = None


def _init_worker(tokenizer_path: str, use_tiktoken: bool) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(tokenizer_path, use_tiktoken)


def _encode_chunk(chunk: tuple[list[str], list[str]]) -> tuple[list[str], list[np.ndarray]]:
    assert _worker_encoder is not None
    splits, texts = chunk
    return splits, _worker_encoder(texts)


def _resume_state(out: Path, forced_val: int | None) -> dict[str, list[dict]]:
    """Finished shards from an interrupted run that routed documents the same way (the same ``forced_val``);
    anything else in the folder's shard files is deleted."""
    done = read_json(out / "progress.json") if (out / "progress.json").exists() else {}
    if done.get("forced_val") != forced_val:
        done = {}
    done = {split: done.get(split, []) for split in ("train", "val")}
    listed = {shard["file"] for shards in done.values() for shard in shards}
    for path in list(out.glob("train_*.bin*")) + list(out.glob("val_*.bin*")):
        if path.name not in listed:
            path.unlink()
    return done


def _tokenize(
    cfg: DataConfig,
    out: Path,
    tokenizer: Tokenizer,
    documents: Iterator[tuple[str, str]],
    use_tiktoken: bool,
    *,
    forced_val: int | None,
    progress: bool,
) -> dict:
    """Encode ``documents`` (split, text) in order into shards, skipping those already in finished shards."""
    from tqdm import tqdm

    done = _resume_state(out, forced_val)
    record = {"forced_val": forced_val, **done}  # progress.json: the shard lists are shared with ``done``
    dtype = dtype_for(tokenizer.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens, done[s]) for s in ("train", "val")}
    skip = {s: sum(shard["docs"] for shard in done[s]) for s in done}

    def pending() -> Iterator[tuple[str, str]]:
        seen = {"train": 0, "val": 0}
        for split, text in documents:
            seen[split] += 1
            if seen[split] > skip[split]:
                yield split, text

    def chunks() -> Iterator[tuple[list[str], list[str]]]:
        splits, texts, chars = [], [], 0
        for split, text in pending():
            splits.append(split)
            texts.append(text)
            chars += len(text)
            if len(texts) == CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield splits, texts
                splits, texts, chars = [], [], 0
        if texts:
            yield splits, texts

    work = chunks()
    pool = None
    init = (str(out / "tokenizer.json"), use_tiktoken)
    if cfg.workers > 1:
        # spawn: a fresh interpreter per worker, never a fork of a process whose tokenizer threads are running
        pool = multiprocessing.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=init)
        encoded = _bounded_map(pool, work, in_flight=4 * cfg.workers)
    else:
        encoder = DocumentEncoder(*init)
        encoded = ((splits, encoder(texts)) for splits, texts in work)
    try:
        with tqdm(initial=sum(skip.values()), desc="tokenize", unit="doc", disable=not progress) as bar:
            for splits, ids_list in encoded:
                for split, ids in zip(splits, ids_list):
                    if writers[split].add(ids):
                        write_json(out / "progress.json", record)
                bar.update(len(splits))
        for writer in writers.values():
            writer.close()
        write_json(out / "progress.json", record)
    finally:
        if pool is not None:
            pool.terminate()
    return {
        split: {
            "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        for split, shards in done.items()
    }


def _bounded_map(pool, chunks: Iterator, *, in_flight: int) -> Iterator:
    """``pool.imap`` in order, with at most ``in_flight`` chunks queued (imap would read the whole corpus
    into its queue when the workers are slower than the reader)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_encode_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()
