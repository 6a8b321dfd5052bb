"""Clean documents: normalise, scrub PII, filter, deduplicate; count what each stage removed.

Stages, in order: ``normalize`` (Unicode NFC, CRLF and CR to LF, control characters and byte-order marks
removed), ``pii`` (optional: e-mail addresses, phone numbers and IP addresses become placeholders),
``filter`` (length in characters and the fraction of repeated lines: measures that treat Chinese and other
scripts without spaces the same as English), ``language`` (optional: py3langid per document, keeps
``data.languages``; ``data/language.py``), ``quality`` (optional: a learned model's score against
``data.quality_threshold``; ``data/quality.py``), ``exact_dedup`` (hash of the normalised document) and
``near_dedup`` (optional MinHash-LSH over character 5-grams, which work for any script; ``data/dedup.py``).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.dedup import BandIndex, MinHasher, band_keys, lsh_params, shingle_hashes  # noqa: F401

STAGES = ("read", "normalize", "pii", "filter", "language", "quality", "exact_dedup", "near_dedup")
QUALITY_BINS = 20  # report.json's histogram of quality scores: bins of 0.05 over [0, 1]
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
    languages: dict[str, dict[str, int]] | None = (
        None  # language -> {docs, chars} reaching the language stage
    )
    quality: dict | None = None  # the model, the threshold and the histogram of scores

    def as_dict(self) -> dict:
        out = {
            "stages": {name: vars(count) for name, count in self.stages.items()},
            "filter_reasons": dict(self.removed),
            "pii_replaced": dict(self.pii_replaced),
        }
        if self.languages is not None:
            out["languages"] = {code: dict(c) for code, c in sorted(self.languages.items())}
        if self.quality is not None:
            out["quality"] = {**self.quality, "histogram": list(self.quality["histogram"])}
        return out


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


class NearDuplicates:
    """The in-memory near-duplicate index (``data.dedup``'s rule): ``seen(text)`` is True when the text
    shares an LSH band with an earlier document."""

    def __init__(self, threshold: float):
        self.hasher = MinHasher()
        self.bands, self.rows = lsh_params(threshold)
        self.index = BandIndex()

    def keys(self, text: str) -> np.ndarray:
        return band_keys(self.hasher.signature(text), self.bands, self.rows)

    def seen(self, text: str) -> bool:
        return self.index.seen(self.keys(text))


class Cleaner:
    """Applies the stages to one document at a time; ``report`` holds the counts so far."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.report = CleanReport()
        self.hashes: set[bytes] = set()
        self.near = NearDuplicates(cfg.near_dedup_threshold) if cfg.near_dedup else None
        self.identifier = None
        self.language = None  # the language of the last document identified
        if cfg.languages or cfg.language_id:
            from lmforge.data.language import LanguageIdentifier

            self.identifier = LanguageIdentifier(cfg.language_threshold)
            self.identifier.check(cfg.languages)
            self.report.languages = {}
        self.quality = None
        if cfg.quality_model is not None:
            from lmforge.data.quality import load_quality_model

            self.quality = load_quality_model(cfg.quality_model)
            self.report.quality = {
                "model": cfg.quality_model,
                "fingerprint": self.quality.fingerprint,
                "threshold": cfg.quality_threshold,
                "scored": 0,
                "score_sum": 0.0,
                "histogram": [0] * QUALITY_BINS,
            }

    def _removed(self, reason: str) -> None:
        self.report.removed[reason] = self.report.removed.get(reason, 0) + 1

    def _language_keeps(self, text: str) -> bool:
        if self.identifier is None:
            return True
        code, _ = self.identifier.identify(text)
        self.language = code
        assert self.report.languages is not None
        count = self.report.languages.setdefault(code, {"docs": 0, "chars": 0})
        count["docs"] += 1
        count["chars"] += len(text)
        return not self.cfg.languages or code in self.cfg.languages

    def _quality_keeps(self, text: str) -> bool:
        if self.quality is None:
            return True
        score = self.quality.score(text)
        q = self.report.quality
        assert q is not None
        q["scored"] += 1
        q["score_sum"] += score
        q["histogram"][min(int(score * QUALITY_BINS), QUALITY_BINS - 1)] += 1
        return score >= self.cfg.quality_threshold

    def clean(self, text: str) -> str | None:
        """The first stages (normalize, pii, filter, language, quality): the cleaned text, or None when a
        filter removed it."""
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
            self._removed(reason)
            return None
        keep = self._language_keeps(text)
        stages["language"].add(len(text), len(text) if keep else None)
        if not keep:
            self._removed("language")
            return None
        keep = self._quality_keeps(text)
        stages["quality"].add(len(text), len(text) if keep else None)
        if not keep:
            self._removed("low_quality")
            return None
        return text

    def __call__(self, text: str) -> tuple[str, bytes] | None:
        """The cleaned text and its digest, or None when a stage removed the document."""
        text = self.clean(text)
        if text is None:
            return None
        stages = self.report.stages
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


def empty_message(report: dict, sources: list[str]) -> str:
    """What to tell the user when no document survived: nothing was read, or which stage removed all."""
    src = report["sources"]
    if report["stages"]["read"]["docs_in"] == 0:
        damaged = src.get("damaged_files", [])
        named = f": {'; '.join(damaged[:3])}" if damaged else ""
        return (
            f"no documents were read from {', '.join(sources)} ({src['files']} inputs, "
            f"{src['binary_skipped']} binary files skipped, {src['malformed_records']} malformed records, "
            f"{src.get('damaged_skipped', 0)} damaged files skipped{named})"
        )
    for name in STAGES:
        stage = report["stages"][name]
        if stage["docs_in"] > 0 and stage["docs_out"] == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in report["filter_reasons"].items())
            hint = f" ({reasons})" if name == "filter" and reasons else ""
            settings = "data.min_chars, data.max_chars, ..."
            if name == "language":
                found = ", ".join(f"{k}: {v['docs']}" for k, v in report.get("languages", {}).items())
                hint, settings = f" (languages found: {found})", "data.languages"
            elif name == "quality":
                settings = "data.quality_threshold, data.quality_model"
            return (
                f"the '{name}' stage removed all {stage['docs_in']} documents{hint}; "
                f"relax its settings ({settings})"
            )
    return "no document was kept"  # pragma: no cover - every removal is one of the stages


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
    for code, c in report.get("languages", {}).items():
        tokens = report.get("language_tokens", {}).get(code, {}).get("tokens")
        kept = f" {tokens:>14,} tokens kept" if tokens is not None else ""
        rows.append(f"{'language ' + code:<25} {c['docs']:>10,} docs {c['chars']:>14,} chars{kept}")
    quality = report.get("quality")
    if quality and quality["scored"]:
        mean = quality["score_sum"] / quality["scored"]
        rows.append(f"{'quality mean score':<25} {mean:>10.3f} (threshold {quality['threshold']})")
    return "\n".join(rows)
