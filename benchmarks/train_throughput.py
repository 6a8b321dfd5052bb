"""Claim: lmforge's training step is at least 1.3x as fast as `transformers`' LlamaForCausalLM of the same
shape on the CPU in fp32 (tokens/s of forward + backward + clip + AdamW), and we report MFU against the
measured CPU matmul peak, in fp32 and with bf16 autocast.

lmforge: the loop's own pieces (``forward_backward``, ``clip_grad_norm_``, ``build_optimizer``: fused AdamW).
transformers: the step a user writes (``model(input_ids, labels=...).loss.backward()``, clip, torch AdamW with
its defaults), on the same weights (``model.hf.to_hf_model``). A third column is lmforge with
``train.compile=true`` (each block through ``torch.compile``, as ``parallelize`` applies it).
Rounds alternate A B A B; medians and ratios
go to benchmarks/results/train_throughput.json. Run: python benchmarks/train_throughput.py [--rounds N]

The ceiling: ``kernel_floor`` times the step's matrix multiplies and flash-attention kernels alone, each in a
loop on warm buffers (same shapes as the step); ``ceiling_ratio`` is that rate over the transformers step,
the ratio lmforge would reach if norms, RoPE, SwiGLU, the loss, AdamW and every copy cost nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig, ParallelConfig, TrainConfig
from lmforge.data.batch import Batch  # the one batch type the loop takes
from lmforge.distributed.parallelize import World, parallelize
from lmforge.model.hf import to_hf_model
from lmforge.model.transformer import build_model
from lmforge.plan.hardware import cpu_name, measure_matmul_flops
from lmforge.train.loop import autocast_for, forward_backward
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


DEFINITIONS = (
    "ratio: lmforge eager tokens/s over transformers; ratio_compiled: lmforge with train.compile=true over "
    "transformers; kernel_floor: the step's matmul and flash-attention kernels alone, timed on warm buffers "
    "(no step of this shape can be faster); ceiling_ratio: kernel_floor over transformers, the most lmforge "
    "could reach if norms, RoPE, SwiGLU, loss, AdamW and copies cost nothing. mfu: against matmul_peak_flops "
    "measured in the same run."
)


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


def kernel_floor(cfg: ModelConfig, batch: int, precision: str, repeats: int) -> float:
    """Seconds per step of the step's matrix multiplies and attention kernels alone (each timed in a loop on
    warm buffers, in bf16 for bf16 autocast): forward and both backward products of every projection and the
    head, flash attention forward and backward. No step can be faster, whatever the rest costs."""
    N, C, F, V, L = batch * cfg.max_seq_len, cfg.d_model, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    H, Hkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16 if precision == "bf16" else torch.float32)

    x, w_qkv, w_o = rand(N, C), rand((H + 2 * Hkv) * hd, C), rand(C, H * hd)
    w_gu, w_down, w_head = rand(2 * F, C), rand(C, F), rand(V, C)
    qkv, heads, h, act, logits = (
        rand(N, w_qkv.shape[0]),
        rand(N, H * hd),
        rand(N, 2 * F),
        rand(N, F),
        rand(N, V),
    )
    q = rand(batch, cfg.max_seq_len, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k, v = (rand(batch, cfg.max_seq_len, Hkv, hd).transpose(1, 2) for _ in range(2))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, k, v, 0.0, True)
    per_layer = [
        lambda: x @ w_qkv.t(),
        lambda: qkv @ w_qkv,
        lambda: qkv.t() @ x,  # q, k, v projections
        lambda: heads @ w_o.t(),
        lambda: x @ w_o,
        lambda: x.t() @ heads,  # output projection
        lambda: x @ w_gu.t(),
        lambda: h @ w_gu,
        lambda: h.t() @ x,  # gate and up
        lambda: act @ w_down.t(),
        lambda: x @ w_down,
        lambda: x.t() @ act,  # down
        lambda: flash(q, k, v, 0.0, True),
        lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            out, q, k, v, out, lse, 0.0, True
        ),
    ]
    once = [lambda: x @ w_head.t(), lambda: logits @ w_head, lambda: logits.t() @ x]  # the head

    def seconds(fn) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats

    return L * sum(seconds(fn) for fn in per_layer) + sum(seconds(fn) for fn in once)


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
    floor = kernel_floor(cfg, batch, precision, repeats=20)
    tokens = batch * cfg.max_seq_len
    out["kernel_floor"] = {"tokens_per_s": tokens / floor, "mfu": tokens / floor * flops_per_token / peak}
    out["ceiling_ratio"] = tokens / floor / out["transformers"]["tokens_per_s"]
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
                f"ratio {r['ratio_compiled']:.2f}x; matmuls + attention alone "
                f"{r['kernel_floor']['tokens_per_s']:8.0f} tok/s (MFU {100 * r['kernel_floor']['mfu']:.1f}%), "
                f"ceiling {r['ceiling_ratio']:.2f}x",
                flush=True,
            )
    report = {
        "definitions": DEFINITIONS,
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
