"""A learned quality filter: logistic regression on hashed character and word n-grams.

Features of a document (lower-cased; a long one is judged on ``SAMPLE_CHARS`` characters from its start,
middle and end): character 1- to 4-grams (words of scripts without spaces, such as Chinese, are caught here)
and whitespace-separated word 1- and 2-grams (word order: shuffled text loses its common bigrams). Each n-gram
is hashed (a polynomial hash of its code points, computed with numpy in one pass over the text) into one of
``2**bits`` buckets; the bucket counts become ``log1p(count)``, scaled to unit length. The model is
``p(good) = sigmoid(w . x + b)``, fit by L-BFGS (scipy) on the mean log-loss of positive and negative
example documents, each class weighted equally, plus an L2 penalty.

The model is a safetensors file: ``weight`` (float32, ``2**bits``), ``bias`` (float32, 1) and the feature
settings in its metadata; loading it runs no code (no pickle). ``lmforge data train-quality`` trains one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.language import language_sample
from lmforge.errors import DataError

FORMAT = "lmforge-quality-v1"
BITS = 18
CHAR_NGRAMS = (1, 2, 3, 4)
WORD_NGRAMS = (1, 2)
SAMPLE_CHARS = 12_000
BASE = np.uint64(0x100000001B3)  # polynomial hash of n-grams: h(s + c) = h(s) * BASE + c (mod 2**64)
WORD_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64: word hashes from prefix sums
IDEOGRAPHIC_SPACE = np.uint64(0x3000)  # words are separated by it, by spaces and by control characters
# One odd multiplier per kind of n-gram (multiply-shift hashing): the same n-gram of two kinds lands apart.
MULTIPLIERS = {
    ("char", 1): 0xD6E8FEB86659FD93,
    ("char", 2): 0xA0761D6478BD642F,
    ("char", 3): 0xE7037ED1A0B428DB,
    ("char", 4): 0x8EBC6AF09C88C6E3,
    ("word", 1): 0x589965CC75374CC3,
    ("word", 2): 0x1D8E4E27C47D124F,
}
MASK64 = (1 << 64) - 1


def _bucket(hashes: np.ndarray, kind: tuple[str, int], bits: int) -> np.ndarray:
    return ((hashes * np.uint64(MULTIPLIERS[kind])) >> np.uint64(64 - bits)).astype(np.int32)


def _word_hashes(cps: np.ndarray) -> np.ndarray:
    """The hash of each whitespace-separated word of ``cps`` (code points, uint64), in order."""
    word = (cps > np.uint64(32)) & (cps != IDEOGRAPHIC_SPACE)
    if not word.any():
        return np.zeros(0, dtype=np.uint64)
    edges = np.diff(np.concatenate(([False], word, [False])).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    n = len(cps)
    powers = np.cumprod(np.full(n, WORD_BASE, dtype=np.uint64))  # powers[j] = Q^(j+1)
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(cps * powers)))  # prefix[i] = sum_{j<i} c_j Q^(j+1)
    inverse = np.cumprod(np.full(n + 1, pow(WORD_BASE, -1, 1 << 64), dtype=np.uint64))  # Q^-(i+1)
    # sum_{a<=j<b} c_j Q^(j+1) * Q^-(a+1) = sum c_j Q^(j-a): the same for the same word anywhere
    return (prefix[ends] - prefix[starts]) * inverse[starts]


def features(text: str, bits: int = BITS) -> tuple[np.ndarray, np.ndarray]:
    """The document's feature vector as (bucket indices, values): unique indices, unit L2 norm."""
    sample = language_sample(text, SAMPLE_CHARS).lower()
    cps = np.frombuffer(sample.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.uint64)
    parts = []
    grams = cps
    for n in range(1, max(CHAR_NGRAMS) + 1):
        if n > 1:
            grams = grams[:-1] * BASE + cps[n - 1 :]  # (len - n + 1,) hashes of the n-grams
        if n in CHAR_NGRAMS and len(grams):
            parts.append(_bucket(grams, ("char", n), bits))
    words = _word_hashes(cps)
    if 1 in WORD_NGRAMS and len(words):
        parts.append(_bucket(words, ("word", 1), bits))
    if 2 in WORD_NGRAMS and len(words) > 1:
        parts.append(_bucket(words[:-1] * BASE + words[1:], ("word", 2), bits))
    if not parts:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    buckets = np.sort(np.concatenate(parts))  # unique with counts, without np.unique's extra passes
    first = np.flatnonzero(np.concatenate(([True], buckets[1:] != buckets[:-1])))
    counts = np.diff(np.append(first, len(buckets)))
    values = np.log1p(counts.astype(np.float32))
    values /= np.linalg.norm(values)
    return buckets[first], values


