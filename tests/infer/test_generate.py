"""Generation: the KV cache changes nothing, transformers agrees token for token, sampling filters are exact."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.infer.generate import (
    SamplingConfig,
    apply_repetition_penalty,
    filter_top_k_top_p,
    generate,
    generate_ids,
)
from tests.conftest import require_transformers

from .conftest import ByteTokenizer, hf_llama, tiny_model

CPU = torch.device("cpu")
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 101, 102], [33] * 12, [7]]


def hf_greedy(hf, prompts, max_new_tokens):
    """transformers' greedy generate on a left-padded batch: the independent reference."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), 256)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return [row[longest:].tolist() for row in out]


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_greedy_cache_equals_no_cache_and_transformers(n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads)
    with_cache = generate_ids(model, PROMPTS, GREEDY, device=CPU).tokens
    without_cache = generate_ids(model, PROMPTS, GREEDY, device=CPU, use_cache=False).tokens
    one_by_one = [generate_ids(model, [p], GREEDY, device=CPU).tokens[0] for p in PROMPTS]
    assert with_cache == without_cache == one_by_one
    assert all(len(t) == GREEDY.max_new_tokens for t in with_cache)
    hf = hf_llama(model)
    assert hf_greedy(hf, PROMPTS, GREEDY.max_new_tokens) == with_cache
    assert hf_greedy(hf, PROMPTS[:1], GREEDY.max_new_tokens) == with_cache[:1]


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_cache_equals_no_cache_for_absolute_positions(position):
    model = tiny_model(position=position, ffn="gelu", norm="layernorm", bias=True, n_kv_heads=None)
    a = generate_ids(model, PROMPTS, GREEDY, device=CPU).tokens
    assert a == generate_ids(model, PROMPTS, GREEDY, device=CPU, use_cache=False).tokens


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model()
    sampled = SamplingConfig(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    first = generate_ids(model, PROMPTS, sampled, device=CPU).tokens
    assert first == generate_ids(model, PROMPTS, sampled, device=CPU).tokens
    assert first == generate_ids(model, PROMPTS, sampled, device=CPU, use_cache=False).tokens
    top1 = SamplingConfig(max_new_tokens=16, temperature=1.3, top_k=1, seed=0)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    assert (
        generate_ids(model, PROMPTS, top1, device=CPU).tokens
        == generate_ids(model, PROMPTS, greedy, device=CPU).tokens
    )


def test_top_k_top_p_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.8).isfinite()
    # row 0: 0.5 + 0.3 reaches 0.8, so {0, 2}; row 1: three quarters are needed to pass 0.7... 0.8 needs 4
    assert kept.tolist() == [[True, False, True, False], [True, True, True, True]]
    kept = filter_top_k_top_p(logits, top_k=2, top_p=1.0).isfinite()
    assert kept[0].tolist() == [True, False, True, False]
    # a top_p that is 0 in float32 still keeps the most likely token (it used to drop every token, and
    # sampling from all -inf failed)
    kept = filter_top_k_top_p(logits, top_k=0, top_p=1e-300).isfinite()
    assert kept[0].tolist() == [True, False, False, False] and int(kept[1].sum()) == 1  # row 1: a tie


def test_repetition_penalty_matches_transformers():
    transformers = require_transformers()
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    ids = torch.tensor([[1, 3, 3], [0, 9, 4]])
    seen = torch.zeros(2, 10, dtype=torch.bool).scatter(1, ids, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7), expected)


def test_repetition_penalty_in_generation_matches_transformers():
    model = tiny_model()
    hf = hf_llama(model)
    prompt = [5, 6, 7, 5, 6]
    ours = generate_ids(
        model,
        [prompt],
        SamplingConfig(max_new_tokens=20, temperature=0.0, repetition_penalty=1.5),
        device=CPU,
    ).tokens[0]
    theirs = hf.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, 5, dtype=torch.long),
        max_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.5,
    )[0, 5:].tolist()
    assert ours == theirs


def test_stop_strings_eos_and_streaming():
    model, tokenizer = tiny_model(), ByteTokenizer()
    prompt = "The cat "
    full = generate(
        model, tokenizer, [prompt], SamplingConfig(max_new_tokens=30, temperature=0.0), device=CPU
    )[0]
    # pick a stop string from the middle of the free-running output
    tokens = full.tokens
    stop = tokenizer.decode(tokens[10:12])
    expected = tokenizer.decode(tokens)[: tokenizer.decode(tokens).find(stop)]
    streamed: list[str] = []
    sampling = SamplingConfig(max_new_tokens=30, temperature=0.0, stop=(stop,))
    out = generate(
        model, tokenizer, [prompt], sampling, device=CPU, on_text=lambda row, t: streamed.append(t)
    )[0]
    assert out.finish_reason == "stop" and out.text == expected and "".join(streamed) == expected
    # end-of-text ends a row and is not part of the output
    eos = tokens[7]
    ids = generate_ids(model, [tokenizer.encode(prompt)], GREEDY, device=CPU, eos_id=eos)
    assert ids.tokens[0] == tokens[: tokens.index(eos)] and ids.finish_reasons == ["eos"]


def test_context_limit_ends_generation():
    model = tiny_model()  # max_seq_len 64
    out = generate_ids(
        model, [[1] * 60, [2] * 10], SamplingConfig(max_new_tokens=10, temperature=0), device=CPU
    )
    assert [len(t) for t in out.tokens] == [4, 4] and out.finish_reasons[0] == "context"


def test_bad_prompts_are_named():
    model, tokenizer = tiny_model(), ByteTokenizer()
    with pytest.raises(DataError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["hi", ""], GREEDY, device=CPU)
    with pytest.raises(DataError, match="prompt 0 is 70 tokens.*context is 64"):
        generate(model, tokenizer, ["x" * 70], GREEDY, device=CPU)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, tokenizer, ["hi"], SamplingConfig(top_p=0.0), device=CPU)
