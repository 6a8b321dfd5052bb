"""Claim: a generative task runs several times faster batched (left-padded, KV cache) than one item at a time,
with the same greedy predictions.

A synthetic summarization task of 64 items (documents of 40-400 bytes of random words, byte tokens, ROUGE),
the ``tiny`` preset with random weights, greedy, up to 32 new tokens, stop at a newline. Contestants run
interleaved A B C A B C ...: ``run_task`` with batch_size 1, 16 and 64. Reported: median items/s per batch
size (and the fastest/slowest round), the speed-up over batch 1, whether every batch size produced the same
predictions, the machine's load average. Writes benchmarks/results/task_throughput.json.
Run: python benchmarks/task_throughput.py [--items N] [--rounds N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import PRESETS
from lmforge.infer.tasks import TaskOptions, load_spec, run_task
from lmforge.model.transformer import build_model

SPEC = """kind: summarization
data: items.jsonl
prompt: "{document}\\nTL;DR:"
answer: " {summary}"
references: summary
document: document
stop: ["\\n"]
max_new_tokens: 32
"""


class ByteTokenizer:
    eot_id = 256
    pad_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def write_task(folder: Path, n: int) -> Path:
    rng = random.Random(0)
    vocab = ["model", "data", "train", "loss", "token", "layer", "cache", "batch", "speed", "text"]
    with open(folder / "items.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(vocab) for _ in range(rng.randint(7, 70))]
            f.write(
                json.dumps({"id": str(i), "document": " ".join(words), "summary": " ".join(words[:5])}) + "\n"
            )
    (folder / "task.yaml").write_text(SPEC, encoding="utf-8")
    return folder / "task.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(PRESETS["tiny"], seed=0).to(device).eval()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(write_task(Path(tmp), args.items))
        sizes = (1, 16, 64)
        seconds: dict[int, list[float]] = {b: [] for b in sizes}
        predictions: dict[int, list[str]] = {}
        metrics = {}
        run_task(model, ByteTokenizer(), spec, TaskOptions(limit=4), device=device)  # warm-up
        for _ in range(args.rounds):
            for batch in sizes:
                start = time.perf_counter()
                result = run_task(model, ByteTokenizer(), spec, TaskOptions(batch_size=batch), device=device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[batch].append(time.perf_counter() - start)
                predictions[batch] = [s["prediction"] for s in result.samples]
                metrics[batch] = result.metrics
    same = all(predictions[b] == predictions[1] for b in sizes)
    items_per_s = {b: args.items / statistics.median(seconds[b]) for b in sizes}
    out = {
        "claim": "generative task items/s batched vs one at a time (same greedy predictions)",
        "device": str(device),
        "cpu": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": "tiny preset (4 x 128, vocab 2048), random weights, fp32",
        "items": args.items,
        "max_new_tokens": 32,
        "rounds": args.rounds,
        "load_average_1_5_15min": {"start": list(load_start), "end": list(os.getloadavg())},
        "items_per_second_median": {f"batch_{b}": items_per_s[b] for b in sizes},
        "seconds": {f"batch_{b}": seconds[b] for b in sizes},
        "speedup_over_batch_1": {f"batch_{b}": items_per_s[b] / items_per_s[1] for b in sizes},
        "same_predictions": same,
        "rouge1_batch_1": metrics[1]["rouge1"],
    }
    path = Path(__file__).parent / "results" / "task_throughput.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(
        json.dumps(
            {k: out[k] for k in ("items_per_second_median", "speedup_over_batch_1", "same_predictions")}
        )
    )


if __name__ == "__main__":
    main()