@dataclass(frozen=True)
class QualityModel:
    """``score(text)``: the probability that the text is like the positive examples."""

    weight: np.ndarray  # (2**bits,) float32
    bias: float  # a float32 value, as saved
    bits: int = BITS

    def score(self, text: str) -> float:
        index, values = features(text, self.bits)
        logit = float(values @ self.weight[index]) + self.bias
        return 1.0 / (1.0 + math.exp(-logit)) if logit >= 0 else math.exp(logit) / (1.0 + math.exp(logit))

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.weight.tobytes() + np.float32(self.bias).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        """Write the model as safetensors (temp name, then rename)."""
        from safetensors.numpy import save_file

        target = Path(path)
        if target.suffix != ".safetensors":
            raise DataError(f"{target}: a quality model is saved as .safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tensors = {"weight": self.weight.astype(np.float32), "bias": np.array([self.bias], dtype=np.float32)}
        metadata = {
            "format": FORMAT,
            "bits": str(self.bits),
            "char_ngrams": ",".join(map(str, CHAR_NGRAMS)),
            "word_ngrams": ",".join(map(str, WORD_NGRAMS)),
            "sample_chars": str(SAMPLE_CHARS),
        }
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(target)
        return target


def load_quality_model(path: str | Path) -> QualityModel:
    """Read a model written by ``QualityModel.save``; a missing, damaged or foreign file is named."""
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise DataError(
            f"data.quality_model: {source} does not exist (train one: lmforge data train-quality)"
        )
    try:
        with safe_open(str(source), framework="numpy") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except Exception as exc:  # safetensors raises its own error types for a damaged header or tensor
        raise DataError(f"data.quality_model: {source} is not a readable safetensors file ({exc})") from None
    expected = {
        "format": FORMAT,
        "char_ngrams": ",".join(map(str, CHAR_NGRAMS)),
        "word_ngrams": ",".join(map(str, WORD_NGRAMS)),
        "sample_chars": str(SAMPLE_CHARS),
    }
    wrong = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    bits = int(meta.get("bits", -1)) if str(meta.get("bits", "")).isdigit() else -1
    if wrong or bits < 1 or weight.shape != (1 << bits,) or bias.shape != (1,):
        raise DataError(
            f"data.quality_model: {source} is not an {FORMAT} model for these features "
            f"(metadata {meta}, weight {weight.shape}); train it again with lmforge data train-quality"
        )
    return QualityModel(weight=weight.astype(np.float32), bias=float(bias[0]), bits=bits)


def feature_matrix(texts: Iterable[str], bits: int = BITS):
    """The documents' features as a scipy CSR matrix (documents, 2**bits)."""
    from scipy.sparse import csr_matrix

    indices, values, indptr = [], [], [0]
    for text in texts:
        index, value = features(text, bits)
        indices.append(index)
        values.append(value)
        indptr.append(indptr[-1] + len(index))
    if not indices:
        return csr_matrix((0, 1 << bits), dtype=np.float64)
    return csr_matrix(
        (np.concatenate(values).astype(np.float64), np.concatenate(indices), np.array(indptr)),
        shape=(len(indptr) - 1, 1 << bits),
    )


def fit_quality_model(
    positives: list[str], negatives: list[str], *, l2: float = 1e-5, bits: int = BITS, max_iter: int = 200
) -> QualityModel:
    """Logistic regression of positive (1) against negative (0) documents, each class weighted equally."""
    try:
        from scipy.optimize import minimize
        from scipy.sparse import vstack
    except ImportError as e:
        raise DataError(f"training a quality model needs scipy ({e}); pip install -e '.[filters]'") from None
    if not positives or not negatives:
        raise DataError(
            f"a quality model needs positive and negative examples ({len(positives)} positive, "
            f"{len(negatives)} negative documents read)"
        )
    x = vstack([feature_matrix(positives, bits), feature_matrix(negatives, bits)]).tocsr()
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    sample_weight = np.where(y == 1, 0.5 / len(positives), 0.5 / len(negatives))  # sums to 1
    xt = x.T.tocsr()

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-1], params[-1]
        z = x @ w + b  # (documents,)
        # log(1 + e^z) - y z, stably; its derivative sigmoid(z) - y
        value = float(sample_weight @ (np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * float(w @ w)
        residual = sample_weight * (0.5 * (1.0 + np.tanh(0.5 * z)) - y)
        grad = np.concatenate([xt @ residual + l2 * w, [residual.sum()]])
        return value, grad

    start = np.zeros(x.shape[1] + 1)
    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    params = result.x
    bias = float(np.float32(params[-1]))  # the value the file keeps: a saved model scores the same
    return QualityModel(weight=params[:-1].astype(np.float32), bias=bias, bits=bits)


def precision_recall(scores_pos: list[float], scores_neg: list[float], threshold: float) -> dict:
    """Precision and recall of keeping (score >= threshold) positives, with the counts behind them."""
    tp = sum(s >= threshold for s in scores_pos)
    fp = sum(s >= threshold for s in scores_neg)
    return {
        "positives": len(scores_pos),
        "negatives": len(scores_neg),
        "kept_positives": tp,
        "kept_negatives": fp,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / len(scores_pos) if scores_pos else 0.0,
    }
