"""Two small Mixture-of-Experts experiments on the demo's corpus (the Python standard library's own .py files,
BPE 2048, as ``lmforge train`` without a config uses), each run a few minutes on the CPU.

(a) balance: the ``tiny`` preset with every feed-forward replaced by 8 experts of hidden 192, top-2 (the same
    active parameters as tiny's dense 384), trained for the same steps three ways: with the Switch/Mixtral
    auxiliary loss (``aux_loss_coef=0.01``), with DeepSeek-V3's auxiliary-loss-free bias update
    (``bias_update_rate=0.001``, DeepSeek-V3's, and 0.01), and with neither. Reported: tokens per expert max/mean (worst layer) over
    training, from metrics.jsonl, and the validation loss.
(b) MoE vs dense: that MoE (with the auxiliary loss) against the dense ``tiny`` of equal active parameters,
    (b1) on the same tokens (same steps; wall-clock reported) and (b2) on the same wall-clock budget (a
    time limit, constant learning rate after warm-up, as many steps as fit). Reported: validation loss.

Results go to benchmarks/results/moe_experiments.json. Run: PYTHONPATH=src python benchmarks/moe_experiments.py
[--steps N] [--minutes M]. The machine is shared with other jobs: wall-clock figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
from pathlib import Path

import torch

from lmforge.train.demo import demo_config
from lmforge.train.loop import train
from lmforge.train.metrics import read_metrics

MOE = (
    "model.moe.n_experts=8",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=192",
    "model.moe.router=topk_softmax",
)
BALANCING = {
    "aux_loss": ("model.moe.aux_loss_coef=0.01",),
    "bias_update": ("model.moe.bias_update_rate=0.001",),  # DeepSeek-V3's rate (for long runs)
    "bias_update_0.01": ("model.moe.bias_update_rate=0.01",),  # ten times faster, for a run this short
    "neither": (),
}


def run(root: Path, name: str, overrides: tuple[str, ...], cache: Path, batch: tuple[str, ...]) -> dict:
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = demo_config(
        (
            f"train.out_dir={out}",
            "train.sample_prompts=[]",
            "train.eval_batches=10",
            "train.log_every=5",
            *batch,
            "train.ckpt_every=100000",
            "train.seed=0",
            *overrides,
        )
    )
    result = train(cfg, cache_dir=cache, progress=False)
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    summary = {
        "steps": result.step,
        "tokens": steps[-1]["tokens"] if steps else 0,
        "wall_seconds": round(result.wall_seconds, 1),
        "val_loss": round(result.val_loss, 4) if result.val_loss is not None else None,
        "final_train_loss": round(result.final_loss, 4) if result.final_loss is not None else None,
    }
    load = [r["moe_load_max_mean"] for r in steps if "moe_load_max_mean" in r]
    if load:
        summary["load_max_over_mean"] = {
            "mean_over_training": round(statistics.fmean(load), 3),
            "first_logged": round(load[0], 3),
            "last_logged": round(load[-1], 3),
            "max": round(max(load), 3),
            "last_quarter_mean": round(statistics.fmean(load[-max(1, len(load) // 4) :]), 3),
        }
        summary["aux_loss_last"] = round(steps[-1]["moe_aux_loss"], 4)
        summary["tokens_per_expert_last"] = steps[-1]["moe_tokens_per_expert"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--root", default="runs/moe_experiments")
    parser.add_argument("--out", default="benchmarks/results/moe_experiments.json")
    args = parser.parse_args()
    root, cache = Path(args.root), Path(args.root) / "cache"
    batch = (f"train.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}")
    fixed = (f"train.steps={args.steps}", "train.time_limit_minutes=0", f"train.eval_every={args.steps}")
    balance = {
        name: run(root, f"balance_{name}", (*MOE, *extra, *fixed), cache, batch)
        for name, extra in BALANCING.items()
    }
    same_tokens = {
        "moe_aux_loss": balance["aux_loss"],
        "dense": run(root, "tokens_dense", fixed, cache, batch),
    }
    timed = (
        "train.steps=100000",
        f"train.time_limit_minutes={args.minutes}",
        "train.schedule=constant",
        "train.eval_every=100000",
    )
    same_time = {
        "moe_aux_loss": run(root, "time_moe", (*MOE, *BALANCING["aux_loss"], *timed), cache, batch),
        "dense": run(root, "time_dense", timed, cache, batch),
    }
    report = {
        "claim": "(a) expert load under three balancing methods; (b) a tiny MoE vs the dense tiny of equal active "
        "parameters at equal tokens and equal wall-clock (validation loss)",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; SHARED with up to 8 other jobs on 2 cores (load average about 20 during the runs): "
        "wall-clock figures (and so b2) are noisy",
        "data": f"the demo corpus: Python stdlib *.py, BPE vocabulary 2048, seq_len {args.seq_len}, micro-batch "
        f"{args.micro_batch}",
        "models": "dense: the tiny preset (4 layers, d_model 128, SwiGLU 384); moe: the same with 8 experts of "
        "hidden 192, top-2, Mixtral router, in every layer (active feed-forward parameters equal to dense)",
        "definitions": "load_max_over_mean: tokens routed to the most loaded expert over the mean, worst layer, "
        "per optimizer step (1 is balanced, 4 = every token's two choices on 2 of 8 experts); val_loss: "
        "nats/token on 10 validation batches at the end",
        "steps_fixed": args.steps,
        "minutes_timed": args.minutes,
        "a_balance": balance,
        "b1_same_tokens": same_tokens,
        "b2_same_wall_clock": same_time,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
