"""Verifiable rewards: programs that score completions, for reinforcement learning (``tune.grpo``).

A reward function takes a batch of completions and the JSONL records of their prompts, and returns one float
per completion::

    def my_reward(completions: list[str], records: list[dict], **info) -> list[float]: ...

``info`` holds ``completion_lengths`` (tokens of each completion) and ``max_length`` (the generation budget);
a function that needs neither takes ``**info`` and ignores it. On the command line a reward is named
``NAME[=WEIGHT]``: a built-in below, or ``package.module:function`` for a user's own (imported from the
user's environment, like any training code). Several rewards are summed with their weights.

Built-ins (the record's answer is its ``answer`` field):
- ``exact``: 1 when the completion's answer equals the record's after normalisation (case, spaces, a
  trailing period, thousands separators), else 0;
- ``math``: 1 when the two are mathematically equivalent (``math-verify``: LaTeX, fractions, sets,
  intervals, units of the answer), else 0;
- ``format``: 1 when the completion is a ``<think>...</think>`` block followed by an ``<answer>...</answer>``
  block and nothing else, else 0;
- ``length``: DAPO's soft overlong penalty: 0 up to ``max_length - 20%``, falling linearly to -1 at
  ``max_length``;
- ``code``: 1 when the completion's last fenced Python block, followed by the record's ``tests`` (Python
  source, e.g. asserts), exits 0 in a separate process with time, memory and output limits; else 0. The
  code never runs in the trainer's process.

The answer of a completion is the text of its last ``<answer>`` block, else what follows its last ``####``
(GSM8K's convention), else the argument of its last ``\\boxed{}``, else the whole completion; a record's answer
is read the same way, so GSM8K's worked solutions ("... #### 18") can be used as they are.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmforge.errors import ConfigError, DataError

RewardFn = Callable[..., Sequence[float]]

ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
THINK_THEN_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
OVERLONG_FRACTION = 0.2  # DAPO: the last 20% of the budget is the soft-penalty zone

CODE_TIMEOUT_S = 5.0
CODE_MEMORY_BYTES = 512 * 2**20
CODE_OUTPUT_BYTES = 64 * 1024


def extract_answer(text: str) -> str:
    """The answer a text gives (see the module docstring for the order of conventions)."""
    blocks = ANSWER_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return text.strip()


def _last_boxed(text: str) -> str | None:
    """The argument of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def normalise(answer: str) -> str:
    answer = " ".join(answer.lower().split())
    answer = answer.rstrip(".").strip()
    if re.fullmatch(r"[-+]?\$?[\d,]+(\.\d+)?", answer):  # 1,234 / $1,234.50: a number
        answer = answer.replace(",", "").replace("$", "")
    return answer


def _answers(records: Sequence[dict], name: str) -> list[str]:
    out = []
    for i, record in enumerate(records):
        if "answer" not in record:
            raise DataError(f"reward {name!r} needs an 'answer' field; record {i} has {sorted(record)}")
        out.append(extract_answer(str(record["answer"])))
    return out


def exact_reward(completions: Sequence[str], records: Sequence[dict], **info) -> list[float]:
    gold = _answers(records, "exact")
    return [float(normalise(extract_answer(c)) == normalise(g)) for c, g in zip(completions, gold)]


def math_reward(completions: Sequence[str], records: Sequence[dict], **info) -> list[float]:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError("the 'math' reward needs math-verify: pip install 'lmforge[rl]'") from None
    out = []
    for completion, gold in zip(completions, _answers(records, "math")):
        try:
            ok = verify(parse(gold), parse(extract_answer(completion)))
        except Exception:  # an answer the parser cannot read is simply not equivalent
            ok = False
        out.append(float(ok))
    return out


def format_reward(completions: Sequence[str], records: Sequence[dict], **info) -> list[float]:
    return [float(THINK_THEN_ANSWER.fullmatch(c) is not None) for c in completions]


def length_reward(completions: Sequence[str], records: Sequence[dict], **info) -> list[float]:
    lengths, budget = info.get("completion_lengths"), info.get("max_length")
    if lengths is None or budget is None:
        raise ConfigError("the 'length' reward needs completion_lengths and max_length")
    zone = max(1.0, OVERLONG_FRACTION * budget)
    return [min(0.0, max(-1.0, (budget - zone - n) / zone)) for n in lengths]


def _limit_child() -> None:  # runs in the child before exec: its own limits, its own session
    import resource

    os.setsid()
    resource.setrlimit(resource.RLIMIT_AS, (CODE_MEMORY_BYTES, CODE_MEMORY_BYTES))
    cpu = math.ceil(CODE_TIMEOUT_S)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CODE_OUTPUT_BYTES, CODE_OUTPUT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_untrusted_python(source: str, timeout: float = CODE_TIMEOUT_S) -> bool:
    """True when ``source`` exits 0 in a fresh, isolated interpreter (``-I``: no user site, no environment
    variables) in an empty temporary folder, within ``timeout`` seconds of wall time, the CPU-time and
    memory limits, and an empty environment. Never in this process."""
    with tempfile.TemporaryDirectory(prefix="lmforge-reward-") as folder:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", source],
                cwd=folder,
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                preexec_fn=_limit_child,
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def code_reward(completions: Sequence[str], records: Sequence[dict], **info) -> list[float]:
    out = []
    for i, (completion, record) in enumerate(zip(completions, records)):
        if "tests" not in record:
            raise DataError(f"reward 'code' needs a 'tests' field; record {i} has {sorted(record)}")
        blocks = CODE_BLOCK.findall(completion)
        out.append(float(bool(blocks) and run_untrusted_python(blocks[-1] + "\n" + str(record["tests"]))))
    return out


BUILT_IN: dict[str, RewardFn] = {
    "exact": exact_reward,
    "math": math_reward,
    "format": format_reward,
    "length": length_reward,
    "code": code_reward,
}


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def parse_reward(spec: str) -> Reward:
    """``NAME[=WEIGHT]``: a built-in or ``module:function``; an error names what is wrong."""
    name, _, weight_text = spec.partition("=")
    name = name.strip()
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise ConfigError(f"--reward {spec!r}: the weight after '=' must be a number") from None
    if not math.isfinite(weight):
        raise ConfigError(f"--reward {spec!r}: the weight must be finite")
    if name in BUILT_IN:
        return Reward(name, BUILT_IN[name], weight)
    if ":" not in name:
        import difflib

        close = difflib.get_close_matches(name, BUILT_IN, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"--reward {name!r} is neither a built-in ({', '.join(BUILT_IN)}) nor module:function{hint}"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--reward {name!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--reward {name!r}: {module_name} has no function {attr!r}")
    return Reward(name, fn, weight)


def score(
    rewards: Sequence[Reward], completions: Sequence[str], records: Sequence[dict], **info
) -> dict[str, list[float]]:
    """Each reward's scores of the completions, checked (one finite float per completion)."""
    out = {}
    for reward in rewards:
        values = list(reward.fn(list(completions), list(records), **info))
        if len(values) != len(completions):
            raise DataError(
                f"reward {reward.name!r} returned {len(values)} scores for {len(completions)} completions"
            )
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(f"reward {reward.name!r} returned a score that is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"reward {reward.name!r} returned a score that is not finite")
        out[reward.name] = values
    return out


def total(rewards: Sequence[Reward], scores: dict[str, list[float]]) -> list[float]:
    """The weighted sum of the rewards, per completion."""
    n = len(next(iter(scores.values()))) if scores else 0
    return [sum(r.weight * scores[r.name][i] for r in rewards) for i in range(n)]
