"""Claim: the baby character-level GPT on tinyshakespeare (first 90% train, last 10% validation; 4 layers,
4 heads, d_model 128, context 64, batch 12, 2000 steps, lr 1e-3 with cosine decay, no dropout) reaches a
validation loss <= 1.88 in fp32 and <= 1.90 with bf16 autocast, trained by ``lmforge.train.loop.train``.

The characters are the ids (65 of them), as in nanoGPT's shakespeare_char. The loader draws random windows
like nanoGPT's ``get_batch``; the validation loss is the mean over 200 fixed random windows of the split.
Writes benchmarks/results/shakespeare_char.json. Run: python benchmarks/shakespeare_char.py [--precision ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.data.batch import Batch  # the one batch type the loop takes
from lmforge.train.loop import train

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


class WindowLoader:
    """Random (B, T) windows of a token array from a seeded generator; resumable by the count drawn."""

    def __init__(self, tokens: torch.Tensor, *, seq_len: int, batch_size: int, vocab_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.vocab_size, self.seed, self.tokenizer_path, self.drawn = vocab_size, seed, None, 0

    def batch(self, index: int) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=gen)
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        return Batch(rows[:, :-1].clone(), rows[:, 1:].clone())

    def next_batch(self) -> Batch:
        self.drawn += 1
        return self.batch(self.drawn - 1)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state["drawn"])


def run(precision: str, steps: int, out_dir: Path) -> dict:
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(data))
    train_tokens, val_tokens = data[:split], data[split:]
    cfg = load_config(
        None,
        [
            f"model.vocab_size={len(chars)}",
            "model.max_seq_len=64",
            "model.n_layers=4",
            "model.n_heads=4",
            "model.d_model=128",
            "model.dropout=0.0",
            f"train.out_dir={out_dir}",
            f"train.steps={steps}",
            "train.seq_len=64",
            "train.micro_batch=12",
            "train.lr=1e-3",
            "train.min_lr=1e-4",
            "train.warmup_steps=100",
            "train.schedule=cosine",
            "train.beta2=0.99",
            "train.weight_decay=0.1",
            "train.grad_clip=1.0",
            f"train.precision={precision}",
            "train.device=cpu",
            "train.log_every=100",
            f"train.eval_every={steps}",
            f"train.ckpt_every={steps}",
            "train.sample_tokens=1",
        ],
    )
    loader = WindowLoader(train_tokens, seq_len=64, batch_size=12, vocab_size=len(chars), seed=1337)
    val = WindowLoader(val_tokens, seq_len=64, batch_size=12, vocab_size=len(chars), seed=7)
    val_batches = [val.batch(i) for i in range(200)]
    started = time.perf_counter()
    result = train(cfg, loader=loader, val_batches=lambda: val_batches, progress=False)
    wall = time.perf_counter() - started
    target = 1.88 if precision == "fp32" else 1.90
    return {
        "precision": precision,
        "steps": result.step,
        "val_loss": result.val_loss,
        "train_loss": result.final_loss,
        "target": target,
        "met": result.val_loss is not None and result.val_loss <= target,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "shakespeare_char.json"))
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: the shared data folder is needed for this benchmark")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            r = run(precision, args.steps, Path(tmp) / precision)
            results.append(r)
            print(
                f"{precision}: val loss {r['val_loss']:.4f} (target <= {r['target']}) "
                f"in {r['wall_seconds']:.0f}s, {r['steps']} steps",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
