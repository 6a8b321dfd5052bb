"""Object storage through ``fsspec``: ``s3://...`` (and other fsspec URLs) as sources, prepared folders and
``--out``.

S3 and S3-compatible stores need ``s3fs`` (``pip install lmforge[s3]``), imported only when a URL is used.
The endpoint and credentials come from the standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles), read by botocore itself, or from
``data.storage_options``, handed to fsspec as given (``endpoint_url``, ``key``, ``secret``, ``anon``, ...).

Transient errors (connection refused or reset, timeouts, throttling, server errors, a short read) are retried
``retries`` times with exponential backoff, each retry logged as a warning (what failed, why, retry i of N, the
wait), and only here: s3fs's and botocore's own retries are turned off (``QUIET_RETRIES``) so an unreachable
endpoint is reported within seconds, not after a minute of silent retries nested three deep. A missing bucket
or key, missing credentials or a denied request fail at once with a message that says which. A remote
``--out`` is checked by writing a small object there before any work (``check_writable``). Downloads go to a temporary name, are checked (size, and the
SHA-256 when one is known) and renamed, so a file under its final name is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import DataError
from lmforge.files import write_text_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")
COPY_BYTES = 4 << 20
MAX_BACKOFF_S = 30.0
# Exceptions from these packages are network trouble unless classified below (credentials, missing objects).
NETWORK_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs")
INSTALL_HINT = "pip install lmforge[s3]"
# One try per call below lmforge's own retries (``Storage.call``): botocore's (data.storage_options may set
# config_kwargs of its own) and s3fs's (its ``retries`` attribute, set on the file system).
QUIET_RETRIES: dict[str, dict[str, Any]] = {"s3": {"config_kwargs": {"retries": {"total_max_attempts": 1}}}}
QUIET_RETRIES["s3a"] = QUIET_RETRIES["s3"]
WRITE_PROBE = ".lmforge-write-check"  # written and removed under a remote --out before preparing into it
# What an object store says changes when an object is written again (S3: ETag, VersionId; GCS: generation).
VERSION_KEYS = ("VersionId", "version_id", "ETag", "etag", "generation", "mtime", "LastModified", "created")


def is_remote(name: str | Path) -> bool:
    """True for a URL fsspec resolves (``s3://bucket/key``, ``gs://...``, ``memory://...``), not a local path."""
    text = str(name)
    return "://" in text and not text.startswith("file://")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def url_key(url: str) -> str:
    """A short, stable, file-system-safe name for a URL (a cache sub-folder)."""
    tail = url.rstrip("/").rsplit("/", 1)[-1] or "data"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in tail)[:40]
    return f"{safe}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


class IncompleteRead(OSError):
    """A download that ended short or with other bytes than expected (retried like a network error)."""


