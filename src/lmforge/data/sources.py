"""Read raw files into documents, streaming: memory holds one block or one record at a time.

Supported: ``.txt``/``.md`` and other text files (cut into documents of about ``text_chunk_chars`` at blank
lines, or one document per file), ``.jsonl``/``.json`` (one document per record, from ``text_field``), all
of these also compressed as ``.gz`` or ``.zst``; ``.parquet``; Hugging Face ``datasets`` folders written by
``save_to_disk`` (``state.json`` + ``data-*.arrow``, or a ``dataset_dict.json`` of splits).

Bad input is counted in a ``SourceStats`` rather than crashing: a damaged file (truncated or corrupt gzip, zstd
or parquet, unreadable, vanished) is skipped and named, the documents read before the damage kept; binary
files are skipped, invalid UTF-8 is
replaced (U+FFFD), malformed JSON lines are reported as ``file:line`` and skipped (``strict`` aborts). A few
stray control bytes (crawl shards have them) do not make a file binary: in JSON Lines only the record that
holds one is lost (named in the report); in text the cleaner's ``normalize`` stage removes them.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lmforge.errors import DataError

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 20
SNIFF_BYTES = 8192
REPLACEMENT = "\ufffd"
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
# Never text, whatever their first bytes say.
BINARY_SUFFIXES = {
    ".bin", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".pkl", ".zip", ".tar", ".png", ".jpg", ".jpeg",
    ".gif", ".pdf", ".so", ".o", ".pyc", ".arrow", ".bz2", ".xz", ".7z", ".whl", ".exe", ".ttf", ".woff",
}  # fmt: skip
BLANK_LINES = re.compile(r"\r?\n(?:[ \t]*\r?\n)+")
MAY_GO_ON = re.compile(r"[ \t]*\r?\Z")  # after blank lines at the end of a block: the next may add to them
# Bytes that text never holds (all C0 controls but tab, LF, VT, FF, CR and ESC; and DEL). A file whose first
# block has more than this fraction of them is binary: random bytes have ~11%, text with stray bytes ~0.
ODD_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
BINARY_ODD_FRACTION = 0.05
MAX_REPORTED = 20  # malformed lines listed by name in the report; the rest are only counted


@dataclass(frozen=True)
class Document:
    text: str
    origin: str  # file, file:line or file#chunk


@dataclass
class SourceStats:
    """What reading found, besides documents. Filled in while the documents stream past."""

    files: int = 0
    bytes: int = 0
    binary_skipped: list[str] = field(default_factory=list)
    invalid_utf8_files: int = 0
    invalid_utf8_chars: int = 0  # U+FFFD characters introduced by decoding
    malformed_records: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    cut_documents: int = 0  # documents longer than data.max_chars, kept as pieces rather than dropped
    cut_pieces: int = 0  # the pieces they became
    damaged_files: list[str] = field(default_factory=list)  # "file: why; N documents before the damage kept"

    def damaged(self, path: Path, why: str, kept: int) -> None:
        message = f"{path}: {why}; {kept} documents before the damage kept"
        log.warning(f"data: skipped a damaged input: {message}")
        self.damaged_files.append(message)

    def malformed(self, where: str, why: str, strict: bool) -> None:
        message = f"{where}: {why}"
        if strict:
            raise DataError(message + " (--strict aborts on malformed records; drop --strict to skip them)")
        self.malformed_records += 1
        if len(self.malformed_examples) < MAX_REPORTED:
            self.malformed_examples.append(message)

    def as_dict(self) -> dict:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "binary_skipped": len(self.binary_skipped),
            "binary_files": self.binary_skipped[:MAX_REPORTED],
            "invalid_utf8_files": self.invalid_utf8_files,
            "invalid_utf8_chars": self.invalid_utf8_chars,
            "malformed_records": self.malformed_records,
            "malformed_examples": self.malformed_examples,
            "cut_documents": self.cut_documents,
            "cut_pieces": self.cut_pieces,
            "damaged_skipped": len(self.damaged_files),
            "damaged_files": self.damaged_files[:MAX_REPORTED],
        }


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, folders (recursively) and globs -> a sorted, de-duplicated list of inputs.

    A ``save_to_disk`` folder stays one input. A source that matches nothing, or that is a prepared folder
    (token shards, not text), is an error.
    """
    out: list[Path] = []
    for source in sources:
        path = Path(source)
        if is_prepared_folder(path):
            raise DataError(
                f"data source {source!r} is a prepared folder (meta.json from `lmforge data prepare`), not raw "
                f"text; train on it with data.prepared={source}"
            )
        if path.is_file() or is_arrow_dataset(path):
            matches = [path]
        elif path.is_dir():
            matches = _walk(path)
        elif glob.has_magic(source):
            matches = []
            for match in sorted(glob.glob(source, recursive=True)):
                p = Path(match)
                matches += [p] if p.is_file() or is_arrow_dataset(p) else _walk(p) if p.is_dir() else []
        else:
            matches = []
        if not matches:
            raise DataError(f"data source {source!r} matches no file (give a file, a folder or a glob)")
        out += matches
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _walk(folder: Path) -> list[Path]:
    """The inputs under a folder: hidden paths and prepared folders (earlier outputs) are not inputs."""
    out = []
    prepared = [p for p in folder.rglob("meta.json") if is_prepared_folder(p.parent)]
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if any(d.parent == p or d.parent in p.parents for d in prepared):
            continue
        if any(is_arrow_dataset(parent) for parent in p.relative_to(folder).parents if parent != Path(".")):
            continue
        if is_arrow_dataset(p):
            out.append(p)
        elif p.is_file() and not any(is_arrow_dataset(a) for a in p.parents):
            out.append(p)
    return out


