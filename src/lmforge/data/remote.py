"""Prepared datasets in object storage: prepare from remote sources or into a remote ``--out``, tell whether a
URL holds a complete prepared dataset, and keep a local copy of its small files for a run to read.

Writing to a URL prepares into a local staging folder first (resumable like any preparation), adds each
shard's SHA-256 to ``meta.json``, then uploads the folder with ``meta.json`` last: a prefix without
``meta.json`` is not a dataset, so a half-finished upload never looks complete. Remote sources are downloaded
to the cache (``data.cache_dir``) and read from there.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.storage import Storage, fetch_sources, is_remote, join, remove_tree, sha256_file, url_key
from lmforge.errors import DataError
from lmforge.files import write_text_atomic

META = "meta.json"
SMALL_FILES = ("tokenizer.json", "report.json")  # copied beside meta.json for a run (report.json optional)


def storage_for(cfg: DataConfig) -> Storage:
    return Storage(cfg.storage_options, retries=cfg.retries)


def cache_root(cfg: DataConfig, fallback: str | Path | None = None) -> Path:
    """``data.cache_dir``, else ``fallback`` (the CLI's user cache), else a folder in the temporary directory."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if fallback is not None:
        return Path(fallback) / "remote"
    return Path(tempfile.gettempdir()) / "lmforge-remote"


def read_meta(url: str, storage: Storage) -> dict:
    try:
        return json.loads(storage.read_bytes(join(url, META)))
    except json.JSONDecodeError as exc:
        raise DataError(f"{join(url, META)}: not valid JSON ({exc.msg}); prepare it again") from None


def is_prepared_url(url: str, storage: Storage) -> bool:
    """True when ``url`` holds ``meta.json`` and every shard it lists at full size (one listing call)."""
    objects = storage.sizes(url)
    if join(url, META) not in objects:
        return False
    meta = read_meta(url, storage)
    itemsize = np.dtype(meta["dtype"]).itemsize
    return all(
        objects.get(join(url, shard["file"])) == shard["tokens"] * itemsize
        for split in meta["splits"].values()
        for shard in split["shards"]
    )


def read_json_at(where: str | Path, name: str, cfg: DataConfig) -> dict:
    """``name`` (report.json, meta.json) of a prepared folder, local or at a URL."""
    if is_remote(where):
        return json.loads(storage_for(cfg).read_bytes(join(str(where), name)))
    return json.loads((Path(where) / name).read_text(encoding="utf-8"))


def local_copy(url: str, storage: Storage, root: Path) -> Path:
    """The local folder standing for the dataset at ``url``: ``meta.json``, ``tokenizer.json`` and
    ``report.json`` fresh from the store, and the shards the streaming reader caches there. Cached shards are
    dropped when the remote ``meta.json`` changed (the dataset was prepared again)."""
    folder = root / "streams" / url_key(url)
    try:
        meta_text = storage.read_bytes(join(url, META)).decode("utf-8")
    except DataError as exc:
        if "no such" in str(exc):
            raise DataError(
                f"{url}: not a prepared dataset (no {META}); prepare it with `lmforge data prepare ... --out {url}`"
            ) from None
        raise
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / META
    if old.is_file() and old.read_text(encoding="utf-8") != meta_text:
        for path in folder.glob("*.bin"):
            path.unlink(missing_ok=True)
    for name in SMALL_FILES:
        if name == "report.json" and not storage.exists(join(url, name)):
            continue
        write_text_atomic(folder / name, storage.read_bytes(join(url, name)).decode("utf-8"))
    write_text_atomic(old, meta_text)
    return folder


def add_checksums(folder: Path) -> dict:
    """Record each shard's SHA-256 in ``folder/meta.json`` (the streaming reader checks downloads against it)."""
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    for split in meta["splits"].values():
        for shard in split["shards"]:
            shard.setdefault("sha256", sha256_file(folder / shard["file"]))
    write_text_atomic(folder / META, json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def prepare_remote(
    cfg: DataConfig,
    sources: list[str],
    out: str | Path,
    *,
    prepare: Callable[..., dict],
    recipe_fields: tuple[str, ...],
    recipe_added: dict,
    progress: bool,
    strict: bool,
) -> dict:
    """``prepare`` (``data.prepare.prepare_data``) with remote sources and/or a remote ``out`` (see the module
    docstring). Preparing again into a complete remote ``out`` is a no-op when the recipe is the same."""
    storage = storage_for(cfg)
    root = cache_root(cfg)
    if not is_remote(out):
        local_sources = fetch_sources(storage, sources, root / "sources")
        return prepare(cfg, local_sources, out, progress=progress, strict=strict)
    url = str(out).rstrip("/")
    recipe = {"sources": sources, **{name: getattr(cfg, name) for name in recipe_fields}}
    if storage.exists(join(url, META)):
        meta = read_meta(url, storage)
        old = {**recipe_added, **meta.get("recipe", {})}
        changed = [k for k in recipe if old.get(k) != recipe[k]]
        if changed:
            what = "; ".join(f"{k}: {old.get(k)!r} -> {recipe[k]!r}" for k in changed)
            raise DataError(
                f"{url} was prepared with different settings ({what}); use another --out or delete it"
            )
        return meta
    storage.check_writable(url)  # a missing bucket or a denied write: said now, not after the preparation
    local_sources = fetch_sources(storage, sources, root / "sources")
    staging = root / "staging" / url_key(url)
    meta = prepare(cfg, local_sources, staging, progress=progress, strict=strict)
    # the published meta.json names the sources as given, not their local copies
    meta = publish(staging, url, storage, sources=sources, recipe=recipe)
    remove_tree(staging)
    return meta


def publish(folder: Path, url: str, storage: Storage, **meta_updates) -> dict:
    """Upload the prepared ``folder`` to ``url``: shards and small files first, then ``meta.json`` (with each
    shard's SHA-256 and ``meta_updates``), so the prefix looks complete only once it is."""
    meta = {**add_checksums(folder), **meta_updates}
    published = write_text_atomic(
        folder.with_name(folder.name + "-meta.json"), json.dumps(meta, indent=2, ensure_ascii=False)
    )
    try:
        storage.upload_folder(folder, url, exclude=(META,))
        storage.upload(published, join(url, META))
    finally:
        published.unlink()
    return meta