class Storage:
    """Reads and writes URLs with retries. ``options`` go to ``fsspec.core.url_to_fs``; ``retries`` transient
    failures of one operation are retried after ``backoff_s``, doubling each time. ``retried`` counts them."""

    def __init__(self, options: dict[str, Any] | None = None, *, retries: int = 5, backoff_s: float = 0.5):
        self.options = dict(options or {})
        self.retries, self.backoff_s = retries, backoff_s
        self.retried = 0
        self._filesystems: dict[str, Any] = {}
        self._lock = threading.Lock()

    def fs(self, url: str) -> tuple[Any, str]:
        """The fsspec file system for ``url`` (one per protocol) and the path inside it."""
        protocol = url.split("://", 1)[0]
        try:
            import fsspec.core
        except ImportError:
            raise DataError(f"{url}: reading URLs needs fsspec and s3fs ({INSTALL_HINT})") from None
        with self._lock:
            if protocol not in self._filesystems:
                options = {**QUIET_RETRIES.get(protocol, {}), **self.options}
                try:
                    fs, _ = fsspec.core.url_to_fs(url, **options)
                except ImportError as exc:
                    raise DataError(
                        f"{url}: {protocol}:// needs an extra package ({INSTALL_HINT}): {exc}"
                    ) from None
                except TypeError as exc:  # an option the file system does not take
                    raise DataError(f"data.storage_options={self.options}: {exc}") from None
                if protocol in QUIET_RETRIES and hasattr(fs, "retries"):
                    fs.retries = 1  # s3fs: one try per call
                self._filesystems[protocol] = fs
            fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(url)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on transient errors (each retry logged); a permanent one (or the last transient
        one) as a DataError."""
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except DataError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise DataError(f"{what}: {explain(exc)}") from None
                if attempt == self.retries:
                    raise DataError(
                        f"{what}: still failing after {self.retries} retries in "
                        f"{time.monotonic() - started:.0f} s ({type(exc).__name__}: {exc}); check the endpoint "
                        "(AWS_ENDPOINT_URL or data.storage_options.endpoint_url) and the network"
                    ) from None
                self.retried += 1
                delay = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt)
                log.warning(
                    "%s: %s: %s; retry %d of %d in %.1f s",
                    what, type(exc).__name__, exc, attempt + 1, self.retries, delay,
                )  # fmt: skip
                time.sleep(min(MAX_BACKOFF_S, self.backoff_s * 2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    # -- reading ---------------------------------------------------------------------------------------------

    def exists(self, url: str) -> bool:
        fs, path = self.fs(url)
        return self.call(f"looking for {url}", lambda: fs.exists(path))

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.fs(url)
        return self.call(f"reading {url}", lambda: fs.cat_file(path))

    def sizes(self, url: str) -> dict[str, int]:
        """Every object under the prefix ``url`` (recursively) as {url: size}; an empty prefix gives {}."""
        fs, path = self.fs(url)
        protocol = url.split("://", 1)[0]
        found = self.call(f"listing {url}", lambda: fs.find(path, detail=True))
        return {f"{protocol}://{name}": int(info.get("size") or 0) for name, info in found.items()}

    def expand(self, url: str) -> dict[str, int]:
        """A URL, a prefix ("folder") or a glob -> {object URL: size}, sorted; matching nothing is an error."""
        return {name: int(info.get("size") or 0) for name, info in self.expand_info(url).items()}

    def expand_info(self, url: str) -> dict[str, dict]:
        """``expand`` with each object's listing entry (size, ETag, ...) instead of its size."""
        fs, path = self.fs(url)
        protocol = url.split("://", 1)[0]
        if any(c in path for c in "*?["):
            found = self.call(f"listing {url}", lambda: fs.glob(path, detail=True))
        elif self.call(f"reading {url}", lambda: fs.isfile(path)):
            found = {path: self.call(f"reading {url}", lambda: fs.info(path))}
        else:
            found = self.call(f"listing {url}", lambda: fs.find(path, detail=True))
        objects = {
            f"{protocol}://{name}": info
            for name, info in sorted(found.items())
            if info.get("type") != "directory" and not name.rsplit("/", 1)[-1].startswith(".")
        }
        if not objects:
            raise DataError(f"data source {url!r} matches no object (give an object, a prefix or a glob)")
        return objects

    def download(self, url: str, dest: Path, *, size: int | None = None, sha256: str | None = None) -> Path:
        """Copy ``url`` to ``dest`` through a temporary file, checking size and checksum, then rename."""
        fs, path = self.fs(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{threading.get_ident()}.tmp")

        def once() -> None:
            digest = hashlib.sha256() if sha256 else None
            written = 0
            with fs.open(path, "rb", block_size=COPY_BYTES) as src, open(tmp, "wb") as out:
                while block := src.read(COPY_BYTES):
                    out.write(block)
                    written += len(block)
                    if digest is not None:
                        digest.update(block)
            if size is not None and written != size:
                raise IncompleteRead(f"got {written} bytes, expected {size}")
            if digest is not None and digest.hexdigest() != sha256:
                raise IncompleteRead(f"SHA-256 {digest.hexdigest()[:16]}..., expected {sha256[:16]}...")

        try:
            self.call(f"downloading {url}", once)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # -- writing ---------------------------------------------------------------------------------------------

    def upload(self, local: Path, url: str) -> None:
        fs, path = self.fs(url)
        self.call(f"uploading {local} to {url}", lambda: fs.put_file(str(local), path))

    def upload_folder(self, local: Path, url: str, *, exclude: tuple[str, ...] = ()) -> None:
        """Upload every file under ``local`` to ``url`` but those named in ``exclude`` (relative paths)."""
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            name = path.relative_to(local).as_posix()
            if name not in exclude:
                self.upload(path, join(url, name))

    def remove(self, url: str) -> None:
        fs, path = self.fs(url)
        self.call(f"removing {url}", lambda: fs.rm_file(path))

    def check_writable(self, url: str) -> None:
        """Write and remove a small object under ``url``: a missing bucket, a denied write or an unreachable
        endpoint is reported before a preparation, not after it."""
        probe = join(url, WRITE_PROBE)
        fs, path = self.fs(probe)
        self.call(
            f"writing to {url} (--out)", lambda: fs.pipe_file(path, b"lmforge checks --out is writable\n")
        )
        self.remove(probe)


def is_transient(exc: BaseException) -> bool:
    """Network trouble worth another try, as opposed to a missing object, bad credentials or a bug."""
    if isinstance(exc, FileNotFoundError | PermissionError | NotADirectoryError | IsADirectoryError):
        return False
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError"):
        return False
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    return any(cls.__module__.split(".")[0] in NETWORK_MODULES for cls in type(exc).__mro__)


def explain(exc: BaseException) -> str:
    """A one-line reason a user can act on for a permanent storage error."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
            "data.storage_options.key/secret, or data.storage_options.anon=true for a public bucket"
        )
    if isinstance(exc, FileNotFoundError):
        detail = str(exc)
        if "bucket" in detail.lower():
            return f"no such bucket ({detail})"
        return f"no such object ({detail})"
    if isinstance(exc, PermissionError):
        return f"access denied ({exc}); check the credentials and the bucket's policy"
    return f"{name}: {exc}"


def object_version(info: dict) -> str | None:
    """What changes when an object is written again (its version id, ETag or modification time, as the
    store lists them), or None when the listing says none of these."""
    found = [f"{key}={info[key]}" for key in VERSION_KEYS if info.get(key)]
    return " ".join(found) if found else None


def fetch_sources(storage: Storage, sources: list[str], folder: Path) -> list[str]:
    """Download the remote ``sources`` (objects, prefixes, globs of text/JSONL/Parquet) under ``folder``,
    keeping their bucket/key layout (so kinds are still told by suffix); local sources pass through. A file
    already there is not downloaded again when the object has the same size and the same version (ETag,
    version id or modification time, recorded in ``folder/{key}.versions.json`` beside the copies): an object
    written again at the same size is fetched again. A store that lists no version is compared by size."""
    out = []
    for source in sources:
        if not is_remote(source):
            out.append(source)
            continue
        root = folder / url_key(source)
        manifest = folder / f"{url_key(source)}.versions.json"
        try:
            versions = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
        except (OSError, json.JSONDecodeError):
            versions = {}  # an unreadable record: every copy is checked again
        fresh = {}
        for url, info in storage.expand_info(source).items():
            dest = root / url.split("://", 1)[1]
            size, version = int(info.get("size") or 0), object_version(info)
            same = dest.is_file() and dest.stat().st_size == size and versions.get(url) == version
            if not same:
                storage.download(url, dest, size=size)
            fresh[url] = version
        manifest.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(manifest, json.dumps(fresh, indent=1, sort_keys=True))
        out.append(str(root))
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(COPY_BYTES):
            digest.update(block)
    return digest.hexdigest()


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
