"""Run a few fp32 AdamW training steps of one model in this (fresh) process and print the peak memory.

How it measures: glibc is told (MALLOC_MMAP_THRESHOLD_, set by the caller) to serve every allocation of
64 KiB or more with its own mmap, which goes back to the OS on free, so the resident set size tracks the
live tensor bytes instead of the allocator's history. After imports and a warm-up step of a tiny model (to
initialise kernels and thread pools), the kernel's high-water mark is reset (``5 > /proc/self/clear_refs``)
and the baseline RSS is read; the peak is ``VmHWM - baseline`` after the steps. This counts memory, not
time, so a busy shared machine does not change it; one thread keeps per-thread buffers out of it.

Usage: python measure_peak.py '{"model": {...}, "micro_batch": 4, "seq_len": 128, "checkpointing": false, "steps": 2}'
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig, MoEConfig
from lmforge.distributed.parallelize import apply_activation_checkpointing
from lmforge.model.transformer import build_model


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def train_steps(cfg: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool, steps: int) -> None:
    model = build_model(cfg, seed=0)
    if checkpointing:
        apply_activation_checkpointing(model.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=generator)
        x, y = tokens[:, :-1], tokens[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        del logits, loss


def model_config(values: dict) -> ModelConfig:
    """A ModelConfig from plain values, the ``moe`` section included."""
    return ModelConfig(**{**values, "moe": MoEConfig(**values.get("moe", {}))})


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    cfg = model_config(spec["model"])
    warm = model_config({**spec["model"], "n_layers": 1, "d_model": 32, "n_heads": 2, "vocab_size": 64})
    train_steps(warm, 2, 16, spec["checkpointing"], 2)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = status_kib("VmRSS")
    train_steps(cfg, spec["micro_batch"], spec["seq_len"], spec["checkpointing"], spec.get("steps", 3))
    peak = status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - baseline) * 1024, "baseline_bytes": baseline * 1024}))


if __name__ == "__main__":
    main()
