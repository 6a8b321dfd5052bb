"""Multiple choice with a real byte-level BPE, where the context/continuation split changes the tokens.

The reference is transformers end to end: the model exported by lmforge's export and the exported tokenizer,
both loaded by transformers; the pair is split the harness's way here, independently of lmforge: trailing
whitespace of the context moves onto the continuation, ``encode(context)`` and ``encode(context +
continuation)`` are taken, and the continuation is the difference; a pair longer than the window keeps its
last ``max_seq_len + 1`` tokens.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config
from lmforge.convert import export_model
from lmforge.data.tokenizer import load_tokenizer, train_bpe
from lmforge.infer.evaluate import choice_loglikelihoods, evaluate_choice_task, load_choice_task
from lmforge.infer.suite import task_metrics
from lmforge.model.transformer import build_model
from tests.conftest import require_transformers

from .conftest import tiny_config

CPU = torch.device("cpu")
WINDOW = 24  # the model's context: the long items below are cut on the left
WORDS = (
    "the boy man cook dog cat fries jumps runs sits pan egg fence over and a sings stops smiles crowd "
    "violin plays heavier lead feather ton which is answer question"
).split()

RECORDS = [
    # no trailing space: " fries", " pan" are one token each, the space merged into the word
    {"query": "The cook", "choices": ["fries the egg", "pan", "sings over the fence"], "gold": 1},
    # a trailing space moves onto the continuation: "  jumps" is [" ", " jumps"] after "Answer:"
    {"query": "Answer: the boy ", "choices": ["jumps", "runs and sits", "zqxjv"], "gold": 1},
    # a trailing newline moves too: "\n a ton" is ["\n", " a", " ton"]
    {"query": "Question: which is heavier?\n", "choices": ["a ton of lead", "a feather"], "gold": 1},
    # whitespace only: the context becomes end-of-text and the whole "  ending" is the continuation
    {"query": "  ", "choices": ["the dog", "smiles", "a violin plays"], "gold": 2},
    # longer than the window: the scorer keeps the last WINDOW + 1 tokens of context + continuation
    {
        "activity_label": "Music",
        "ctx": "The man plays a violin and the crowd smiles. the dog sings over the fence and the cat",
        "endings": ["stops", "jumps over the fence and runs", "is heavier than a ton of lead", "qq"],
        "label": 0,
    },
    {
        "query": "the boy runs and the man sits and the cook fries a egg and the dog jumps over the ",
        "choices": ["fence", "pan and the crowd smiles", "feather"],
        "gold": 1,
    },
]


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(lmforge model, lmforge tokenizer, transformers model, transformers tokenizer): one random model with
    a BPE trained here, saved as a checkpoint and exported by lmforge."""
    transformers = require_transformers()
    tmp = tmp_path_factory.mktemp("choice_bpe")
    tok_file = train_bpe(corpus(), 400).save(tmp / "tok" / "tokenizer.json")
    tokenizer = load_tokenizer(tok_file)
    model = build_model(tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=WINDOW), seed=5).eval()
    ckpt = save_checkpoint(
        tmp / "ckpt", model_state=model.state_dict(), config=Config(model=model.cfg), tokenizer_file=tok_file
    )
    export_model(ckpt, tmp / "hf", verify=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    return model, tokenizer, hf, hf_tok


def harness_split(hf_tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's pair encoding, with transformers' tokenizer."""
    encode = lambda text: hf_tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    if not context:
        return [hf_tok.eos_token_id], encode(continuation)
    whole, context_ids = encode(context + continuation), encode(context)
    assert whole[: len(context_ids)] == context_ids  # the BPE's pre-tokenizer splits before the space
    return context_ids, whole[len(context_ids) :]


def reference_loglikelihood(hf, hf_tok, context: str, ending: str) -> tuple[float, int, int]:
    """(summed log P(" " + ending | context), continuation tokens, pair tokens) from transformers' logits."""
    context_ids, continuation = harness_split(hf_tok, context, " " + ending)
    pair = context_ids + continuation
    ids = pair[-(WINDOW + 1) :]
    with torch.no_grad():
        logprobs = hf(torch.tensor([ids[:-1]])).logits.double().log_softmax(-1)[0]  # (T, V)
    first = len(ids) - len(continuation)  # the first continuation token's position in ids
    picked = sum(logprobs[first + j - 1, tok].item() for j, tok in enumerate(continuation))
    return picked, len(continuation), len(pair)


def test_the_items_exercise_the_split(exported):
    """The fixture does what the test below relies on: merged leading spaces, a moved space, truncation."""
    _, tokenizer, _, hf_tok = exported
    assert hf_tok("the boy fries", add_special_tokens=False)["input_ids"] == tokenizer.encode("the boy fries")
    assert [hf_tok.convert_ids_to_tokens(i) for i in tokenizer.encode(" fries pan")] == ["Ġfries", "Ġpan"]
    context, continuation = harness_split(hf_tok, "Answer: the boy ", " jumps")
    assert hf_tok.convert_ids_to_tokens(continuation) == ["Ġ", "Ġjumps"]
    # without moving the space, the context would end in "Ġ" and the continuation lose a token
    assert tokenizer.encode("Answer: the boy ")[-1] == tokenizer.encode(" ")[0]


def test_bpe_loglikelihoods_acc_and_acc_norm_match_transformers(exported, tmp_path):
    model, tokenizer, hf, hf_tok = exported
    path = tmp_path / "mc_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    items = load_choice_task(path)
    assert items[3].context == "  " and items[4].context.startswith("Music: The man plays")

    ours = choice_loglikelihoods(model, tokenizer, items, device=CPU, batch_size=4)
    hits, hits_norm, norm_by_tokens, longest = [], [], [], 0
    for item, lls in zip(items, ours):
        reference = [reference_loglikelihood(hf, hf_tok, item.context, c) for c in item.choices]
        lls_ref = [ll for ll, _, _ in reference]
        longest = max([longest] + [length for _, _, length in reference])
        assert max(abs(a - b) for a, b in zip(lls, lls_ref)) <= 1e-4, (item.where, lls, lls_ref)
        hits.append(int(np.argmax(lls_ref)) == item.gold)
        hits_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls_ref, item.choices)])) == item.gold)
        norm_by_tokens.append(int(np.argmax([ll / n for ll, n, _ in reference])) == item.gold)
    assert longest > WINDOW + 1  # some pairs were cut on the left
    # acc_norm divides by characters, not tokens: with this BPE the two differ on these items
    assert hits_norm != norm_by_tokens

    n = len(items)
    assert 0 < sum(hits) < sum(hits_norm) < n  # the golds are set so that acc and acc_norm differ
    result = evaluate_choice_task(model, tokenizer, path, device=CPU, batch_size=3)
    assert (result["acc"], result["acc_norm"], result["n"]) == (sum(hits) / n, sum(hits_norm) / n, n)
    metrics = task_metrics(model, tokenizer, [path], device=CPU, batch_size=5)
    assert metrics == {"mc/acc": sum(hits) / n, "mc/acc_norm": sum(hits_norm) / n}
