"""Run one task on a model: build the prompts (few-shot examples, optional chat template, left-cut
documents), generate in batches with the KV cache, cut each prediction at the first stop string, score it.

Few-shot examples follow lm-evaluation-harness's layout: each example's prompt and answer, examples and the
query separated by a blank line. They are drawn with a fixed seed (per item: ``Random(seed * 1_000_003 +
index)``), so every model sees the same prompts, from the spec's few-shot file or else from the task's own
file with the item itself excluded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

import lmforge.infer.tasks.metrics as M
from lmforge.errors import ConfigError, DataError
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, TextTracker, Tokenizer, check_sampling, generate_ids
from lmforge.infer.tasks.spec import GENERATIVE, Item, TaskOptions, TaskResult, TaskSpec, read_items, render
from lmforge.model.transformer import Transformer

FEWSHOT_DELIMITER = "\n\n"
RenderChat = Callable[[list[dict]], str]  # messages [{"role", "content"}] -> the prompt string


def fewshot_examples(index: int, k: int, pool: Sequence[Item], same_file: bool, seed: int) -> list[Item]:
    """``k`` examples for item ``index``, the same for every model; never the item itself."""
    if k == 0:
        return []
    candidates = [i for i in range(len(pool)) if not (same_file and i == index)]
    if len(candidates) < k:
        raise DataError(f"{k}-shot needs {k} examples, but only {len(candidates)} are available")
    rng = random.Random(seed * 1_000_003 + index)
    return [pool[i] for i in rng.sample(candidates, k)]


def build_prompt(
    spec: TaskSpec, item: Item, examples: Sequence[Item], chat: bool, render_chat: RenderChat | None
) -> str:
    """The harness layout (examples and query separated by a blank line) or, for chat, alternating turns."""
    query = render(spec.prompt, item.record, item.where)
    if chat:
        if render_chat is None:
            raise ConfigError(
                f"task {spec.name!r} asks for the chat template, but none was given: pass render_chat "
                f"(the model's template from lmforge.infer.chat) or run without chat"
            )
        messages = []
        for ex in examples:
            messages.append({"role": "user", "content": render(spec.prompt, ex.record, ex.where)})
            messages.append(
                {"role": "assistant", "content": render(spec.answer, ex.record, ex.where).strip()}
            )
        messages.append({"role": "user", "content": query})
        return render_chat(messages)
    shots = [
        render(spec.prompt, ex.record, ex.where) + render(spec.answer, ex.record, ex.where) for ex in examples
    ]
    return FEWSHOT_DELIMITER.join([*shots, query])


def fit_prompt(
    spec: TaskSpec,
    item: Item,
    build: Callable[[Item], str],
    tokenizer: Tokenizer,
    budget: int,
    encode: Callable[[str], list[int]] | None = None,
) -> tuple[str, list[int], bool]:
    """The prompt, its ids (by ``encode``, default ``tokenizer.encode``) and whether it was cut: a prompt
    over ``budget`` tokens loses the start of its document field (the fewest characters that make it fit);
    without one, or if that is not enough, its first tokens."""
    encode = encode or tokenizer.encode
    prompt = build(item)
    ids = encode(prompt)
    if len(ids) <= budget:
        return prompt, ids, False
    document = item.record.get(spec.document) if spec.document else None
    if isinstance(document, str) and document:

        def with_cut(n: int) -> tuple[str, list[int]]:
            text = build(Item({**item.record, spec.document: document[n:]}, item.where))
            return text, encode(text)

        low, high = 1, len(document)
        text, cut_ids = with_cut(high)
        if len(cut_ids) <= budget:
            while low < high:  # the smallest cut that fits
                mid = (low + high) // 2
                if len(with_cut(mid)[1]) <= budget:
                    high = mid
                else:
                    low = mid + 1
            text, cut_ids = with_cut(high)
            return text, cut_ids, True
    ids = ids[-budget:]
    return tokenizer.decode(ids), ids, True


# -- generation ------------------------------------------------------------------------------------------


def generate_batched(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    sampling: SamplingConfig,
    *,
    device: torch.device,
    batch_size: int,
    decoder: FastDecoder | None = None,
) -> list[str]:
    """Continue every prompt (ids), ``batch_size`` at a time, longest first (less padding), each cut at the
    first stop string; the texts come back in prompt order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        trackers = [TextTracker(tokenizer, sampling.stop) for _ in rows]

        def on_token(row: int, tokens: list[int], trackers=trackers) -> bool:
            trackers[row].update(tokens)
            return trackers[row].stopped

        result = generate_ids(
            model,
            [prompts[i] for i in rows],
            sampling,
            device=device,
            eos_id=tokenizer.eot_id,
            pad_id=pad_id,
            on_token=on_token if sampling.stop else None,
            decoder=decoder,
        )
        for r, i in enumerate(rows):
            texts[i] = trackers[r].text if sampling.stop else tokenizer.decode(result.tokens[r])
    return texts


# -- scoring --------------------------------------------------------------------------------------------


