"""Claim: with ``model.mup=true`` the best learning rate found at the base width is the best (within one
factor-2 grid step) at 8x the width too; in the standard parametrisation it moves further.

Each run trains a character-level model on tinyshakespeare (first 90% train, last 10% validation, the
characters are the ids) through ``lmforge.train.loop.train``: 2 layers, 4 heads (muP widens the head
dimension at a fixed head count), SwiGLU hidden 3 x d_model, context 64, batch 8, 200 steps, constant lr
after a linear warmup of steps/10, AdamW (beta2 0.99, weight decay 0.1), no gradient clipping (clipping is
itself width-dependent; off, the parametrisation alone decides), fp32. The lr grid is 2^-12 .. 2^-3 by
factors of 2, at d_model 32 and 256 (width multiplier 8, as 64 -> 512; ``--widths 64 512`` runs those, about
8x the time), standard and muP (base width: the first width). At the base width muP *is* the standard model
(tests/model/test_mup.py proves logits and training bit-identical), so those runs are shared.

Reports, per parametrisation and width, the final train loss (the loop's last logged loss) and the
validation loss (mean over 32 fixed windows) for every lr, the best lr by validation loss, how many grid
steps the best lr moved between the widths, and the wide model's loss at the narrow model's best lr.
Writes benchmarks/results/mup_transfer.json. Run: python benchmarks/mup_transfer.py [--steps N]
[--widths 32 256] [--lr-exponents -12 ... -3]. The machine is shared with other jobs; only losses matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from shakespeare_char import DATA, WindowLoader

from lmforge.config import load_config
from lmforge.errors import LMForgeError
from lmforge.train.loop import train

SEQ_LEN, LAYERS, HEADS = 64, 2, 4
VAL_WINDOWS = 128


def char_data() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = DATA.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(data))
    return data[:split], data[split:], len(chars)


def one_run(width: int, base: int, mup: bool, lr: float, steps: int, batch: int, data, out_dir: Path) -> dict:
    train_tokens, val_tokens, vocab = data
    overrides = [
        f"model.vocab_size={vocab}",
        f"model.max_seq_len={SEQ_LEN}",
        f"model.n_layers={LAYERS}",
        f"model.n_heads={HEADS}",
        f"model.d_model={width}",
        f"model.ffn_hidden={3 * width}",
        "model.dropout=0.0",
        f"model.mup={str(mup).lower()}",
        f"model.mup_base_width={base}",
        f"train.out_dir={out_dir}",
        f"train.steps={steps}",
        f"train.seq_len={SEQ_LEN}",
        f"train.micro_batch={batch}",
        f"train.lr={lr}",
        f"train.min_lr={lr / 10}",
        f"train.warmup_steps={max(1, steps // 10)}",
        "train.schedule=cosine",
        "train.beta2=0.99",
        "train.weight_decay=0.1",
        "train.grad_clip=0",
        "train.precision=fp32",
        "train.device=cpu",
        f"train.log_every={steps}",
        f"train.eval_every={steps}",
        f"train.ckpt_every={steps}",
        "train.sample_tokens=1",
    ]
    cfg = load_config(None, overrides)
    loader = WindowLoader(train_tokens, seq_len=SEQ_LEN, batch_size=batch, vocab_size=vocab, seed=1337)
    val = WindowLoader(val_tokens, seq_len=SEQ_LEN, batch_size=batch, vocab_size=vocab, seed=7)
    val_batches = [val.batch(i) for i in range(VAL_WINDOWS // batch)]
    started = time.perf_counter()
    try:
        result = train(cfg, loader=loader, val_batches=lambda: val_batches, progress=False)
        val_loss, train_loss, note = result.val_loss, result.final_loss, ""
    except LMForgeError as exc:  # a guard stopping a diverged run
        val_loss, train_loss, note = None, None, f"stopped: {str(exc).splitlines()[0][:200]}"
    finite = val_loss is not None and math.isfinite(val_loss)
    return {
        "width": width,
        "mup": mup,
        "lr": lr,
        "log2_lr": math.log2(lr),
        "train_loss": train_loss if finite else None,
        "val_loss": val_loss if finite else None,
        "note": note,
        "seconds": round(time.perf_counter() - started, 1),
    }


def best(rows: list[dict]) -> dict | None:
    finite = [r for r in rows if r["val_loss"] is not None]
    return min(finite, key=lambda r: r["val_loss"]) if finite else None


def summarise(rows: list[dict], widths: list[int]) -> dict:
    """Per parametrisation: the best lr at each width, the lrs within 1% of the best validation loss (a flat
    optimum makes the single best one noisy), how far the best lr moved from the first width to the last,
    and the last width's loss when trained at the first width's best lr."""
    summary = {}
    for mup in (False, True):
        entry: dict = {}
        for w in widths:
            runs = [r for r in rows if r["width"] == w and r["mup"] == mup]
            b = best(runs)
            entry[f"width_{w}"] = {
                "best_log2_lr": b["log2_lr"] if b else None,
                "best_val_loss": b["val_loss"] if b else None,
                "log2_lrs_within_1pct": [
                    r["log2_lr"]
                    for r in runs
                    if b and r["val_loss"] is not None and r["val_loss"] <= 1.01 * b["val_loss"]
                ],
            }
        small, large = entry[f"width_{widths[0]}"], entry[f"width_{widths[-1]}"]
        if len(widths) > 1 and small["best_log2_lr"] is not None and large["best_log2_lr"] is not None:
            entry["grid_steps_moved"] = large["best_log2_lr"] - small["best_log2_lr"]
            entry["best_lr_within_one_grid_step"] = abs(entry["grid_steps_moved"]) <= 1
            entry["narrow_best_lr_within_1pct_at_wide"] = (
                small["best_log2_lr"] in large["log2_lrs_within_1pct"]
            )
            transferred = [
                r
                for r in rows
                if r["width"] == widths[-1] and r["mup"] == mup and r["log2_lr"] == small["best_log2_lr"]
            ]
            if transferred:
                key = f"val_loss_width_{widths[-1]}_at_width_{widths[0]}_best_lr"
                entry[key] = transferred[0]["val_loss"]
        summary["mup" if mup else "standard"] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 256], help="the first is muP's base")
    parser.add_argument("--lr-exponents", type=int, nargs="+", default=list(range(-12, -2)))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mup_transfer.json"))
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: the shared data folder is needed for this benchmark")
    data = char_data()
    # One thread: on a CPU shared with other jobs, two OpenMP threads on two busy cores run 10-40x slower.
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    base = args.widths[0]
    setup = {
        "data": "tinyshakespeare.txt, characters as ids, first 90% train / last 10% validation",
        "layers": LAYERS,
        "heads": HEADS,
        "seq_len": SEQ_LEN,
        "batch": args.batch,
        "steps": args.steps,
        "schedule": "linear warmup over steps/10, then cosine to lr/10",
        "optimizer": "AdamW beta2 0.99, weight decay 0.1, no clipping, fp32",
        "mup_base_width": base,
        "ffn_hidden": "3 x d_model",
        "val_windows": VAL_WINDOWS,
        "threads": args.threads,
        "machine": "2 CPU cores shared with other jobs (times are indicative only)",
    }
    started = time.perf_counter()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            for mup in (False, True):
                if mup and width == base:  # the same model and training as the standard one
                    shared = [r for r in rows if r["width"] == width]
                    rows += [{**r, "mup": True, "note": "shared with mup=false"} for r in shared]
                    continue
                for exponent in args.lr_exponents:
                    run_dir = Path(tmp) / f"w{width}-{'mup' if mup else 'sp'}-{exponent}"
                    r = one_run(width, base, mup, 2.0**exponent, args.steps, args.batch, data, run_dir)
                    rows.append(r)
                    shown = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "diverged"
                    print(
                        f"width {width} mup={mup} lr 2^{exponent}: val {shown} ({r['seconds']}s)", flush=True
                    )
                    out = {
                        "claim": " ".join(__doc__.splitlines()[:2]),
                        "setup": setup,
                        "summary": summarise(rows, args.widths),
                        "runs": rows,
                        "total_seconds": round(time.perf_counter() - started, 1),
                    }
                    tmp_out = out_path.with_suffix(".json.tmp")  # after every run: partial results survive
                    tmp_out.write_text(json.dumps(out, indent=2) + "\n")
                    os.replace(tmp_out, out_path)
    print(json.dumps(summarise(rows, args.widths), indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
