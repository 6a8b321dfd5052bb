"""Documents -> token shards + ``meta.json``, in three resumable stages.

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

import hashlib
import itertools
import json
import multiprocessing
import os
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig, load_config
from lmforge.data.clean import STAGES, Cleaner
from lmforge.data.sources import SourceStats, expand_sources, read_documents
from lmforge.data.storage import is_remote
from lmforge.data.tokenizer import (
    Tokenizer,
    is_trained_kind,
    iter_sample,
    load_tokenizer,
    tiktoken_encoding,
    train_tokenizer,
)
from lmforge.errors import DataError
from lmforge.files import write_text_atomic

FORMAT = "lmforge-shards-v1"
CHUNK_DOCS = 256  # at most this many documents per task sent to a worker
CHUNK_CHARS = 100_000  # or this many characters: small tasks keep every worker busy to the end
KEPT_HEADER = struct.Struct("<?Q")  # a kept.bin record: is it a validation document, UTF-8 length
CHECK_EVERY = 100  # with tiktoken: check one document in this many against tokenizers
TIKTOKEN_SAMPLE_CHARS = 100_000  # kept text on which tiktoken must match tokenizers before it is used
# Settings that change the shards; the rest (workers, ...) only change how fast they are written.
RECIPE_FIELDS = (
    "tokenizer", "vocab_size", "text_field", "val_fraction", "seed", "min_chars", "max_chars",
    "max_repeated_line_fraction", "dedup", "near_dedup", "near_dedup_threshold", "scrub_pii",
    "text_chunk_chars", "shard_tokens", "tokenizer_train_chars",
)  # fmt: skip


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable ({exc}); delete the folder and prepare it again") from None


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_prepared(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a complete prepared dataset (meta.json and every shard at full size)."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        return all(
            (out / shard["file"]).stat().st_size == shard["tokens"] * itemsize
            for split in meta["splits"].values()
            for shard in split["shards"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_data(
    cfg: DataConfig, sources: list[str], out_dir: str | Path, *, progress: bool = True, strict: bool = False
) -> dict:
    """Prepare ``sources`` into ``out_dir`` and return its meta (see the module docstring). (Long by choice:
    the stages run in the order the module docstring lists, each a few lines, with resumption checks.)"""
    sources = [str(s) for s in sources]
    if is_remote(out_dir) or any(is_remote(s) for s in sources):  # object storage: data/remote.py
        from lmforge.data.remote import prepare_remote

        return prepare_remote(
            cfg,
            sources,
            out_dir,
            prepare=prepare_data,
            recipe_fields=RECIPE_FIELDS,
            progress=progress,
            strict=strict,
        )
    out = Path(out_dir)
    recipe = {"sources": sources, **{name: getattr(cfg, name) for name in RECIPE_FIELDS}}
    wanted = None if is_trained_kind(cfg.tokenizer) else load_tokenizer(cfg.tokenizer)
    if (out / "meta.json").exists():
        meta = read_json(out / "meta.json")
        _check_same(out, meta.get("recipe", {}), meta.get("tokenizer_fingerprint"), recipe, wanted)
        if not is_prepared(out):
            raise DataError(
                f"{out}: meta.json is there but shards are missing or truncated; delete the folder"
            )
        return meta
    if not sources:
        raise DataError("no data sources given (pass files, folders or globs, or set data.sources)")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "recipe.json").exists():
        old = read_json(out / "recipe.json")
        old_fp = read_tokenizer_fingerprint(out)
        _check_same(out, old, old_fp, recipe, wanted)
    else:
        write_json(out / "recipe.json", recipe)

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
            tokenizer.save(out / "tokenizer.json")
        tokenizer = load_tokenizer(out / "tokenizer.json")
        head = iter_sample((text for _, text in _kept(out)), TIKTOKEN_SAMPLE_CHARS)
        use_tiktoken = choose_encoder(cfg, tokenizer, list(head))
        documents = _kept(out, staged["forced_val"])
        splits = _tokenize(
            cfg, out, tokenizer, documents, use_tiktoken, forced_val=staged["forced_val"], progress=progress
        )
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
    for name in ("kept.bin", "progress.json", "staged.json", "recipe.json"):
        (out / name).unlink(missing_ok=True)
    return meta


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
    """A prepared dataset folder: its ``meta.json`` (splits, tokenizer) and cleaning ``report.json``."""

    out: Path | str  # a URL for object storage
    meta: dict
    report: dict


def prepare_from_arguments(
    items: Sequence[str], out_dir: str | Path, *, progress: bool = True, strict: bool = False
) -> PreparedData:
    """Prepare a dataset from the data verb's arguments (see ``split_arguments``); sources default to the
    config's ``data.sources``."""
    config, sources, overrides = split_arguments(items)
    cfg = load_config(config, overrides)
    meta = prepare_data(
        cfg.data, sources or list(cfg.data.sources), out_dir, progress=progress, strict=strict
    )
    if is_remote(out_dir):
        from lmforge.data.remote import read_json_at

        return PreparedData(
            out=str(out_dir), meta=meta, report=read_json_at(out_dir, "report.json", cfg.data)
        )
    return PreparedData(out=Path(out_dir), meta=meta, report=read_json(Path(out_dir) / "report.json"))


def read_tokenizer_fingerprint(out: Path) -> str | None:
    return load_tokenizer(out / "tokenizer.json").fingerprint if (out / "tokenizer.json").exists() else None


def _check_same(out: Path, old: dict, old_fp: str | None, new: dict, wanted: Tokenizer | None) -> None:
    """Refuse to reuse a folder prepared (or being prepared) with another tokenizer or other settings."""
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


def _split_score(key: bytes, seed: int) -> float:
    h = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, "little") / 2**64


