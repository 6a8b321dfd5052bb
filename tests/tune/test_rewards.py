"""Verifiable rewards: answers read as GSM8K and chat models write them, math equivalence, the format and
length rewards, user rewards by import path, and code run only in a limited separate process."""

from __future__ import annotations

import json
import os
import time

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.tune import rewards as R
from tests.conftest import require_module, require_shared_data


def half_reward(completions, records, **info):  # a user reward, imported by --reward tests...:half_reward
    return [0.5] * len(completions)


def wrong_count_reward(completions, records, **info):
    return [1.0]


def test_answers_are_read_in_each_convention():
    assert R.extract_answer("so <answer> 42 </answer>") == "42"
    assert R.extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert R.extract_answer("16 - 3 - 4 = 9 eggs\n#### 18") == "18"
    assert R.extract_answer(r"thus \boxed{\frac{1}{2}} is it") == r"\frac{1}{2}"
    assert R.extract_answer("  plain  ") == "plain"


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("<answer>1,234</answer>", "#### 1234", 1.0),
        ("<answer>Paris.</answer>", "paris", 1.0),
        ("<answer>New   York</answer>", "new york", 1.0),
        ("<answer>12</answer>", "#### 18", 0.0),
        ("<answer>0.5</answer>", "1/2", 0.0),  # exact is not math
    ],
)
def test_exact_reward(completion, gold, expected):
    assert R.exact_reward([completion], [{"answer": gold}]) == [expected]


def test_math_reward_knows_equivalent_forms():
    require_module("math_verify", "rl")
    completions = [
        r"<answer>\frac{1}{2}</answer>",
        "<answer>0.5</answer>",
        "<answer>2/4</answer>",
        "<answer>0.6</answer>",
    ]
    assert R.math_reward(completions, [{"answer": "#### 0.5"}] * 4) == [1.0, 1.0, 1.0, 0.0]


def test_math_reward_on_gsm8k_solutions():
    """The shared GSM8K records as they are: the gold worked solution scores 1 against itself, and a
    completion with the right final number in a think/answer layout scores 1; an off-by-one scores 0."""
    require_module("math_verify", "rl")
    path = require_shared_data("rl/gsm8k_test.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:20]]
    golds = [R.extract_answer(r["answer"]) for r in records]
    right = [f"<think>work</think><answer>{g}</answer>" for g in golds]
    off = [f"<answer>{int(g.replace(',', '')) + 1}</answer>" for g in golds]
    assert R.math_reward([r["answer"] for r in records], records) == [1.0] * 20
    assert R.math_reward(right, records) == [1.0] * 20
    assert R.math_reward(off, records) == [0.0] * 20


def test_format_reward():
    good = "<think>a\nb</think>\n<answer>3</answer>"
    assert R.format_reward(
        [good, "<answer>3</answer>", good + " extra", "<think></think><answer></answer>"], [{}] * 4
    ) == [
        1.0,
        0.0,
        0.0,
        1.0,
    ]


def test_length_reward_is_dapos_soft_overlong_penalty():
    scores = R.length_reward(["x"] * 5, [{}] * 5, completion_lengths=[10, 80, 90, 100, 120], max_length=100)
    assert scores == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_code_reward_runs_in_a_limited_separate_process(tmp_path, monkeypatch):
    tests = "assert add(2, 3) == 5"
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "no code at all",
        "```python\nimport os\nopen('written.txt', 'w').write('x')\ndef add(a, b):\n    return a + b\n```",
    ]
    here = set(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert R.code_reward(completions, [{"tests": tests}] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert set(os.listdir(tmp_path)) == here  # it ran in its own temporary folder
    assert "add" not in globals()


def test_code_that_hangs_or_hogs_memory_fails_within_its_limits():
    start = time.perf_counter()
    assert not R.run_untrusted_python("while True: pass", timeout=1.0)
    assert time.perf_counter() - start < 5
    assert not R.run_untrusted_python("x = bytearray(2 * 1024**3)")  # beyond the 512 MiB address space
    assert R.run_untrusted_python("x = bytearray(10 * 1024**2)")
    assert not R.run_untrusted_python("import os; print(os.environ.get('HOME'))\nimport sys; sys.exit(3)")


def test_reward_specs():
    exact = R.parse_reward("exact")
    assert (exact.name, exact.weight) == ("exact", 1.0)
    user = R.parse_reward("tests.tune.test_rewards:half_reward=0.25")
    assert (user.name, user.weight) == ("tests.tune.test_rewards:half_reward", 0.25)
    scores = R.score([exact, user], ["<answer>4</answer>", "<answer>5</answer>"], [{"answer": "4"}] * 2)
    assert scores == {"exact": [1.0, 0.0], "tests.tune.test_rewards:half_reward": [0.5, 0.5]}
    assert R.total([exact, user], scores) == [1.125, 0.125]
    with pytest.raises(ConfigError, match="did you mean 'exact'"):
        R.parse_reward("exakt")
    with pytest.raises(ConfigError, match="weight after '=' must be a number"):
        R.parse_reward("exact=high")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        R.parse_reward("tests.tune.test_rewards:nope")
    with pytest.raises(ConfigError, match="cannot import"):
        R.parse_reward("no_such_module_xyz:f")
    bad = R.parse_reward("tests.tune.test_rewards:wrong_count_reward")
    with pytest.raises(DataError, match="returned 1 scores for 2 completions"):
        R.score([bad], ["a", "b"], [{}, {}])
    with pytest.raises(DataError, match="needs an 'answer' field; record 0"):
        R.exact_reward(["a"], [{"question": "q"}])
