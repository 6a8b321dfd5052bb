"""Claim: speculative decoding (``infer.speculative``) with a draft that agrees >= 70% with its target makes
greedy decoding at batch 1 >= 1.5x faster than the target alone, with identical tokens.

Setup: random weights, so agreement is arranged rather than learned: a Llama 12 x 512 (GQA 8/2, vocab 8192,
untied head, init std 0.05) whose blocks 3..12 have their output projections (``o_proj``, ``down_proj``)
scaled by ``--damp`` (0.01), so they move the residual stream little; the draft is the target's first 2
blocks with its embeddings, final norm and head (a quarter of the weights to read per token: the head is
large). This stands for a target whose later layers refine rather than change its greedy choice. (With a tied
head a random model's greedy choice hardly depends on its blocks: every draft agrees 100%; untied, the
damping sets the agreement: 0.02 -> 69%, 0.04 -> 63%, 0.1 -> 25%, measured on 48 tokens.)
Contestants, interleaved per round:
  target_fast        ``generate_ids(target, decoder=FastDecoder(target))``: the best plain path
  speculative_k{K}   ``speculative_generate(target, draft, draft_tokens=K)`` for K in 2, 4, 6
Reported: median tokens/s (fastest, slowest round), load average beside each, speed-up over target_fast,
the draft's acceptance rate and whether the tokens equal target_fast's. Prompt 32, 64 new tokens, 1 thread.
Writes benchmarks/results/speculative.json. Run: python benchmarks/speculative.py [--rounds N]
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

from lmforge.config import ModelConfig
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.speculative import speculative_generate
from lmforge.model.transformer import build_model

CPU = torch.device("cpu")


def models(damp: float, draft_layers: int):
    cfg = ModelConfig(
        vocab_size=8192,
        max_seq_len=512,
        n_layers=12,
        d_model=512,
        n_heads=8,
        n_kv_heads=2,
        ffn_hidden=1536,
        tie_embeddings=False,
        init_std=0.05,
    )
    target = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for block in target.layers[draft_layers:]:
            block.self_attn.o_proj.weight.mul_(damp)
            block.mlp.down_proj.weight.mul_(damp)
    draft = build_model(ModelConfig(**{**cfg.__dict__, "n_layers": draft_layers}), seed=0).eval()
    state = target.state_dict()
    draft.load_state_dict({k: state[k] for k in draft.state_dict()})
    return target, draft


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--draft-layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, draft = models(args.damp, args.draft_layers)
    prompt = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    decoder = FastDecoder(target)
    contestants = {
        "target_fast": lambda: (
            generate_ids(target, [prompt], greedy, device=CPU, decoder=decoder).tokens[0],
            None,
        )
    }
    for k in (2, 4, 6):
        contestants[f"speculative_k{k}"] = lambda k=k: (lambda r: (r.tokens, r.acceptance))(
            speculative_generate(target, draft, prompt, greedy, device=CPU, draft_tokens=k)
        )
    outputs = {name: fn() for name, fn in contestants.items()}
    times: dict[str, list[float]] = {name: [] for name in contestants}
    loads: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, fn in contestants.items():
            loads[name].append(os.getloadavg()[0])
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["target_fast"])
    reference = outputs["target_fast"][0]
    results = {
        name: {
            "tokens_per_s_median": args.new_tokens / statistics.median(t),
            "tokens_per_s_best": args.new_tokens / min(t),
            "tokens_per_s_worst": args.new_tokens / max(t),
            "load_average_median": statistics.median(loads[name]),
            "speedup": base / statistics.median(t),
            "acceptance": outputs[name][1],
            "same_tokens": outputs[name][0] == reference,
        }
        for name, t in times.items()
    }
    for name, row in results.items():
        print(
            f"{name:<16} {row['tokens_per_s_median']:7.1f} tok/s  load {row['load_average_median']:.2f}  "
            f"x{row['speedup']:.2f}  acceptance {row['acceptance']}  same tokens {row['same_tokens']}"
        )
    out = {
        "claim": "speculative decoding >= 1.5x at batch 1 with a draft agreeing >= 70%, identical greedy tokens",
        "settings": {
            **vars(args),
            "prompt_tokens": 32,
            "threads": 1,
            "target": "12 x 512",
            "draft": "first layers",
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "results": results,
    }
    path = Path(__file__).parent / "results" / "speculative.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
