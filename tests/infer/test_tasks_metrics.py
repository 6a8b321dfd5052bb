"""Generative-task metrics equal their reference implementations on the same predictions: rouge-score,
sacrebleu, the SQuAD v1.1 script (written out below as the reference) and hand-checked CMRC 2018 values."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from lmforge.infer.tasks import metrics as M
from lmforge.infer.tasks.runner import score
from lmforge.infer.tasks.spec import FewShot, TaskSpec
from tests.conftest import missing

try:
    import sacrebleu
    from rouge_score import rouge_scorer
except ImportError as e:  # skips in a user's clone, fails under CI
    missing(f"the eval extra is not installed ({e}); pip install -e '.[dev]'")


def spec(kind: str, language: str = "en", **kw) -> TaskSpec:
    values = dict(
        name="t", kind=kind, data=None, source=None, prompt="{x}", references="y", language=language
    )
    values.update(kw)
    return TaskSpec(fewshot=FewShot(), **values)


# -- ROUGE ----------------------------------------------------------------------------------------------


def test_rouge_score_default_tokenizer_drops_chinese_so_ours_splits_characters():
    default = rouge_scorer.RougeScorer(["rouge1"])
    assert (
        default.score("猫坐在垫子上", "猫坐在垫子上")["rouge1"].fmeasure == 0.0
    )  # the reason for CJKTokenizer
    assert M.CJKTokenizer().tokenize("猫坐在 GPU上, OK!") == ["猫", "坐", "在", "gpu", "上", "ok"]
    scorer = M.rouge_scorer()
    # hand-checked: prediction 猫坐在垫子上 (6), reference 猫坐在地上 (5), 4 unigrams shared (猫坐在上)
    got = M.rouge_item(scorer, "猫坐在垫子上", ["猫坐在地上"])
    assert got["rouge1"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    # bigrams: 猫坐 坐在 shared; prediction 5 bigrams, reference 4
    assert got["rouge2"] == pytest.approx(2 * (2 / 5) * (2 / 4) / (2 / 5 + 2 / 4))
    # longest common subsequence 猫坐在上 = 4, as ROUGE-1 here
    assert got["rougeL"] == pytest.approx(got["rouge1"])


def test_rouge_on_english_equals_rouge_score_called_directly():
    predictions = ["the cat sat on the mat", "a quick brown fox", "", "Transformers learn in-context."]
    references = [
        ["the cat was on the mat", "a cat sat"],
        ["the quick brown fox jumps"],
        ["anything"],
        ["transformers can learn in context", "models learn"],
    ]
    reference_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    metrics, items = score(spec("summarization"), predictions, references)
    for item, pred, refs in zip(items, predictions, references):
        expected = reference_scorer.score_multi(refs, pred)
        for name in ("rouge1", "rouge2", "rougeL"):
            assert item[name] == expected[name].fmeasure
    assert items[2] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}  # an empty prediction scores zero
    ones = [reference_scorer.score_multi(r, p)["rouge1"].fmeasure for p, r in zip(predictions, references)]
    assert metrics["rouge1"] == pytest.approx(sum(ones) / 4)
    mean = sum(ones) / 4
    assert metrics["rouge1_stderr"] == pytest.approx((sum((v - mean) ** 2 for v in ones) / 3 / 4) ** 0.5)


# -- BLEU and chrF --------------------------------------------------------------------------------------


def test_bleu_and_chrf_equal_sacrebleu_with_its_signature():
    predictions = ["The cat sat on the mat.", "He added that mice are fine.", "", "It rains."]
    references = [
        ["The cat sat on the mat."],
        ["He added that the mice were fine."],
        ["Hello."],
        ["It rained."],
    ]
    metrics, items = score(spec("translation"), predictions, references)
    refs = [[r[0] for r in references]]
    assert metrics["bleu"] == sacrebleu.corpus_bleu(predictions, refs, tokenize="13a").score
    assert metrics["chrf"] == sacrebleu.corpus_chrf(predictions, refs).score
    assert "tok:13a" in metrics["bleu_signature"] and metrics["bleu_signature"].startswith("nrefs:1|")
    assert metrics["bleu_stderr"] > 0 and metrics["n"] == 4
    assert items[2]["sentence_bleu"] == 0.0


def test_chinese_bleu_uses_the_zh_tokenizer_and_several_references():
    predictions = ["我们现在有 4 个月大的老鼠。", "他补充道。"]
    references = [["我们现在有 4 个月大没有糖尿病的老鼠。", "我们有四个月大的老鼠。"], ["他补充说。"]]
    metrics, _ = score(spec("translation", language="zh"), predictions, references)
    streams = [[r[0] for r in references], [r[1] if len(r) > 1 else None for r in references]]
    assert metrics["bleu"] == sacrebleu.corpus_bleu(predictions, streams, tokenize="zh").score
    assert metrics["bleu"] > 0
    assert "tok:zh" in metrics["bleu_signature"] and "nrefs:var" in metrics["bleu_signature"]


# -- SQuAD ----------------------------------------------------------------------------------------------
# The SQuAD v1.1 evaluation script's functions, as the reference.


def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_em(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def test_squad_exact_match_and_f1_equal_the_official_script():
    predictions = ["the Eiffel Tower", "Denver Broncos!", "", "1,000 people", "in Paris, France"]
    answers = [
        ["Eiffel Tower in Paris", "a tower"],
        ["Denver Broncos", "Broncos"],
        ["Carolina"],
        ["1000 people", "about 1,000"],
        ["Paris", "France"],
    ]
    metrics, items = score(spec("qa"), predictions, answers)
    for item, pred, golds in zip(items, predictions, answers):
        assert item["exact_match"] == max(float(ref_em(pred, g)) for g in golds)
        assert item["f1"] == pytest.approx(max(ref_f1_score(pred, g) for g in golds))
    assert items[0]["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # by hand: {eiffel, tower} of 4 gold tokens
    assert items[1]["exact_match"] == 1.0 and items[2] == {"exact_match": 0.0, "f1": 0.0}
    assert items[3]["exact_match"] == 1.0  # "1,000" loses its comma, as in the script
    assert metrics["exact_match"] == pytest.approx(100 * 2 / 5)  # the script's 0..100 scale
    assert metrics["f1"] == pytest.approx(100 * sum(it["f1"] for it in items) / 5)


def test_cmrc_exact_match_and_character_f1_by_hand():
    assert M.cmrc_segments("《战国无双3》,2018年") == ["战", "国", "无", "双", "3", ",", "2018", "年"]
    # as in the script, removed punctuation does not end a run of non-Han text: 3》，2018 -> 32018
    assert M.cmrc_segments("战国3》，2018年") == ["战", "国", "32018", "年"]
    item = M.qa_item("北京大学", ["北京", "上海"], "zh")
    assert item == {"exact_match": 0.0, "f1": pytest.approx(2 * 0.5 * 1.0 / 1.5)}  # 2 of 4 chars, all of gold
    assert M.qa_item("北京。", ["北京"], "zh") == {"exact_match": 1.0, "f1": 1.0}  # punctuation removed
    # the longest common *substring* (the CMRC script's find_lcs): 光荣 and 开发 do not add up
    assert M.qa_item("光荣公司开发", ["光荣和开发"], "zh")["f1"] == pytest.approx(
        2 * (2 / 6) * (2 / 5) / (2 / 6 + 2 / 5)
    )
    assert M.qa_item("", ["北京"], "zh") == {"exact_match": 0.0, "f1": 0.0}
    # SQuAD's F1 would see no tokens in Chinese without spaces: the CJK-aware variant is needed
    assert M.qa_item("北京大学", ["北京"], "en")["f1"] == 0.0


def test_classification_by_generated_label_word():
    s = spec("classification", labels={"0": "negative", "1": "positive"})
    metrics, items = score(
        s, ["Positive.\nmore", "neutral", "", "negative"], [["positive"]] * 3 + [["negative"]]
    )
    assert [it["acc"] for it in items] == [1.0, 0.0, 0.0, 1.0]
    assert metrics["acc"] == 0.5


def test_all_empty_predictions_score_zero_everywhere():
    refs = [["a b c"], ["d e"]]
    for kind in ("summarization", "translation", "qa"):
        metrics, _ = score(spec(kind), ["", ""], refs)
        assert all(v == 0 for k, v in metrics.items() if k not in ("n",) and not k.endswith("signature")), (
            metrics
        )


def test_scores_are_also_reported_per_language():
    predictions = ["猫坐在垫子上", "the cat sat", "北京"]
    references = [["猫坐在地上"], ["the cat sat down"], ["北京"]]
    metrics, items = score(spec("summarization"), predictions, references, ["zh", "en", "zh"])
    assert metrics["n_zh"] == 2 and metrics["n_en"] == 1
    assert metrics["rouge1_zh"] == pytest.approx((items[0]["rouge1"] + items[2]["rouge1"]) / 2)
    assert metrics["rouge1_en"] == pytest.approx(items[1]["rouge1"])
    qa, _ = score(spec("qa"), ["北京大学", "Paris"], [["北京"], ["Paris"]], ["zh", "en"])
    assert qa["f1_zh"] == pytest.approx(100 * 2 / 3) and qa["f1_en"] == 100.0


def test_a_missing_metric_package_names_the_extra(monkeypatch):
    import sys

    from lmforge.errors import ConfigError

    monkeypatch.setitem(sys.modules, "sacrebleu.metrics", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the 'sacrebleu' package.*lmforge\[eval\]"):
        score(spec("translation"), ["a"], [["a"]])


# -- edge cases, each against a hand computation or the reference implementation ------------------------


def test_kana_and_hangul_are_split_into_characters_like_han():
    assert M.CJKTokenizer().tokenize("ねこがすき cat") == ["ね", "こ", "が", "す", "き", "cat"]
    assert M.CJKTokenizer().tokenize("カタカナ고양이") == ["カ", "タ", "カ", "ナ", "고", "양", "이"]
    # prediction ねこがすき (5), reference ねこがきらい (6): ね こ が き shared
    got = M.rouge_item(M.rouge_scorer(), "ねこがすき", ["ねこがきらい"])
    assert got["rouge1"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))


def test_rouge_takes_the_best_reference_not_the_first():
    got = M.rouge_item(M.rouge_scorer(), "a b c", ["x y", "a b c", "a"])
    assert got == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}


def test_bootstrap_standard_errors_equal_a_resampling_by_hand():
    """100 resamples of the items with replacement (numpy's generator, seed 12345), corpus BLEU and chrF of
    each from sacrebleu's functions, and the sample standard deviation of those scores."""
    import numpy as np

    predictions = ["The cat sat on the mat.", "He added that mice are fine.", "It rains.", "A dog.", "Yes"]
    references = [["The cat sat on the mat."], ["He added that the mice were fine."], ["It rained."],
                  ["A dog barked."], ["No"]]  # fmt: skip
    metrics, _ = score(spec("translation"), predictions, references)
    rng = np.random.default_rng(12345)
    bleus, chrfs = [], []
    for _ in range(100):
        pick = rng.integers(0, 5, 5)
        preds, refs = [predictions[i] for i in pick], [[references[i][0] for i in pick]]
        bleus.append(sacrebleu.corpus_bleu(preds, refs, tokenize="13a").score)
        chrfs.append(sacrebleu.corpus_chrf(preds, refs).score)
    assert metrics["bleu_stderr"] == pytest.approx(float(np.std(bleus, ddof=1)), rel=1e-12)
    assert metrics["chrf_stderr"] == pytest.approx(float(np.std(chrfs, ddof=1)), rel=1e-12)


def test_sentence_bleu_equals_sacrebleus_with_effective_order():
    for pred, refs in [("the cat", ["the cat sat"]), ("a b c d e", ["a b c d e f", "b c"]), ("x", ["y"])]:
        expected = sacrebleu.sentence_bleu(pred, refs, tokenize="13a").score  # effective order by default
        assert M.sentence_bleu(pred, refs, "en") == pytest.approx(expected)
    assert M.sentence_bleu("the cat", ["the cat sat"], "en") > 10  # short, yet not scored as zero


def test_squad_normalisation_and_f1_edge_cases_equal_the_official_script():
    for text in ["an-apple", "The.End", "A-Team of the-best", "the  a an", "Ünïcode, the café!"]:
        assert M.squad_normalize(text) == ref_normalize_answer(text), text
    pairs = [
        ("cat cat dog", "cat cat"),
        ("the the cat", "cat cat cat"),
        ("an-apple", "apple"),
        ("b a", "a b"),
    ]
    for pred, gold in pairs:
        assert M.squad_f1(pred, gold) == pytest.approx(ref_f1_score(pred, gold)), (pred, gold)
        assert M.squad_em(pred, gold) == float(ref_em(pred, gold)), (pred, gold)
    assert M.squad_f1("cat cat dog", "cat cat") == pytest.approx(0.8)  # by hand: 2 shared, P 2/3, R 1


def test_qa_scores_are_the_best_over_all_gold_answers():
    assert M.qa_item("Paris", ["London", "in Paris", "Paris"], "en") == {"exact_match": 1.0, "f1": 1.0}
    assert M.qa_item("Paris France", ["London", "Paris"], "en")["f1"] == pytest.approx(2 / 3)
    assert M.qa_item("北京", ["上海", "北京"], "zh") == {"exact_match": 1.0, "f1": 1.0}


def test_cmrc_segmentation_keeps_a_trailing_non_han_run():
    assert M.cmrc_segments("北京2018 ok") == ["北", "京", "2018", "ok"]
    item = M.qa_item("北京2018", ["北京"], "zh")  # 2 of 3 predicted tokens, all of the gold
    assert item["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))
