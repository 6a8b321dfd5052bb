"""Language identification per document: py3langid (a naive Bayes model over byte n-grams, 97 languages plus
a few scripts; its model ships inside the wheel as compressed numpy arrays, no download and no pickle).

py3langid walks every byte in Python (about 0.6 MB/s of English on one core), so a long document is judged on
a sample: up to ``SAMPLE_CHARS`` characters taken from its start, middle and end in equal parts. The sample is
classified in pieces cut at line ends, and the document gets the language of most of their characters, so a
document that mixes languages by line or paragraph gets that of its larger part (benchmarks/language_quality.py).
"""

from __future__ import annotations

import functools

from lmforge.config import suggest
from lmforge.errors import ConfigError

SAMPLE_CHARS = 1500  # characters classified per document (three windows of 500 for a longer one)
PIECE_CHARS = 150  # the sample is classified in pieces of about this many characters, cut at line ends
UNDETERMINED = "und"  # the label of a document with no letters, or below data.language_threshold
# py3langid's labels for varieties of written Chinese, reported as 'zh': classical Chinese verse gets 'yue' or
# 'wuu' about 2% of the time (benchmarks/language_id.py), and a Chinese corpus keeps these texts anyway.
FOLDED = {"yue": "zh", "wuu": "zh"}


def language_sample(text: str, limit: int = SAMPLE_CHARS) -> str:
    """``text`` itself when it is short, else three windows of ``limit // 3`` characters: start, middle, end."""
    if len(text) <= limit:
        return text
    part = limit // 3
    middle = (len(text) - part) // 2
    return "\n".join((text[:part], text[middle : middle + part], text[-part:]))


@functools.lru_cache(maxsize=1)
def _model():
    """py3langid's model, loaded once per process (about a second: 4.6 MB of compressed arrays)."""
    try:
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as Model
    except ImportError as e:
        raise ConfigError(
            f"data.languages / data.language_id need py3langid ({e}); pip install -e '.[filters]'"
        ) from None
    return Model.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageIdentifier:
    """``identify(text) -> (language, probability)`` with ISO 639-1 codes ('en', 'zh', ...); a probability
    below ``threshold`` (or a text without a letter or digit) gives ``UNDETERMINED``."""

    def __init__(self, threshold: float = 0.0):
        self.model = _model()
        self.labels = tuple(label for label in self.model.labels if label not in FOLDED)
        self.threshold = threshold

    def check(self, languages: list[str]) -> None:
        """Refuse a language code the model does not know, naming the close one."""
        for code in languages:
            if code not in self.labels and code != UNDETERMINED:
                raise ConfigError(
                    f"data.languages: unknown language code '{code}'{suggest(code, self.labels)}; "
                    f"py3langid knows {', '.join(sorted(self.labels))} (and '{UNDETERMINED}': undetermined)"
                )

    def identify(self, text: str) -> tuple[str, float]:
        """The language with the most characters among the sample's pieces (see ``pieces``), and the
        character-weighted mean of its pieces' probabilities."""
        chars: dict[str, int] = {}
        weighted: dict[str, float] = {}
        for piece in pieces(language_sample(text)):
            if not any(c.isalnum() for c in piece):
                continue
            code, probability = self.model.classify(piece)
            code = FOLDED.get(code, code)
            chars[code] = chars.get(code, 0) + len(piece)
            weighted[code] = weighted.get(code, 0.0) + probability * len(piece)
        if not chars:
            return UNDETERMINED, 0.0
        code = max(chars, key=chars.__getitem__)
        probability = weighted[code] / chars[code]
        if probability < self.threshold:
            return UNDETERMINED, float(probability)
        return code, float(probability)


def pieces(sample: str, size: int = PIECE_CHARS) -> list[str]:
    """The sample cut at line ends into pieces of at least ``size`` characters (the last may be shorter and
    joins the one before): each is classified alone, so that a document mixing languages line by line is
    labelled by the language of most of its characters, not by the script whose n-grams weigh most (one
    line of Chinese outweighs several of English in a single naive Bayes score)."""
    out: list[str] = []
    current = ""
    for line in sample.split("\n"):
        current = f"{current}\n{line}" if current else line
        if len(current) >= size:
            out.append(current)
            current = ""
    if current:
        if out and len(current) < size // 2:
            out[-1] = f"{out[-1]}\n{current}"
        else:
            out.append(current)
    return out