def score(
    spec: TaskSpec,
    predictions: Sequence[str],
    references: Sequence[list[str]],
    languages: Sequence[str] | None = None,
) -> tuple[dict, list[dict]]:
    """(task metrics, per-item scores) of stripped predictions against their references. With items in
    several ``languages`` (summarization, qa) each mean is also given per language (``rouge1_zh``)."""
    preds = [p.strip() for p in predictions]
    n = len(preds)
    languages = list(languages) if languages is not None else [spec.language] * n
    if spec.kind == "translation":
        items = [{"sentence_bleu": M.sentence_bleu(p, r, spec.language)} for p, r in zip(preds, references)]
        return {**M.bleu_chrf(preds, references, spec.language), "n": n}, items
    if spec.kind == "summarization":
        scorer = M.rouge_scorer()
        items = [M.rouge_item(scorer, p, r) for p, r in zip(preds, references)]
        names, scale = M.ROUGE_TYPES, 1.0  # rouge-score's scale, 0..1
    elif spec.kind == "qa":
        items = [M.qa_item(p, r, lang) for p, r, lang in zip(preds, references, languages)]
        names, scale = ("exact_match", "f1"), 100.0  # the SQuAD and CMRC scripts' scale, 0..100
    elif spec.kind == "classification":
        words = sorted(set(spec.labels.values()))
        items = []
        for p, r in zip(preds, references):
            label = M.label_of(p, words)
            items.append({"acc": float(label == r[0]), "label": label})
        names, scale = ("acc",), 1.0
    else:
        raise AssertionError(spec.kind)
    out: dict = {}
    for name in names:
        mean, stderr = M.mean_stderr([it[name] for it in items])
        out[name], out[f"{name}_stderr"] = mean * scale, stderr * scale
    out["n"] = n
    if len(set(languages)) > 1:
        for lang in sorted(set(languages)):
            own = [it for it, item_lang in zip(items, languages) if item_lang == lang]
            for name in names:
                mean, stderr = M.mean_stderr([it[name] for it in own])
                out[f"{name}_{lang}"], out[f"{name}_{lang}_stderr"] = mean * scale, stderr * scale
            out[f"n_{lang}"] = len(own)
    return out, items


# -- one task --------------------------------------------------------------------------------------------


def run_task(
    model: Transformer,
    tokenizer: Tokenizer,
    spec: TaskSpec,
    options: TaskOptions = TaskOptions(),  # noqa: B008 (frozen)
    *,
    device: torch.device,
    render_chat: RenderChat | None = None,
    encode_chat: Callable[[str], list[int]] | None = None,
    decoder: FastDecoder | None = None,
) -> TaskResult:
    """Measure ``model`` on ``spec``. ``render_chat`` turns messages into a prompt with the model's chat
    template; it is needed when the spec or ``options.chat`` asks for chat. ``encode_chat`` encodes such a
    prompt (special-token texts to their ids; default ``tokenizer.encode``). ``decoder``: the fast decoding
    step of ``model`` (``infer.fast``); None decodes on the eager path."""
    if spec.kind not in GENERATIVE:
        from lmforge.infer.tasks.choice import run_loglikelihood_task

        return run_loglikelihood_task(model, tokenizer, spec, options, device=device, decoder=decoder)
    k = spec.fewshot.k if options.num_fewshot is None else options.num_fewshot
    chat = spec.chat if options.chat is None else options.chat
    max_new = options.max_new_tokens or spec.max_new_tokens
    sampling = SamplingConfig(
        max_new_tokens=max_new, temperature=options.temperature, stop=spec.stop, seed=options.seed
    )
    check_sampling(sampling)
    budget = model.cfg.max_seq_len - max_new
    if budget < 1:
        raise ConfigError(
            f"task {spec.name!r}: max_new_tokens={max_new} leaves no room for a prompt in the model's "
            f"{model.cfg.max_seq_len}-token context"
        )
    items = read_items(spec, limit=options.limit)
    same_file = spec.fewshot.data is None
    pool = (
        (items if options.limit is None else read_items(spec))
        if same_file
        else read_items(spec, spec.fewshot.data)
    )

    def build(item: Item, index: int) -> str:
        examples = fewshot_examples(index, k, pool, same_file, spec.fewshot.seed)
        return build_prompt(spec, item, examples, chat, render_chat)

    prompts, ids, truncated = [], [], 0
    for index, item in enumerate(items):
        text, prompt_ids, cut = fit_prompt(
            spec, item, lambda it, i=index: build(it, i), tokenizer, budget, encode_chat if chat else None
        )
        prompts.append(text)
        ids.append(prompt_ids)
        truncated += cut
    predictions = generate_batched(
        model, tokenizer, ids, sampling, device=device, batch_size=options.batch_size, decoder=decoder
    )
    references = [item.references(spec) for item in items]
    languages = [item.language(spec) for item in items]
    if spec.kind == "translation" and len(set(languages)) > 1:
        raise ConfigError(f"task {spec.name!r}: a translation task has one target language (use language:)")
    metrics, item_scores = score(spec, predictions, references, languages)
    metrics["truncated"] = truncated
    samples = [
        {
            "index": i,
            "where": item.where,
            "id": item.record.get("id"),
            "prompt": prompts[i],
            "prediction": predictions[i],
            "references": references[i],
            "scores": item_scores[i],
        }
        for i, item in enumerate(items)
    ]
    config = {
        **spec.to_dict(),
        "num_fewshot": k,
        "chat": chat,
        "limit": options.limit,
        "max_new_tokens": max_new,
        "temperature": options.temperature,
        "seed": options.seed,
        "batch_size": options.batch_size,
    }
    return TaskResult(name=spec.name, kind=spec.kind, metrics=metrics, config=config, samples=samples)
