"""Tasks scored by log-likelihood, through the scorer in ``lmforge.infer.evaluate``: multiple choice
(HellaSwag, ARC, PIQA: acc, acc_norm) and completion (LAMBADA: the continuation's perplexity, and acc =
greedy decoding reproduces the continuation exactly, as the harness's ``is_greedy``)."""

from __future__ import annotations

import math

import torch

import lmforge.infer.tasks.metrics as M
from lmforge.infer.evaluate import (
    accuracy,
    choice_loglikelihoods,
    continuation_logprobs,
    encode_pair,
    load_choice_task,
)
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, Tokenizer, generate_ids
from lmforge.infer.tasks.spec import TaskOptions, TaskResult, TaskSpec, read_items, render
from lmforge.model.transformer import Transformer


def run_loglikelihood_task(
    model: Transformer,
    tokenizer: Tokenizer,
    spec: TaskSpec,
    options: TaskOptions,
    *,
    device: torch.device,
    decoder: FastDecoder | None = None,
) -> TaskResult:
    config = {**spec.to_dict(), "num_fewshot": 0, "limit": options.limit, "batch_size": options.batch_size}
    if spec.kind == "multiple_choice":
        items = load_choice_task(spec.data, options.limit)
        lls = choice_loglikelihoods(model, tokenizer, items, device=device, batch_size=options.batch_size)
        metrics = accuracy(items, lls)
        samples = [
            {"index": i, "where": it.where, "prompt": it.context, "choices": list(it.choices),
             "references": [it.choices[it.gold]], "loglikelihoods": ll,
             "prediction": it.choices[max(range(len(ll)), key=lambda j: (ll[j], -j))]}
            for i, (it, ll) in enumerate(zip(items, lls))
        ]  # fmt: skip
        return TaskResult(spec.name, spec.kind, metrics, config, samples)
    items = read_items(spec, limit=options.limit)
    contexts = [render(spec.prompt, it.record, it.where) for it in items]
    continuations = [render(spec.answer or "{" + spec.references + "}", it.record, it.where) for it in items]
    pairs = [encode_pair(tokenizer, c, t) for c, t in zip(contexts, continuations)]
    lls = continuation_logprobs(model, pairs, device=device, batch_size=options.batch_size)
    hits = []
    window = model.cfg.max_seq_len
    for first in range(0, len(pairs), options.batch_size):
        group = pairs[first : first + options.batch_size]
        longest = max(len(target) for _, target in group)
        prompts = [context[-(window - longest) :] for context, _ in group]
        result = generate_ids(
            model, prompts, SamplingConfig(max_new_tokens=longest, temperature=0.0), device=device,
            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, decoder=decoder,
        )  # fmt: skip
        hits += [float(out[: len(t)] == t) for out, (_, t) in zip(result.tokens, group)]
    acc, acc_stderr = M.mean_stderr(hits)
    n_tokens = sum(len(t) for _, t in pairs)
    metrics = {
        "acc": acc,
        "acc_stderr": acc_stderr,
        "perplexity": math.exp(min(-sum(lls) / len(lls), 700.0)),  # the harness's: exp of the mean item NLL
        "tokens": n_tokens,
        "n": len(items),
    }
    samples = [
        {"index": i, "where": it.where, "prompt": contexts[i], "references": [continuations[i]],
         "scores": {"loglikelihood": lls[i], "is_greedy": hits[i]}}
        for i, it in enumerate(items)
    ]  # fmt: skip
    return TaskResult(spec.name, spec.kind, metrics, config, samples)
