"""Claim: for `lmforge serve`'s constrained decoding (response_format, forced tool calls), on lmforge's
tokenizers, xgrammar and llguidance both compile a schema in 1-2 ms (outlines-core takes 15 s for json_object);
xgrammar's per-token mask is about 1.5x faster than llguidance's on bounded schemas and llguidance's is faster
on json_object; the grammar work is ~2% of a serve decoding step either way. The `serve` extra takes
llguidance: its wheel depends on nothing, where xgrammar 0.2.9's requires torch, transformers and triton (pip
would add triton to every CPU install; here it was installed with --no-deps for this benchmark only).

Setup. Three engines (xgrammar 0.2.9, llguidance 1.9.1, outlines-core 0.2.14) see the same vocabulary: the bytes
of every token (`lmforge.serve.grammar.token_bytes`), end-of-text as the end-of-sequence token. Two tokenizers:
a byte-level BPE of 4,096 ids trained here on the shared English texts, and the char tokenizer (256 byte
fallbacks + the characters of those texts). Three schemas: json_object (any JSON object), a flat bounded
schema (enum, bounded integer, string with maxLength, boolean, all required) and a nested one (an object
holding an array of objects). Each engine compiles each schema with compact separators; reported per
(tokenizer, schema, engine): compile time, and the per-token mask time (mean, p99) over constrained
generation of up to N tokens with random logits (the same seeded logits for every engine, sampled among the
allowed tokens), measured end to end (mask -> (V,) boolean tensor -> masked sampling -> advance). Engines run
interleaved within each (tokenizer, schema) so machine load falls on all alike. An engine that fails to
compile a schema (or exceeds the compile budget) is recorded as such.
Then the cost in the server: the scheduler's decoding step with 8 rows on benchmarks/serve_load.py's model
shape (llama 8 x 512), every row constrained by the chosen engine (masks are computed on the scheduler
thread, row by row): mean step time, the grammar time per row within it, and the grammar's share of a step.
Writes benchmarks/results/grammar_engines.json.
Run: python benchmarks/grammar_engines.py [--tokens 200] [--repeats 3] [--steps 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.tokenizer import train_bpe, train_char
from lmforge.serve.grammar import COMPILE_OPTIONS, _Wrapped, token_bytes

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "en"
CLAIM = (
    "on lmforge tokenizers xgrammar and llguidance compile every schema in 1-2 ms (outlines-core: 15 s for "
    "json_object); xgrammar's per-token mask is ~1.5x faster on bounded schemas, llguidance's on json_object; "
    "the serve extra takes llguidance, whose wheel needs nothing else (xgrammar's requires torch, "
    "transformers and triton)"
)
SCHEMAS = {
    "json_object": {"type": "object"},
    "flat": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "alerts": {"type": "boolean"},
        },
        "required": ["city", "unit", "days", "alerts"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "items": {
                "type": "array",
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                        "qty": {"type": "integer", "minimum": 0, "maximum": 99},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["name", "items"],
        "additionalProperties": False,
    },
}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, tokens):
        import llguidance

        self.ll = llguidance
        wrapped = llguidance.TokenizerWrapper(_Wrapped(tokenizer, tokens))
        self.tok = llguidance.LLTokenizer(wrapped, n_vocab=len(tokens))

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides=COMPILE_OPTIONS)
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def start(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled, log_level=0)

    def mask(self, m, n_vocab):
        return _unpack(m.compute_bitmask(), n_vocab)

    def accept(self, m, token):
        assert m.consume_token(token), m.get_error()

    def done(self, m):
        return m.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, tokens):
        import xgrammar

        self.xgr = xgrammar
        vocab = [b if b is not None else b"" for b in tokens]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, stop_token_ids=[tokenizer.eot_id])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, len(tokens))

    def compile(self, schema):
        return self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m, n_vocab):
        m.fill_next_token_bitmask(self.bitmask)
        return _unpack(self.bitmask[0], n_vocab)

    def accept(self, m, token):
        assert m.accept_token(token)

    def done(self, m):
        return m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, tokens):
        import outlines_core

        self.oc = outlines_core
        eos = tokenizer.eot_id
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokens):
            if b is not None and i != eos:
                mapping.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, mapping)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema), r"")  # no free whitespace
        return self.oc.Index(regex, self.vocab)

    def start(self, compiled):
        return self.oc.Guide(compiled)

    def mask(self, m, n_vocab):
        mask = torch.zeros(n_vocab, dtype=torch.bool)
        mask[m.get_tokens()] = True
        return mask

    def accept(self, m, token):
        m.advance(token)

    def done(self, m):
        return m.is_finished()


def _unpack(words, n_vocab: int) -> torch.Tensor:
    """A little-endian bitmask (32-bit words or bytes) as a boolean tensor (V,)."""
    raw = words.numpy().view(np.uint8) if isinstance(words, torch.Tensor) else np.frombuffer(words, np.uint8)
    return torch.from_numpy(np.unpackbits(raw, bitorder="little")[:n_vocab].view(np.bool_))


def generate(engine, compiled, n_vocab: int, eos: int, n_tokens: int, seed: int) -> tuple[list, list, str]:
    """Constrained sampling of up to ``n_tokens`` with seeded random logits: per-token seconds of the mask
    ((V,) boolean tensor) and of the advance (sampling itself is not timed), and how it ended."""
    g = torch.Generator().manual_seed(seed)
    m = engine.start(compiled)
    masks, advances = [], []
    for _ in range(n_tokens):
        logits = torch.randn(n_vocab, generator=g)  # (V,)
        t0 = time.perf_counter()
        allowed = engine.mask(m, n_vocab)
        masks.append(time.perf_counter() - t0)
        token = int(
            torch.multinomial(logits.masked_fill(~allowed, float("-inf")).softmax(-1), 1, generator=g)
        )
        if token == eos:
            return masks, advances, "eos"
        t0 = time.perf_counter()
        engine.accept(m, token)
        advances.append(time.perf_counter() - t0)
        if engine.done(m):
            return masks, advances, "complete"
    return masks, advances, "length"


def _stats(name: str, seconds: list[float]) -> dict:
    ts = sorted(seconds) or [float("nan")]
    p99 = ts[min(len(ts) - 1, int(0.99 * len(ts)))]
    return {f"{name}_us_mean": round(1e6 * statistics.fmean(ts), 1), f"{name}_us_p99": round(1e6 * p99, 1)}


def step_overhead(tokenizer, repeats: int, steps: int) -> dict:
    """The serve scheduler's decoding steps with 8 rows, all constrained by llguidance (an array of at
    least ``steps`` flat records: it cannot complete within ``steps`` tokens, so every row runs every step):
    the mean step time, and the time each row's grammar work (mask, then advance) takes within it."""
    from lmforge.config import ModelConfig
    from lmforge.infer.generate import SamplingConfig
    from lmforge.model.transformer import build_model
    from lmforge.serve.grammar import Constraint, Grammars
    from lmforge.serve.scheduler import Request, Scheduler

    cfg = ModelConfig(  # benchmarks/serve_load.py's shape: llama 8 x 512, GQA 8/2
        vocab_size=tokenizer.vocab_size,
        max_seq_len=512,
        n_layers=8,
        d_model=512,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=1536,
        tie_embeddings=False,
    )
    model = build_model(cfg, seed=0)
    grammars = Grammars(tokenizer, cfg.vocab_size)
    records = {"type": "array", "items": SCHEMAS["flat"], "minItems": steps}  # cannot end within the steps
    compiled = grammars.compile(records)
    grammar_times: list[float] = []

    class Timed(Constraint):
        def allowed(self):
            t0 = time.perf_counter()
            out = super().allowed()
            grammar_times.append(time.perf_counter() - t0)
            return out

        def accept(self, token):
            t0 = time.perf_counter()
            super().accept(token)
            grammar_times[-1] += time.perf_counter() - t0

    scheduler = Scheduler(model, tokenizer, device=torch.device("cpu"), max_batch=8, max_queue=8)
    step_times: list[float] = []
    inner = scheduler._step

    def timed_step():
        t0 = time.perf_counter()
        inner()
        if len(scheduler.rows) == 8:  # the full batch only
            step_times.append(time.perf_counter() - t0)

    scheduler._step = timed_step
    scheduler.start()
    for repeat in range(repeats):
        done = threading.Semaphore(0)
        requests = [
            Request(
                tokenizer.encode("the model reads a prompt"),
                SamplingConfig(max_new_tokens=steps, temperature=1.0, seed=repeat * 8 + i),
                lambda delta, final, done=done: final is not None and done.release(),
                constraint=Timed(grammars.constraint(compiled).matcher, cfg.vocab_size),
            )
            for i in range(8)
        ]
        scheduler.submit(*requests)
        for _ in requests:
            done.acquire()
    scheduler.stop(10)
    step, row = statistics.fmean(step_times[1:]), statistics.fmean(grammar_times)
    out = {
        "step_ms_mean": round(1e3 * step, 3),
        "steps": len(step_times) - 1,
        "grammar_ms_per_row_step": round(1e3 * row, 3),
        "grammar_share_of_step": round(8 * row / step, 4),
    }
    print(json.dumps(out), flush=True)
    return out


