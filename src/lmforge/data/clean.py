"""Clean documents: normalise, scrub PII, filter, deduplicate; count what each stage removed.

Stages, in order: ``normalize`` (Unicode NFC, CRLF and CR to LF, control characters and byte-order marks
removed), ``pii`` (optional: e-mail addresses, phone numbers and IP addresses become placeholders),
``filter`` (length in characters and the fraction of repeated lines: measures that treat Chinese and other
scripts without spaces the same as English), ``exact_dedup`` (hash of the normalised document) and
``near_dedup`` (optional MinHash-LSH over character 5-grams, which work for any script).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from lmforge.config import DataConfig

STAGES = ("read", "normalize", "pii", "filter", "exact_dedup", "near_dedup")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")  # keeps \t and \n
LINE_ENDS = re.compile(r"\r\n?")
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?!\w)")
IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
)
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
PHONE = re.compile(
    # +1 555-123-4567, (020) 7946 0958, 555-1234; not year ranges such as 1303-1870
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}|\d{3})[ .-]\d{4}(?!\w)"
    r"|(?<!\d)1[3-9]\d{9}(?!\d)"  # mainland China mobile numbers, written without separators
)
PII_PATTERNS = ((EMAIL, "<EMAIL>"), (IPV6, "<IP_ADDRESS>"), (IPV4, "<IP_ADDRESS>"), (PHONE, "<PHONE>"))
NGRAM = 5
NUM_PERM = 128


@dataclass
class StageCount:
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0

    def add(self, chars_in: int, chars_out: int | None) -> None:
        self.docs_in += 1
        self.chars_in += chars_in
        if chars_out is not None:
            self.docs_out += 1
            self.chars_out += chars_out


@dataclass
class CleanReport:
    stages: dict[str, StageCount] = field(default_factory=lambda: {s: StageCount() for s in STAGES})
    removed: dict[str, int] = field(default_factory=dict)  # filter reason -> documents
    pii_replaced: dict[str, int] = field(default_factory=dict)  # placeholder -> occurrences

    def as_dict(self) -> dict:
        return {
            "stages": {name: vars(count) for name, count in self.stages.items()},
            "filter_reasons": dict(self.removed),
            "pii_replaced": dict(self.pii_replaced),
        }


def normalize(text: str) -> str:
    """NFC, LF line ends, no control characters (tabs and newlines stay) and no byte-order marks."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = LINE_ENDS.sub("\n", text)
    return CONTROL.sub("", text)


def scrub_pii(text: str, counts: dict[str, int]) -> str:
    for pattern, placeholder in PII_PATTERNS:
        text, n = pattern.subn(placeholder, text)
        if n:
            counts[placeholder] = counts.get(placeholder, 0) + n
    return text


def repeated_line_fraction(text: str) -> float:
    """The fraction of non-blank lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def filter_reason(text: str, cfg: DataConfig) -> str | None:
    """Why a document fails the quality filters, or None when it passes."""
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if cfg.max_repeated_line_fraction < 1.0 and repeated_line_fraction(text) > cfg.max_repeated_line_fraction:
        return "repeated_lines"
    return None


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """32-bit hashes of the character n-grams of ``text`` (lowercased, whitespace collapsed). (N,) uint64"""
    text = " ".join(text.lower().split())
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(n, len(codes))
    width = len(codes) - n + 1
    h = np.zeros(width, dtype=np.uint64)
    for j in range(n):
        h = (h * np.uint64(1_000_003)) ^ codes[j : j + width]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
    return np.unique(h & np.uint64(0xFFFFFFFF))


class NearDuplicates:
    """MinHash-LSH index of kept documents: ``seen(text)`` is True for a near-copy of an earlier document."""

    def __init__(self, threshold: float, num_perm: int = NUM_PERM, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._minhash = lambda: MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.count = 0

    def seen(self, text: str) -> bool:
        minhash = self._minhash()
        minhash.update_batch(shingle_hashes(text).tolist())
        if self.lsh.query(minhash):
            return True
        self.lsh.insert(str(self.count), minhash, check_duplication=False)
        self.count += 1
        return False


class Cleaner:
    """Applies the stages to one document at a time; ``report`` holds the counts so far."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.report = CleanReport()
        self.hashes: set[bytes] = set()
        self.near = NearDuplicates(cfg.near_dedup_threshold) if cfg.near_dedup else None

    def __call__(self, text: str) -> tuple[str, bytes] | None:
        """The cleaned text and its digest, or None when a stage removed the document."""
        stages = self.report.stages
        stages["read"].add(len(text), len(text))
        cleaned = normalize(text)
        stages["normalize"].add(len(text), len(cleaned))
        text = cleaned
        if self.cfg.scrub_pii:
            cleaned = scrub_pii(text, self.report.pii_replaced)
        stages["pii"].add(len(text), len(cleaned))
        text = cleaned
        reason = filter_reason(text, self.cfg)
        stages["filter"].add(len(text), None if reason else len(text))
        if reason:
            self.report.removed[reason] = self.report.removed.get(reason, 0) + 1
            return None
        key = digest(text)
        duplicate = self.cfg.dedup and key in self.hashes
        stages["exact_dedup"].add(len(text), None if duplicate else len(text))
        if duplicate:
            return None
        if self.cfg.dedup:
            self.hashes.add(key)
        near = self.near is not None and self.near.seen(text)
        stages["near_dedup"].add(len(text), None if near else len(text))
        if near:
            return None
        return text, key


def format_report(report: dict) -> str:
    """The cleaning report as a table: documents and characters in and out per stage."""
    rows = [f"{'stage':<12} {'docs in':>10} {'docs out':>10} {'chars in':>14} {'chars out':>14}"]
    for name, c in report["stages"].items():
        rows.append(
            f"{name:<12} {c['docs_in']:>10,} {c['docs_out']:>10,} {c['chars_in']:>14,} {c['chars_out']:>14,}"
        )
    extras = {f"removed ({k})": v for k, v in report.get("filter_reasons", {}).items()}
    extras.update({f"pii {k}": v for k, v in report.get("pii_replaced", {}).items()})
    rows += [f"{k:<25} {v:>10,}" for k, v in extras.items()]
    return "\n".join(rows)
