"""The metrics of generative tasks, each computed by (or exactly as) its reference implementation.

* ROUGE-1/2/L F1 through ``rouge-score`` (max over the references, ``RougeScorer.score_multi``). Its default
  tokenizer keeps only ``[a-z0-9]`` and so scores any Chinese text as empty; ``CJKTokenizer`` gives every CJK
  character its own token and leaves the rest to the default tokenizer (identical on text without CJK).
* BLEU and chrF through ``sacrebleu``, corpus-level, with its signature string; tokenizer ``zh`` for Chinese
  targets, ``13a`` otherwise. Standard errors by bootstrap over items (100 resamples, fixed seed).
* Exact match and F1 with the SQuAD v1.1 evaluation script's answer normalisation (``qa_scores``), and for
  Chinese the CMRC 2018 script's: punctuation removed, CJK characters as tokens, F1 from the longest common
  substring of the token lists.
* Means report an analytic standard error (sample standard deviation over the square root of n).

``sacrebleu`` and ``rouge-score`` are the ``eval`` extra; they are imported only when a task needs them.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from lmforge.errors import ConfigError

EXTRA_HINT = "pip install 'lmforge[eval]'"


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"this task's metric needs the {package!r} package, which is not installed: {EXTRA_HINT}"
        ) from None


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its analytic standard error (sample standard deviation / sqrt(n)); 0 for an empty list."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# -- ROUGE ------------------------------------------------------------------------------------------------

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"  # kana, CJK ideographs, hangul
_CJK_RUN = re.compile(f"([{CJK}])")


class CJKTokenizer:
    """rouge-score's tokenizer interface (``tokenize(text) -> list[str]``): each CJK character is a token,
    everything between them goes through rouge-score's default tokenizer (lower case, [a-z0-9] words)."""

    def tokenize(self, text: str) -> list[str]:
        from rouge_score import tokenize as rouge_tokenize

        tokens: list[str] = []
        for piece in _CJK_RUN.split(text):
            if not piece:
                continue
            if _CJK_RUN.fullmatch(piece):
                tokens.append(piece)
            else:
                tokens.extend(rouge_tokenize.tokenize(piece, None))
        return tokens


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scorer():
    """A rouge-score scorer for ROUGE-1/2/L without stemming, with the CJK-aware tokenizer."""
    module = _require("rouge_score.rouge_scorer", "rouge-score")
    return module.RougeScorer(list(ROUGE_TYPES), use_stemmer=False, tokenizer=CJKTokenizer())


def rouge_item(scorer, prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction, the best over its references (an empty prediction scores 0)."""
    scores = scorer.score_multi(list(references), prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


# -- BLEU and chrF ----------------------------------------------------------------------------------------

BOOTSTRAP_RESAMPLES = 100  # as lm-evaluation-harness caps the bootstrap of corpus BLEU/chrF
BOOTSTRAP_SEED = 12345


def bleu_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]], language: str) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0..100) with their signatures and bootstrap standard errors (items
    resampled with replacement, the corpus score recomputed, the standard deviation of those scores).
    ``references[i]`` are the references of item i (items may have different counts: missing ones are None)."""
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu")
    import numpy as np

    tokenize = "zh" if language == "zh" else "13a"
    width = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(width)]
    out: dict = {}
    for name, metric in (("bleu", sacrebleu.BLEU(tokenize=tokenize)), ("chrf", sacrebleu.CHRF())):
        out[name] = metric.corpus_score(list(predictions), streams).score
        out[f"{name}_signature"] = metric.get_signature().format()
        if len(predictions) > 1:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            scores = []
            for _ in range(BOOTSTRAP_RESAMPLES):
                pick = rng.integers(0, len(predictions), len(predictions))
                scores.append(
                    metric.corpus_score(
                        [predictions[i] for i in pick], [[s[i] for i in pick] for s in streams]
                    ).score
                )
            out[f"{name}_stderr"] = float(np.std(scores, ddof=1))
    return out


def sentence_bleu(prediction: str, references: Sequence[str], language: str) -> float:
    """Sentence BLEU (sacrebleu, effective order) for the per-item log; the corpus score is the metric."""
    sacrebleu = _require("sacrebleu.metrics", "sacrebleu")
    metric = sacrebleu.BLEU(tokenize="zh" if language == "zh" else "13a", effective_order=True)
    return metric.sentence_score(prediction, list(references)).score


# -- question answering: SQuAD v1.1 -----------------------------------------------------------------------


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's normalize_answer: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


# -- question answering: CMRC 2018 (Chinese) --------------------------------------------------------------

CMRC_SP_CHAR = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”",
                "；", "’", "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"]  # fmt: skip
# the CMRC 2018 script compares single characters with this list, so its two-character '……' never matches
CMRC_PUNCTUATION = {c for c in CMRC_SP_CHAR if len(c) == 1}
_HAN = re.compile(r"[\u4e00-\u9fa5]")
_NON_CJK_TOKENS = re.compile(r"\w+|[^\w\s]")


def cmrc_segments(text: str) -> list[str]:
    """The CMRC 2018 script's mixed_segmentation with rm_punc=True: lower case, its punctuation dropped,
    every Han character a token; runs of other text split into words and symbols (the script uses
    nltk.word_tokenize there, which needs a downloaded model; this regex agrees on words and digits)."""
    out, run = [], ""
    for ch in text.lower().strip():
        if ch in CMRC_PUNCTUATION:
            continue
        if _HAN.match(ch):
            if run:
                out.extend(_NON_CJK_TOKENS.findall(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(_NON_CJK_TOKENS.findall(run))
    return out


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest contiguous run shared by ``a`` and ``b`` (the CMRC script's find_lcs)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_f1(prediction: str, gold: str) -> float:
    pred, ref = cmrc_segments(prediction), cmrc_segments(gold)
    common = longest_common_substring(ref, pred)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def cmrc_em(prediction: str, gold: str) -> float:
    def strip(text: str) -> str:
        return "".join(ch for ch in text.lower().strip() if ch not in CMRC_PUNCTUATION)

    return float(strip(prediction) == strip(gold))


def qa_item(prediction: str, answers: Sequence[str], language: str) -> dict[str, float]:
    """Exact match and F1 of one prediction (0..1), the best over the gold answers; Chinese the CMRC way."""
    em, f1 = (cmrc_em, cmrc_f1) if language == "zh" else (squad_em, squad_f1)
    return {
        "exact_match": max(em(prediction, a) for a in answers),
        "f1": max(f1(prediction, a) for a in answers),
    }


# -- classification by generation --------------------------------------------------------------------------


def label_of(prediction: str, labels: Sequence[str]) -> str | None:
    """The label word a generation names: its first line, stripped, compared without case and trailing
    punctuation; None when it is no label."""
    lines = prediction.strip().splitlines()
    first = lines[0].strip().rstrip(".!。").strip().lower() if lines else ""
    for label in labels:
        if first == label.strip().lower():
            return label
    return None
