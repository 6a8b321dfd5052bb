"""Claim (issue 5, needs GPUs): the ~1B preset trains with FSDP in bf16 through ``lmforge train``'s own loop;
we record tokens/s, MFU and peak memory per GPU.

Run on a GPU machine (any number of GPUs; one GPU trains without sharding):
    torchrun --standalone --nproc-per-node NGPUS benchmarks/gpu_fsdp_1b.py [--steps 30] [--seq 2048]
The data are random tokens (throughput does not depend on them), so nothing needs downloading. Rank 0
writes benchmarks/results/gpu_fsdp_1b.json with the median tokens/s and MFU over the steps after warm-up
and the peak CUDA memory, beside what ``lmforge plan`` predicted for the same layout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.data.batch import Batch  # the one batch type the loop takes
from lmforge.plan.hardware import detect_hardware
from lmforge.plan.training import plan_training
from lmforge.train.loop import train


class RandomTokens:
    """Random (B, T) windows with the loader interface ``train`` accepts."""

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.batches, self.tokenizer_path = seed, 0, None

    def next_batch(self) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        self.batches += 1
        rows = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
        return Batch(rows[:, :-1].clone(), rows[:, 1:].clone())

    def skip(self, n: int) -> None:
        self.batches += n

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--preset", default="1b", help="another preset for a smoke run on the CPU")
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(tempfile.mkdtemp(prefix="lmforge-gpu-1b-")) if rank == 0 else None
    run_dir = os.environ.get("LMFORGE_BENCH_RUN", str(out or "unused"))
    cfg = load_config(None, [
        f"model.preset={args.preset}", f"train.seq_len={args.seq}", f"train.micro_batch={args.micro_batch}",
        f"train.steps={args.steps}", "train.precision=bf16", "train.activation_checkpointing=true",
        f"train.compile={'true' if args.compile else 'false'}", "train.log_every=1",
        f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}", "train.sample_prompts=[]",
        f"train.out_dir={run_dir}", "train.warmup_steps=5", "train.lr=3e-4", "parallel.strategy=fsdp",
    ])  # fmt: skip
    loader = RandomTokens(
        vocab_size=cfg.model.vocab_size, seq_len=args.seq, batch_size=args.micro_batch, seed=rank
    )
    val = RandomTokens(
        vocab_size=cfg.model.vocab_size, seq_len=args.seq, batch_size=args.micro_batch, seed=999
    )
    result = train(cfg, loader=loader, val_batches=lambda: [val.next_batch()], progress=False)
    if rank != 0:
        return
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][5:]  # after warm-up (and compilation)
    cuda = torch.cuda.is_available()
    hw = detect_hardware()
    kind = "cuda" if cuda else "cpu"
    predicted = plan_training(cfg, device_kind=kind, world_size=world, device_memory_bytes=hw.memory_bytes)
    report = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU smoke run)",
        "gpus": world,
        "torch": torch.__version__,
        "config": {
            "preset": args.preset,
            "seq_len": args.seq,
            "micro_batch": args.micro_batch,
            "compile": args.compile,
        },
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "tokens_per_s_per_gpu": statistics.median(r["tokens_per_s"] for r in steps) / world,
        "mfu": statistics.median(r["mfu"] for r in steps if r.get("mfu") is not None),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": result.final_loss,
        "predicted": {
            "peak_gib": predicted.predicted_peak_bytes / 2**30,
            "step_s": predicted.predicted_step_seconds,
        },
    }
    if cuda:  # a CPU smoke run only prints
        (Path(__file__).parent / "results" / "gpu_fsdp_1b.json").write_text(
            json.dumps(report, indent=2) + "\n"
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