def texts() -> list[str]:
    files = sorted(DATA.glob("*.txt"))[:3]
    return [f.read_text(encoding="utf-8")[:300_000] for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=48, help="decoding steps per serve-step measurement")
    args = parser.parse_args()
    corpus = texts()
    tokenizers = {"bpe-4096": train_bpe(corpus, 4096), "char": train_char(corpus, 512)}
    engines = (LLGuidance, XGrammar, OutlinesCore)
    for module in ("llguidance", "xgrammar", "outlines_core"):  # imported first: not set-up time
        __import__(module)

    results = []
    for tok_name, tokenizer in tokenizers.items():
        tokens = token_bytes(tokenizer)
        n_vocab = len(tokens)
        built = {}
        for cls in engines:
            t0 = time.perf_counter()
            built[cls.name] = cls(tokenizer, tokens)
            print(f"{tok_name} {cls.name}: tokenizer set up in {time.perf_counter() - t0:.3f}s", flush=True)
        for schema_name, schema in SCHEMAS.items():
            per: dict[str, dict] = {
                name: {"compile_s": [], "mask_s": [], "advance_s": [], "ends": []} for name in built
            }
            for repeat in range(args.repeats):
                for name, engine in built.items():  # interleaved
                    row = per[name]
                    if row.get("error"):
                        continue
                    t0 = time.perf_counter()
                    try:
                        compiled = engine.compile(schema)
                    except BaseException as exc:  # an unsupported schema: recorded, not fatal
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        continue
                    row["compile_s"].append(time.perf_counter() - t0)
                    masks, advances, end = generate(
                        engine, compiled, n_vocab, tokenizer.eot_id, args.tokens, repeat
                    )
                    row["mask_s"] += masks
                    row["advance_s"] += advances
                    row["ends"].append(end)
            for name, row in per.items():
                out = {"tokenizer": tok_name, "vocab": n_vocab, "schema": schema_name, "engine": name}
                if row.get("error"):
                    out["error"] = row["error"]
                else:
                    out.update(
                        compile_ms_median=round(1e3 * statistics.median(row["compile_s"]), 3),
                        **_stats("mask", row["mask_s"]),
                        **_stats("advance", row["advance_s"]),
                        tokens=len(row["mask_s"]),
                        ends=row["ends"],
                    )
                results.append(out)
                print(json.dumps(out), flush=True)
    print("serve step, 8 rows, llguidance", flush=True)
    serve_step = step_overhead(tokenizers["char"], args.repeats, args.steps)
    report = {
        "claim": CLAIM,
        "engines": {"xgrammar": "0.2.9", "llguidance": "1.9.1", "outlines-core": "0.2.14"},
        "tokens_per_run": args.tokens,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads 1",
        "load_average": os.getloadavg(),
        "results": results,
        "serve_step": {
            "setup": "llama 8 x 512 GQA 8/2 (benchmarks/serve_load.py's shape), char tokenizer, fp32, 8 rows "
            f"decoding {args.steps} tokens at temperature 1, each constrained by llguidance",
            "results": serve_step,
        },
    }
    out_path = Path(__file__).parent / "results" / "grammar_engines.json"
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
