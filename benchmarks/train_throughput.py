"""Claim: lmforge's training step is at least 1.3x as fast as `transformers`' LlamaForCausalLM of the same
shape on the CPU in fp32 (tokens/s of forward + backward + clip + AdamW), and we report MFU against the
measured CPU matmul peak, in fp32 and with bf16 autocast.

lmforge: the loop's own pieces (``forward_backward``, ``clip_grad_norm_``, ``build_optimizer``: fused AdamW).
transformers: the step a user writes (``model(input_ids, labels=...).loss.backward()``, clip, torch AdamW with
its defaults), on the same weights (``model.hf.to_hf_model``). A third column is lmforge with
``train.compile=true`` (each block through ``torch.compile``, as ``parallelize`` applies it).
Rounds alternate A B A B; medians and ratios
go to benchmarks/results/train_throughput.json. Run: python benchmarks/train_throughput.py [--rounds N]

Where the time goes: after the timed rounds, three profiled steps of each eager model are split into matmuls
(mm/addmm/bmm), attention kernels, the optimizer and everything else (elementwise ops, norms, RoPE, loss,
copies), as fractions of the profiled self time; ``ceiling_ratio`` is the transformers step over lmforge's
matmul + attention + optimizer time alone, the ratio lmforge would reach if all the rest cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmforge.config import ModelConfig, ParallelConfig, TrainConfig
from lmforge.distributed.parallelize import World, parallelize
from lmforge.model.hf import to_hf_model
from lmforge.model.transformer import build_model
from lmforge.train.loop import autocast_for, forward_backward
from lmforge.train.metrics import cpu_name, measure_matmul_flops
from lmforge.train.optim import build_optimizer, param_groups

CPU = torch.device("cpu")
WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)

# (model shape, micro-batch): the baby char-level GPT of the tinyshakespeare claim, and a 6 x 384 model.
SHAPES = {
    "baby 4x128 ctx64 b12": (
        ModelConfig(vocab_size=65, max_seq_len=64, n_layers=4, d_model=128, n_heads=4),
        12,
    ),
    "6x384 ctx256 b8": (
        ModelConfig(vocab_size=2048, max_seq_len=256, n_layers=6, d_model=384, n_heads=6),
        8,
    ),
}


class Batch:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets, self.doc_ids = inputs, targets, None


def lmforge_stepper(cfg: ModelConfig, precision: str, compile: bool = False):
    model = build_model(cfg, seed=0).train()
    model = parallelize(model, ParallelConfig(), WORLD, precision=precision, compile=compile)  # train.compile
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4), CPU)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        forward_backward(model, [Batch(x, y)], device=CPU, precision=precision, scaler=None, world=WORLD)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def transformers_stepper(cfg: ModelConfig, precision: str):
    hf_model = to_hf_model(build_model(cfg, seed=0)).train()
    optimizer = torch.optim.AdamW(param_groups(hf_model, 0.1), lr=1e-4, betas=(0.9, 0.95))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast_for(CPU, precision):
            loss = hf_model(input_ids=x, labels=x).loss
        loss.backward()
        nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step, x, y, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return time.perf_counter() - started


def time_split(step, x, y) -> dict[str, float]:
    """Fractions of the self CPU time of three profiled steps: matmul, attention, optimizer, other."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(x, y)
    split = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    for event in prof.key_averages():
        name = event.key
        if not name.startswith("aten::"):
            continue
        if name in ("aten::mm", "aten::addmm", "aten::bmm"):
            kind = "matmul"
        elif "scaled_dot_product" in name:
            kind = "attention"
        elif "adam" in name or name.startswith("aten::_foreach") or name in ("aten::lerp_", "aten::addcdiv_"):
            kind = "optimizer"
        else:
            kind = "other"
        split[kind] += event.self_cpu_time_total
    total = sum(split.values())
    return {kind: value / total for kind, value in split.items()}


def bench_shape(
    name: str, cfg: ModelConfig, batch: int, precision: str, rounds: int, steps: int, peak: float
):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen)  # (B, T)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen)
    steppers = {
        "lmforge": lmforge_stepper(cfg, precision),
        "transformers": transformers_stepper(cfg, precision),
        "lmforge_compiled": lmforge_stepper(cfg, precision, compile=True),
    }
    for step in steppers.values():
        time_steps(step, x, y, 3)  # warm up allocator and kernels
    rates: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for key, step in steppers.items():  # A B A B ...
            rates[key].append(steps * batch * cfg.max_seq_len / time_steps(step, x, y, steps))
    flops_per_token = build_model(cfg, device="meta").flops_per_token(cfg.max_seq_len)
    out = {
        "shape": name,
        "precision": precision,
        "batch": batch,
        "seq_len": cfg.max_seq_len,
        "rounds": rounds,
    }
    for key, values in rates.items():
        median = statistics.median(values)
        out[key] = {"tokens_per_s": median, "mfu": median * flops_per_token / peak, "all": values}
    out["ratio"] = out["lmforge"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    out["ratio_compiled"] = out["lmforge_compiled"]["tokens_per_s"] / out["transformers"]["tokens_per_s"]
    for key in ("lmforge", "transformers"):
        out[key]["time_split"] = time_split(steppers[key], x, y)
    bound = sum(v for k, v in out["lmforge"]["time_split"].items() if k != "other")
    out["ceiling_ratio"] = out["ratio"] / bound  # transformers step / lmforge's matmul+attention+optimizer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()
    peaks = {p: measure_matmul_flops(p, size=1024, repeats=10) for p in args.precision}
    results = []
    for precision in args.precision:
        for name, (cfg, batch) in SHAPES.items():
            r = bench_shape(name, cfg, batch, precision, args.rounds, args.steps, peaks[precision])
            results.append(r)
            print(
                f"{name:22s} {precision}: lmforge {r['lmforge']['tokens_per_s']:8.0f} tok/s "
                f"(MFU {100 * r['lmforge']['mfu']:.1f}%), transformers {r['transformers']['tokens_per_s']:8.0f} "
                f"tok/s (MFU {100 * r['transformers']['mfu']:.1f}%), ratio {r['ratio']:.2f}x; "
                f"lmforge with train.compile {r['lmforge_compiled']['tokens_per_s']:8.0f} tok/s, "
                f"ratio {r['ratio_compiled']:.2f}x; lmforge time split "
                + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["lmforge"]["time_split"].items())
                + f", ceiling {r['ceiling_ratio']:.2f}x",
                flush=True,
            )
    report = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_flops": peaks,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
