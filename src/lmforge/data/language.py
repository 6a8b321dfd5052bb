"""Language identification per document: py3langid (a naive Bayes model over byte n-grams, 97 languages plus
a few scripts; its model ships inside the wheel as compressed numpy arrays, no download and no pickle).

py3langid walks every byte in Python (about 0.6 MB/s of English on one core), so a long document is judged on
a sample: up to ``SAMPLE_CHARS`` characters taken from its start, middle and end in equal parts. A document
that mixes languages gets the label of the larger part of that sample (benchmarks/language_id.py measures it).
"""

from __future__ import annotations

import functools

from lmforge.config import suggest
from lmforge.errors import ConfigError

SAMPLE_CHARS = 1500  # characters classified per document (three windows of 500 for a longer one)
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
        sample = language_sample(text)
        if not any(c.isalnum() for c in sample):
            return UNDETERMINED, 0.0
        code, probability = self.model.classify(sample)
        if probability < self.threshold:
            return UNDETERMINED, float(probability)
        return FOLDED.get(code, code), float(probability)
