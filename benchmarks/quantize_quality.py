"""Claim: int8 quantization (``infer.quantize``) costs little quality: perplexity on held-out text within 1%
of f32 for int8 weight-only, and greedy continuations that mostly agree with f32's.

Setup: a character-level model (the 65 characters of tinyshakespeare are the ids; 4 layers, d_model 128,
4 heads, context 128) trained here for ``--steps`` AdamW steps on the first 90% of tinyshakespeare (a trained
model: random weights say nothing of quality); then, for f32, int8 (weight-only), int8-dynamic (activations
rounded too) and int4 (weight-only, groups of 32; the 65-row head stays int8):
  perplexity        exp(mean cross-entropy) over 64 fixed windows of 128 characters of the last 10%
  greedy agreement  10 held-out prompts of 32 characters, 64 greedy characters each: the share of positions
                    equal to f32's, and the mean length of the common prefix
Writes benchmarks/results/quantize_quality.json. Run: python benchmarks/quantize_quality.py [--steps N]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.quantize import quantize_model
from lmforge.model.transformer import build_model

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
CPU = torch.device("cpu")


def windows(tokens: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length - 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])  # (n, length + 1)


def train(tokens: torch.Tensor, vocab: int, steps: int) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=vocab,
        max_seq_len=256,
        n_layers=4,
        d_model=128,
        n_heads=4,
        ffn_hidden=384,
        tie_embeddings=False,
    )
    model = build_model(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        rows = windows(tokens, 16, 128, seed=step)
        loss = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def perplexity(model, rows: torch.Tensor) -> float:
    logits = model(rows[:, :-1])
    return math.exp(float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(ids))
    start = time.perf_counter()
    model = train(ids[:split], len(chars), args.steps)
    train_seconds = time.perf_counter() - start
    held_out = ids[split:]
    eval_rows = windows(held_out, 64, 128, seed=1)
    prompts = windows(held_out, 10, 32, seed=2)[:, :32].tolist()
    greedy = SamplingConfig(max_new_tokens=64, temperature=0.0)
    variants = {"f32": model}
    for mode in ("int8", "int8-dynamic", "int4"):
        variants[mode] = quantize_model(copy.deepcopy(model), mode)
    outputs, results = {}, {}
    for name, m in variants.items():
        outputs[name] = generate_ids(m, prompts, greedy, device=CPU, decoder=FastDecoder(m)).tokens
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(outputs[name], outputs["f32"])]
        prefix = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
            for x, y in zip(outputs[name], outputs["f32"])
        ]
        results[name] = {
            "perplexity": perplexity(m, eval_rows),
            "greedy_positions_agreeing": sum(same) / (64 * len(prompts)),
            "greedy_common_prefix_mean": sum(prefix) / len(prefix),
        }
    for name, row in results.items():
        row["perplexity_vs_f32"] = row["perplexity"] / results["f32"]["perplexity"]
        print(
            f"{name:<13} ppl {row['perplexity']:.3f} (x{row['perplexity_vs_f32']:.4f})  greedy agreeing "
            f"{row['greedy_positions_agreeing']:.1%}  common prefix {row['greedy_common_prefix_mean']:.1f}/64"
        )
    sample = "".join(chars[i] for i in outputs["f32"][0])
    out = {
        "claim": "int8 quantization: perplexity and greedy agreement vs f32 on held-out tinyshakespeare",
        "settings": {"steps": args.steps, "train_seconds": train_seconds, "model": "char 4 x 128, ctx 128"},
        "load_average": os.getloadavg(),
        "f32_sample": sample,
        "results": results,
    }
    path = Path(__file__).parent / "results" / "quantize_quality.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