def is_prepared_folder(path: Path) -> bool:
    """A folder written by ``lmforge data prepare`` (a meta.json that lists token splits)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("splits"), dict)


def is_arrow_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def read_documents(
    paths: list[Path],
    *,
    text_field: str,
    chunk_chars: int,
    stats: SourceStats,
    strict: bool = False,
    split: str = "blank",
    max_chars: int = 0,
    encoding: str = "utf-8",
) -> Iterator[Document]:
    """Stream the documents of every input in order. Text files are cut into documents by ``split`` (see
    ``_read_text``); a document (a piece of text, a record) longer than ``max_chars`` (0: no limit) is cut
    into pieces of at most ``max_chars``, at line ends where it can be, and counted in ``stats``. Text and
    JSON files are read as ``encoding``, unless they begin with a UTF-16 or UTF-32 byte-order mark."""
    for path in paths:
        stats.files += 1
        kept = 0
        try:
            for doc in _read_one(path, text_field, chunk_chars, stats, strict, split, max_chars, encoding):
                kept += 1
                yield doc
        except DamagedFile as exc:
            stats.damaged(path, str(exc), kept)
        except EOFError as exc:
            stats.damaged(path, f"truncated ({exc})", kept)
        except zlib.error as exc:
            stats.damaged(path, f"corrupt compressed data ({exc})", kept)
        except OSError as exc:
            what = "vanished" if isinstance(exc, FileNotFoundError) else "unreadable"
            stats.damaged(path, f"{what} ({exc.strerror or exc})", kept)


class DamagedFile(Exception):
    """An input that cannot be read to its end; ``read_documents`` skips it and names it in the report."""


def _read_one(
    path: Path,
    text_field: str,
    chunk_chars: int,
    stats: SourceStats,
    strict: bool,
    split: str,
    max_chars: int,
    encoding: str,
) -> Iterator[Document]:
    if path.is_dir():
        yield from _cut_long(_read_arrow_dataset(path, text_field, stats), max_chars, stats)
        return
    stats.bytes += path.stat().st_size
    kind = _kind(path)
    if kind == "binary":
        stats.binary_skipped.append(str(path))
    elif kind == "parquet":
        yield from _cut_long(_read_parquet(path, text_field, stats), max_chars, stats)
    elif kind == "json":
        yield from _cut_long(_read_json(path, text_field, stats, strict, encoding), max_chars, stats)
    else:
        yield from _read_text(path, chunk_chars, stats, split, max_chars, encoding)


def _cut_long(documents: Iterator[Document], max_chars: int, stats: SourceStats) -> Iterator[Document]:
    """Records longer than ``max_chars`` as pieces (``origin#piece``), cut after a line where one fits."""
    for doc in documents:
        if max_chars <= 0 or len(doc.text) <= max_chars:
            yield doc
            continue
        pieces = _text_pieces(iter([doc.text, ""]), 0, False, max_chars, stats)
        for i, piece in enumerate(pieces):
            yield Document(piece, f"{doc.origin}#{i}")


def _kind(path: Path) -> str:
    last = _base_suffix(path)
    if last == ".parquet":
        return "parquet"
    if last in JSON_SUFFIXES:
        return "json"
    if last in BINARY_SUFFIXES:
        return "binary"
    return "text"


def looks_binary(head: bytes) -> bool:
    """True for the first bytes of a binary file (many control bytes), false for text with a few stray ones."""
    if not head:
        return False
    odd = len(head) - len(head.translate(None, ODD_BYTES))
    return odd > BINARY_ODD_FRACTION * len(head)


# Byte-order marks that name an encoding whose text is not ASCII-compatible (longest first: the UTF-32 LE
# mark begins with the UTF-16 LE one).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def _open_binary(path: Path, encoding: str = "utf-8", stats: SourceStats | None = None) -> IO[bytes]:
    """The file's bytes (decompressed), as UTF-8: a file with a UTF-16/32 byte-order mark, or in another
    ``encoding`` than UTF-8, is transcoded while it is read."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        f = gzip.open(path, "rb")
    elif suffix == ".zst":
        f = io.BufferedReader(_ZstdReader(path))
    else:
        f = open(path, "rb")
    head = f.peek(4)[:4]
    found = next((name for bom, name in BOMS if head.startswith(bom)), None)
    name = found or codecs.lookup(encoding).name
    if name == "utf-8":
        return f
    return io.BufferedReader(_Transcoder(f, name, stats))


class _Transcoder(io.RawIOBase):
    """Bytes in ``encoding`` read as UTF-8 bytes; undecodable bytes become U+FFFD, counted in ``stats``."""

    def __init__(self, f: IO[bytes], encoding: str, stats: SourceStats | None):
        self.f, self.stats = f, stats
        self.decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        self.out, self.done, self.bad = b"", False, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.out and not self.done:
            data = self.f.read(BLOCK_BYTES)
            self.done = not data
            text = self.decoder.decode(data, final=self.done)
            self.bad += text.count(REPLACEMENT)
            self.out = text.encode("utf-8")
        n = min(len(buffer), len(self.out))
        buffer[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def close(self) -> None:
        if not self.closed and self.stats is not None and self.bad:
            self.stats.invalid_utf8_files += 1
            self.stats.invalid_utf8_chars += self.bad
            self.bad = 0
        self.f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """A ``.zst`` file decompressed frame after frame; a stream that ends inside a frame (truncated) or
    corrupt data raises ``DamagedFile`` (zstandard's own stream reader ends quietly on a truncated file)."""

    def __init__(self, path: Path):
        import zstandard

        self.zstd, self.path = zstandard, path
        self.f = open(path, "rb")
        self.frame = zstandard.ZstdDecompressor().decompressobj()
        self.fed = False  # the current frame has had input
        self.out = b""

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> None:
        try:
            self.out += self.frame.decompress(data)
        except self.zstd.ZstdError as exc:
            raise DamagedFile(f"corrupt zstd data ({exc})") from None
        self.fed = True

    def readinto(self, buffer) -> int:
        while not self.out:
            if self.frame.eof:  # the next frame begins with what the last one left over
                rest = self.frame.unused_data
                self.frame, self.fed = self.zstd.ZstdDecompressor().decompressobj(), False
                if rest:
                    self._feed(rest)
                continue
            data = self.f.read(BLOCK_BYTES)
            if not data:
                if self.fed:
                    raise DamagedFile("truncated (the zstd stream ends inside a frame)")
                return 0
            self._feed(data)
        n = min(len(buffer), len(self.out))
        buffer[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


class _Decoder:
    """Incremental UTF-8 decoding that replaces invalid bytes and counts the replacements."""

    def __init__(self, stats: SourceStats):
        self.stats = stats
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bad = 0

    def __call__(self, data: bytes, final: bool = False) -> str:
        text = self.decoder.decode(data, final=final)
        if REPLACEMENT in text:
            # Replacement characters that were real U+FFFD in the input are not errors.
            self.bad += text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))
        return text

    def finish(self) -> None:
        if self.bad > 0:
            self.stats.invalid_utf8_files += 1
            self.stats.invalid_utf8_chars += self.bad


def _read_text(
    path: Path, chunk_chars: int, stats: SourceStats, split: str, max_chars: int, encoding: str = "utf-8"
) -> Iterator[Document]:
    """The documents of a text file, by ``split``: ``blank`` cuts after the first blank line past
    ``chunk_chars`` characters (0: a document per file), ``lines`` makes each non-blank line a document (the
    line ending dropped), ``file`` one document per file. A piece longer than ``max_chars`` (0: no limit) is
    cut after its last line that fits, or at ``max_chars`` inside a longer line, and counted.

    In ``blank`` and ``file`` mode the documents of a file concatenate back to the file's text exactly. Each
    character is searched about once: reading is linear in the file's size.
    """
    decode = _Decoder(stats)
    with _open_binary(path, encoding, stats) as f:
        head = f.read(BLOCK_BYTES)
        if looks_binary(head[:SNIFF_BYTES]):
            stats.binary_skipped.append(str(path))
            return

        def blocks() -> Iterator[str]:
            data = head
            while data:
                yield decode(data)
                data = f.read(BLOCK_BYTES)
            tail = decode(b"", final=True)  # an incomplete character at the end: U+FFFD
            if tail:
                yield tail
            yield ""  # the end

        pieces = _text_pieces(
            blocks(), chunk_chars if split == "blank" else 0, split == "lines", max_chars, stats
        )
        whole = split == "file" or (split == "blank" and chunk_chars == 0)
        for i, text in enumerate(pieces):
            yield Document(text, str(path) if whole and i == 0 else f"{path}#{i}")
    decode.finish()


def _text_pieces(
    blocks: Iterator[str], chunk_chars: int, lines: bool, max_chars: int, stats: SourceStats
) -> Iterator[str]:
    """Cut the text of ``blocks`` (the last one empty) into documents, as ``_read_text`` says. The pending
    document begins at ``start`` in ``buffer``, and the next search for a boundary at ``scan``: text searched
    once is not searched again, and the buffer is compacted once per block."""
    buffer, start, scan = "", 0, 0
    cutting = False  # the pending text continues a document already cut at max_chars

    def counted(piece: str, cut: bool) -> str:
        nonlocal cutting
        if cut or cutting:
            stats.cut_pieces += 1
            stats.cut_documents += not cutting
        cutting = cut
        return piece

    for text in blocks:
        buffer = buffer[start:] + text
        scan, start = max(scan - start, 0), 0
        final = not text
        while start < len(buffer):
            end = stop = None  # the next document is buffer[start:end]; the one after it begins at stop
            if lines:
                newline = buffer.find("\n", max(scan, start))
                if newline >= 0:
                    end, stop = newline - (buffer[newline - 1 : newline] == "\r"), newline + 1
                else:
                    scan = len(buffer)
            elif chunk_chars > 0:
                match = BLANK_LINES.search(buffer, max(scan, start + chunk_chars))
                if match is None:
                    scan = _trailing_space(buffer, max(scan, start))  # where a blank line may still begin
                else:
                    scan = match.start()
                    if final or not MAY_GO_ON.match(buffer, match.end()):  # else more blank lines may follow
                        end = stop = match.end()
            if end is None and final:
                end = stop = len(buffer)
            if end is not None and (max_chars <= 0 or end - start <= max_chars):
                piece, start = buffer[start:end], stop
                scan = max(scan, start)
                if lines and not piece.strip():
                    cutting = False  # a blank line, or the line ending of a line cut at max_chars
                    continue
                yield counted(piece, cut=False)
            elif max_chars > 0 and len(buffer) - start > max_chars:
                limit = start + max_chars
                newline = -1 if lines else buffer.rfind("\n", start, limit)  # a line of `lines` is too long
                end = newline + 1 if newline >= 0 else limit
                piece, start = buffer[start:end], end
                scan = max(scan, start)
                yield counted(piece, cut=True)
            else:
                break


def _trailing_space(text: str, floor: int) -> int:
    """The index where the run of whitespace characters that ends ``text`` begins (not below ``floor``),
    found in slices of doubling size, so the walk runs in C."""
    i, step = len(text), 64
    while i > floor:
        lo = max(floor, i - step)
        kept = text[lo:i].rstrip(" \t\r\n")
        if kept:
            return lo + len(kept)
        i, step = lo, 2 * step
    return floor


def _field(record: object, text_field: str, where: str, first: bool, stats: SourceStats, strict: bool):
    """The text of one JSON record, or None (counted) when it is unusable."""
    if not isinstance(record, dict):
        stats.malformed(where, f"expected a JSON object, got {type(record).__name__}", strict)
        return None
    value = record.get(text_field)
    if value is None:
        message = f"no field {text_field!r} (found: {', '.join(sorted(map(str, record))) or 'no keys'})"
        if first:
            raise DataError(f"{where}: {message}; set data.text_field to the field that holds the text")
        stats.malformed(where, message, strict)
        return None
    if not isinstance(value, str):
        stats.malformed(where, f"field {text_field!r} is a {type(value).__name__}, not a string", strict)
        return None
    return value


def _base_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_json(
    path: Path, text_field: str, stats: SourceStats, strict: bool, encoding: str = "utf-8"
) -> Iterator[Document]:
    """JSON Lines (one object per line, streamed), or a ``.json`` file holding an object or a list of them."""
    with _open_binary(path, encoding, stats) as f:
        head = f.peek(SNIFF_BYTES)[:SNIFF_BYTES]
        if looks_binary(head):
            stats.binary_skipped.append(str(path))
            return
        if _base_suffix(path) == ".json":
            records = _json_whole(f, path, stats)
            if records is not None:
                for i, record in enumerate(records):
                    value = _field(record, text_field, f"{path}[{i}]", i == 0, stats, strict)
                    if value is not None:
                        yield Document(value, f"{path}[{i}]")
                return
            f = _open_binary(path, encoding, stats)  # not one JSON value: read it as JSON Lines
        decode = _Decoder(stats)
        first = True
        for lineno, raw in enumerate(f, start=1):
            line = decode(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                odd = next((c for c in line if c.isascii() and ord(c) in ODD_BYTES), None)
                why = exc.msg.removesuffix(" at") if odd is None else f"a raw control byte {ord(odd):#04x}"
                stats.malformed(f"{path}:{lineno}", f"malformed JSON ({why} at column {exc.colno})", strict)
                continue
            text = _field(record, text_field, f"{path}:{lineno}", first, stats, strict)
            first = False
            if text is not None:
                yield Document(text, f"{path}:{lineno}")
        decode.finish()
        f.close()


JSON_CHUNK_BYTES = 1 << 20


class _JsonStream:
    """Decoded text of a ``.json`` file read in chunks, with a cursor; consumed text is dropped, so memory
    holds about one record and one chunk whatever the file size."""

    def __init__(self, f: IO[bytes], path: Path, stats: SourceStats, chunk_bytes: int = JSON_CHUNK_BYTES):
        self.f, self.path, self.chunk_bytes = f, path, chunk_bytes
        self.decode = _Decoder(stats)
        self.buf, self.pos, self.lines_before, self.eof = "", 0, 0, False
        self.parser = json.JSONDecoder()

    def more(self) -> bool:
        """Append the next chunk (dropping what the cursor has passed); False at the end of the file."""
        if self.eof:
            return False
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :], 0
        data = self.f.read(self.chunk_bytes)
        self.eof = not data
        self.buf += self.decode(data, final=self.eof)
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def line(self, pos: int | None = None) -> int:
        return self.lines_before + self.buf.count("\n", 0, self.pos if pos is None else pos) + 1

    def value(self):
        """The next JSON value. It counts only once a character follows it (or the file ends), so a number
        cut by a chunk boundary is never read short."""
        self.peek()  # past whitespace
        while True:
            try:
                value, end = self.parser.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise DataError(f"{self.path}:{self.line(exc.pos)}: malformed JSON ({exc.msg})") from None
            self.more()

    def expect(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            found = repr(char) if char else "the end of the file"
            raise DataError(f"{self.path}:{self.line()}: malformed JSON (expected {' or '.join(allowed)}, "
                            f"found {found})")  # fmt: skip
        self.pos += 1
        return char


def _json_whole(f: IO[bytes], path: Path, stats: SourceStats) -> Iterator | None:
    """The records of a ``.json`` file holding one object or an array of them, streamed (an array is parsed
    element by element); None when the file holds several values, i.e. it is JSON Lines under a .json name."""
    stream = _JsonStream(f, path, stats)
    if stream.peek() != "[":
        value = stream.value()
        if stream.peek():
            return None
        stream.decode.finish()
        return iter([value])

    def records():
        stream.expect("[")
        if stream.peek() == "]":
            stream.pos += 1
        else:
            while True:
                yield stream.value()
                if stream.expect(",]") == "]":
                    break
        if stream.peek():
            raise DataError(f"{path}:{stream.line()}: malformed JSON (extra data after the array)")
        stream.decode.finish()

    return records()


def _column_texts(table_batches, text_field: str, where: str, stats: SourceStats) -> Iterator[Document]:
    row = 0
    for batch in table_batches:
        names = batch.schema.names
        if text_field not in names:
            raise DataError(
                f"{where}: no column {text_field!r} (found: {', '.join(names)}); "
                f"set data.text_field to the column that holds the text"
            )
        for value in batch.column(names.index(text_field)).to_pylist():
            if isinstance(value, str):
                yield Document(value, f"{where}[{row}]")
            else:
                stats.malformed(f"{where}[{row}]", f"column {text_field!r} is {type(value).__name__}", False)
            row += 1


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for non-parquet bytes
        raise DamagedFile(f"not a readable parquet file ({exc})") from None
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (found: {', '.join(parquet.schema_arrow.names)}); "
            f"set data.text_field to the column that holds the text"
        )
    try:
        yield from _column_texts(
            parquet.iter_batches(batch_size=1024, columns=[text_field]), text_field, str(path), stats
        )
    except pa.ArrowException as exc:
        raise DamagedFile(f"corrupt parquet data ({exc})") from None


def _arrow_files(folder: Path) -> list[Path]:
    """The ``data-*.arrow`` files of a ``save_to_disk`` folder, in order (all splits of a DatasetDict)."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        return [f for split in splits for f in _arrow_files(folder / split)]
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    files = [folder / entry["filename"] for entry in state.get("_data_files", [])]
    return files or sorted(folder.glob("data-*.arrow"))


def _read_arrow_dataset(folder: Path, text_field: str, stats: SourceStats) -> Iterator[Document]:
    import pyarrow as pa

    for path in _arrow_files(folder):
        stats.bytes += path.stat().st_size
        with pa.memory_map(str(path), "r") as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            yield from _column_texts(batches, text_field, str(path), stats)
