"""Claim: lmforge's MoE feed-forward (sorted dispatch + grouped matmul, ``model/moe.py``) trains faster than the
textbook loop over experts, and costs a bounded factor over a dense SwiGLU with the same ACTIVE parameters.

Three layers on the same tokens, forward + backward (tokens/s, fp32, CPU):
- ``ours``: ``MoEFeedForward`` (dropless, no shared expert);
- ``naive``: the textbook implementation: the same router and weights, experts as a list of SwiGLU modules,
  ``for e in experts: mask the tokens routed to e, run e on them, add the weighted result back``;
- ``dense``: one SwiGLU of hidden K x F (the parameters a token actually passes through, router aside).

A fourth pair times the expert compute alone on tokens already grouped, ``torch._grouped_mm`` against a loop
of matmuls over each expert's contiguous slice (the layer's fallback): the measurement behind its choice.
On the CPU ``_grouped_mm`` is itself a loop of matmuls in C++, so the gain there is the autograd and Python
overhead per expert; on a GPU it is one kernel instead of E launches.
Rounds alternate the implementations; medians and ratios go to benchmarks/results/moe_layer.json.
Run: PYTHONPATH=src python benchmarks/moe_layer.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.model.moe import MoEFeedForward, route
from lmforge.model.transformer import FeedForward, build_model
from lmforge.shapes import MoEConfig

# name: (tokens, d_model, experts, top_k, expert hidden)
SHAPES = {
    "Mixtral-like E8 K2": (2048, 256, 8, 2, 512),
    "fine-grained E32 K4": (2048, 256, 32, 4, 128),
    "DeepSeek-like E64 K6": (2048, 256, 64, 6, 64),
}


def moe_layer(d: int, E: int, K: int, hidden: int) -> MoEFeedForward:
    cfg = ModelConfig(
        vocab_size=16,
        n_layers=1,
        d_model=d,
        n_heads=4,
        moe=MoEConfig(n_experts=E, top_k=K, expert_hidden=hidden),
    )
    layer = build_model(cfg, seed=0).layers[0].mlp
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.5)  # a decisive router, as after training
    return layer.train()


class NaiveMoE(nn.Module):
    """The textbook loop over experts, with ``ours``' router and expert weights."""

    def __init__(self, ours: MoEFeedForward):
        super().__init__()
        self.gate, self.moe = ours.gate, ours.moe
        E, two_f, d = ours.experts.gate_up_proj.shape
        hidden = two_f // 2
        self.experts = nn.ModuleList()
        for e in range(E):
            expert = nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(d, hidden, bias=False),
                    "up_proj": nn.Linear(d, hidden, bias=False),
                    "down_proj": nn.Linear(hidden, d, bias=False),
                }
            )
            with torch.no_grad():
                expert["gate_proj"].weight.copy_(ours.experts.gate_up_proj[e, :hidden])
                expert["up_proj"].weight.copy_(ours.experts.gate_up_proj[e, hidden:])
                expert["down_proj"].weight.copy_(ours.experts.down_proj[e])
            self.experts.append(expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        weights, chosen = route(
            self.gate(x), top_k=self.moe.top_k, router=self.moe.router, norm_topk_prob=self.moe.norm_topk_prob
        )  # (N, K) each
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            h = x[token]
            y = expert["down_proj"](F.silu(expert["gate_proj"](h)) * expert["up_proj"](h))
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.view(B, T, C)


def dense_layer(d: int, hidden: int) -> FeedForward:
    cfg = ModelConfig(vocab_size=16, n_layers=1, d_model=d, n_heads=4, ffn_hidden=hidden)
    return build_model(cfg, seed=0).layers[0].mlp.train()


def step_seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
    return (time.perf_counter() - start) / repeats


def kernel_seconds(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool, repeats: int
) -> float:
    """Forward + backward of (A, C) x (E, C, F) over grouped rows, one kernel or a loop of slices."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    sizes = counts.tolist()
    start = time.perf_counter()
    for _ in range(repeats):
        if grouped:
            y = torch._grouped_mm(x, w, offs=offsets)
        else:
            y = torch.cat([block @ we for block, we in zip(x.split(sizes), w.unbind(0))])
        y.backward(torch.ones_like(y))
    return (time.perf_counter() - start) / repeats


def bench_shape(name: str, rounds: int, repeats: int) -> dict:
    tokens, d, E, K, hidden = SHAPES[name]
    torch.manual_seed(0)
    ours = moe_layer(d, E, K, hidden)
    layers = {"ours": ours, "naive": NaiveMoE(ours), "dense": dense_layer(d, K * hidden)}
    x = torch.randn(1, tokens, d)
    with torch.no_grad():  # the two MoE layers agree before they are timed
        assert torch.allclose(layers["ours"](x), layers["naive"](x), atol=1e-5)
    _, chosen = route(ours.gate(x[0]), top_k=K, router="topk_softmax", norm_topk_prob=False)
    counts = torch.bincount(chosen.reshape(-1), minlength=E)
    grouped_x = torch.randn(tokens * K, d, requires_grad=True)
    w = torch.randn(E, d, 2 * hidden, requires_grad=True)
    kernels = {
        "grouped_mm": lambda: kernel_seconds(grouped_x, w, counts, True, repeats),
        "slice_loop": lambda: kernel_seconds(grouped_x, w, counts, False, repeats),
    }
    times: dict[str, list[float]] = {k: [] for k in [*layers, *kernels]}
    for layer in layers.values():
        step_seconds(layer, x, 1)  # warm-up
    for _ in range(rounds):  # A B C D E, A B C D E, ...
        for key, layer in layers.items():
            times[key].append(step_seconds(layer, x, repeats))
        for key, run in kernels.items():
            times[key].append(run())
    median = {k: statistics.median(v) for k, v in times.items()}
    tokens_per_s = {k: tokens / median[k] for k in layers}
    return {
        "tokens": tokens,
        "d_model": d,
        "experts": E,
        "top_k": K,
        "expert_hidden": hidden,
        "dense_hidden": K * hidden,
        "max_over_mean_tokens_per_expert": float(counts.max() / counts.float().mean()),
        "tokens_per_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "ours_over_naive": round(tokens_per_s["ours"] / tokens_per_s["naive"], 3),
        "ours_over_dense": round(tokens_per_s["ours"] / tokens_per_s["dense"], 3),
        "expert_kernel_ms": {k: round(1000 * median[k], 2) for k in kernels},
        "grouped_mm_over_slice_loop_speed": round(median["slice_loop"] / median["grouped_mm"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/moe_layer.json")
    args = parser.parse_args()
    results = {name: bench_shape(name, args.rounds, args.repeats) for name in SHAPES}
    report = {
        "claim": "MoE layer forward+backward tokens/s: ours (sorted dispatch, grouped matmul) vs the textbook "
        "loop over experts vs a dense SwiGLU of equal active parameters (fp32, CPU)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; SHARED with other jobs (noisy): compare the ratios, measured in the same rounds",
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "definitions": "tokens_per_s: tokens / median seconds of one forward+backward; ours_over_naive and "
        "ours_over_dense: ratios of tokens/s; expert_kernel_ms: the expert matmul (A, C) x (E, C, 2F) forward+"
        "backward alone on grouped rows; grouped_mm_over_slice_loop_speed: how many times faster grouped_mm is",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
