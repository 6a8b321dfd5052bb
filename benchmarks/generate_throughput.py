"""Claim: lmforge's KV-cache generation is at least as fast as `transformers` `generate` on the same model.

For each shape (random weights, fp32, greedy, no end-of-text so every run makes all its tokens), three
contestants run interleaved A B C A B C ... on the same prompts:
  lmforge cache    ``generate_ids(..., use_cache=True)``
  lmforge no cache ``generate_ids(..., use_cache=False)`` (recomputes the whole sequence every token)
  transformers     ``LlamaForCausalLM.generate`` (its DynamicCache) on ``to_hf_model`` of the same weights
Reported: median generated tokens/s per contestant (and the fastest/slowest round), the ratio cache /
transformers, whether all three produced the same tokens, and the machine's load average. Writes benchmarks/results/generate_throughput.json.
Run: python benchmarks/generate_throughput.py [--small] [--rounds N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from lmforge.config import PRESETS, ModelConfig
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.hf import to_hf_model
from lmforge.model.transformer import build_model

SHAPES = {
    "tiny (4 x 128, vocab 2048)": PRESETS["tiny"],
    "llama 8 x 512, GQA 8/2, vocab 8192": ModelConfig(
        vocab_size=8192, max_seq_len=1024, n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, ffn_hidden=1536
    ),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(cfg: ModelConfig, *, batch: int, prompt_len: int, new_tokens: int, rounds: int, device) -> dict:
    model = build_model(cfg, device=device, seed=0).eval()
    hf = to_hf_model(model)
    generator = torch.Generator().manual_seed(1)
    lengths = [prompt_len - 3 * i for i in range(batch)]  # different lengths: left padding in play
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    pad = 0
    longest = max(lengths)
    hf_ids = torch.full((batch, longest), pad, dtype=torch.long)
    hf_mask = torch.zeros(batch, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        hf_ids[i, longest - len(p) :] = torch.tensor(p)
        hf_mask[i, longest - len(p) :] = 1
    hf_ids, hf_mask = hf_ids.to(device), hf_mask.to(device)

    def ours(use_cache: bool):
        return generate_ids(model, prompts, sampling, device=device, pad_id=pad, use_cache=use_cache).tokens

    @torch.no_grad()
    def theirs():
        out = hf.generate(
            hf_ids,
            attention_mask=hf_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return [row[longest:].tolist() for row in out]

    contestants = {
        "lmforge_cache": lambda: ours(True),
        "lmforge_no_cache": lambda: ours(False),
        "transformers": theirs,
    }
    outputs = {name: fn() for name, fn in contestants.items()}  # warm-up, and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    generated = batch * new_tokens
    tokens_per_s = {name: generated / statistics.median(t) for name, t in times.items()}
    return {
        "batch": batch,
        "prompt_lengths": lengths,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "min_max_seconds": {name: [min(t), max(t)] for name, t in times.items()},
        "tokens_per_s": tokens_per_s,
        "cache_vs_transformers": tokens_per_s["lmforge_cache"] / tokens_per_s["transformers"],
        "cache_vs_no_cache": tokens_per_s["lmforge_cache"] / tokens_per_s["lmforge_no_cache"],
        "same_tokens": outputs["lmforge_cache"] == outputs["lmforge_no_cache"] == outputs["transformers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="only the tiny shape, fewer tokens (a smoke run)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_throughput.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = dict(list(SHAPES.items())[:1]) if args.small else SHAPES
    load_before = os.getloadavg()  # other jobs on the machine make the timings noisy: recorded with them
    cases = []
    for name, cfg in shapes.items():
        for batch in (1, 4):
            case = run_case(
                cfg,
                batch=batch,
                prompt_len=32,
                new_tokens=32 if args.small else 128,
                rounds=args.rounds,
                device=device,
            )
            case["shape"] = name
            cases.append(case)
            t = case["tokens_per_s"]
            print(
                f"{name:<38} batch {batch}: cache {t['lmforge_cache']:8.1f} tok/s  no cache "
                f"{t['lmforge_no_cache']:8.1f}  transformers {t['transformers']:8.1f}  "
                f"ratio {case['cache_vs_transformers']:.2f}x  same tokens {case['same_tokens']}"
            )
    result = {
        "claim": "lmforge KV-cache greedy generation >= 1.0x transformers generate on the same weights",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32",
        "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
        "cases": cases,
        "min_cache_vs_transformers": min(c["cache_vs_transformers"] for c in cases),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