def _stage_documents(
    cfg: DataConfig, sources: list[str], out: Path, *, progress: bool, strict: bool
) -> Iterator[tuple[str, str]]:
    """Read and clean the sources, yielding each kept document as (split, text) while writing kept.bin;
    at the end write report.json and staged.json (or raise, naming the stage that removed everything)."""
    from tqdm import tqdm

    inside_out = out.resolve()  # an output folder inside a source folder is not an input
    paths = [p for p in expand_sources(sources) if inside_out not in p.resolve().parents]
    stats = SourceStats()
    cleaner = Cleaner(cfg)
    counts = {"train": 0, "val": 0}
    lowest = (2.0, -1)  # the lowest split score and its document index: val's member of last resort
    tmp = out / "kept.bin.tmp"
    docs = read_documents(
        paths, text_field=cfg.text_field, chunk_chars=cfg.text_chunk_chars, stats=stats, strict=strict
    )
    with (
        open(tmp, "wb") as f,
        tqdm(desc="clean", unit="doc", disable=not progress, mininterval=1.0) as bar,
    ):
        for doc in docs:
            bar.update(1)
            kept = cleaner(doc.text)
            if kept is None:
                continue
            text, key = kept
            score = _split_score(key, cfg.seed)
            split = "val" if score < cfg.val_fraction else "train"
            index = counts["train"] + counts["val"]
            lowest = min(lowest, (score, index))
            counts[split] += 1
            data = text.encode("utf-8")
            f.write(KEPT_HEADER.pack(split == "val", len(data)) + data)
            yield split, text
    report = {"sources": stats.as_dict(), **cleaner.report.as_dict()}
    write_json(out / "report.json", report)
    kept_docs = counts["train"] + counts["val"]
    if kept_docs == 0:
        tmp.unlink()
        raise DataError(_empty_message(report, sources))
    # A tiny corpus can draw no validation document at all; then the lowest-scoring one goes there.
    forced_val = lowest[1] if cfg.val_fraction > 0 and counts["val"] == 0 and kept_docs >= 2 else None
    os.replace(tmp, out / "kept.bin")
    write_json(out / "staged.json", {"counts": counts, "forced_val": forced_val})


def _empty_message(report: dict, sources: list[str]) -> str:
    src = report["sources"]
    if report["stages"]["read"]["docs_in"] == 0:
        return (
            f"no documents were read from {', '.join(sources)} ({src['files']} inputs, "
            f"{src['binary_skipped']} binary files skipped, {src['malformed_records']} malformed records)"
        )
    for name in STAGES:
        stage = report["stages"][name]
        if stage["docs_in"] > 0 and stage["docs_out"] == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in report["filter_reasons"].items())
            hint = f" ({reasons})" if name == "filter" and reasons else ""
            return (
                f"the '{name}' stage removed all {stage['docs_in']} documents{hint}; "
                f"relax its settings (data.min_chars, data.max_chars, ...)"
            )
    return "no document was kept"  # pragma: no cover - every removal is one of the stages


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


class DocumentEncoder:
    """Documents -> id arrays ending in end-of-text, through ``tokenizers`` or, where it gives exactly the
    same ids, ``tiktoken``. One document at a time, single-threaded: the parallelism is the processes.
    Every ``CHECK_EVERY``-th document encoded by tiktoken is checked against ``tokenizers`` as well."""

    def __init__(self, tokenizer_path: str, use_tiktoken: bool):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.fast = tiktoken_encoding(self.tokenizer, []) if use_tiktoken else None
        self.count = 0

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            if self.fast is None:
                ids = self.tokenizer.encode(text)
            else:
                ids = self.fast.encode_ordinary(text)
                if self.count % CHECK_EVERY == 0 and ids != self.tokenizer.encode(text):
                    raise DataError(
                        f"tiktoken and tokenizers disagree on a document starting {text[:60]!r}; "
                        f"set data.encoder=tokenizers"
                    )
            self.count += 1
            row = np.empty(len(ids) + 1, dtype=np.uint32)
            row[:-1] = ids
            row[-1] = self.tokenizer.eot_id
            out.append(row)
        return out


_worker_encoder: DocumentEncoder | None = None


def _init_worker(tokenizer_path: str, use_tiktoken: bool) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(tokenizer_path, use_tiktoken)


def _encode_chunk(chunk: tuple[list[str], list[str]]) -> tuple[list[str], list[np.ndarray]]:
    assert _worker_encoder is not None
    splits, texts = chunk
    return splits, _worker_encoder(texts)


def choose_encoder(cfg: DataConfig, tokenizer: Tokenizer, sample: list[str]) -> bool:
    """True when tiktoken encodes exactly like the tokenizer on ``sample`` (the first kept documents)."""
    return cfg.encoder == "auto" and tokenizer.tiktoken_encoder(sample) is not None


class ShardWriter:
    """Appends documents to ``{split}_{index:05d}.bin``; a shard is renamed from ``.tmp`` once full."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int, done: list[dict]):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.done = done
        self.file = None
        self.tokens = self.docs = 0

    def add(self, ids: np.ndarray) -> bool:
        """Write one document's ids (separator included); True when this closed a shard."""
        if self.file is None:
            self.file = open(self._path(".tmp"), "wb")
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)
        self.docs += 1
        if self.tokens >= self.shard_tokens:
            self.close()
            return True
        return False

    def _path(self, suffix: str = "") -> Path:
        return self.out / f"{self.split}_{len(self.done):05d}.bin{suffix}"

    def close(self) -> None:
        if self.file is None:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(self._path(".tmp"), self._path())
        self.done.append({"file": self._path().name, "tokens": self.tokens, "docs": self.docs})
        self.tokens = self.docs = 0


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
