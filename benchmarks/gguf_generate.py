"""Claim: an exported GGUF file runs in llama.cpp, which generates as lmforge does (f32) and how fast.

For each shape (random weights, greedy, batch 1, no end-of-text so every run makes all its tokens), the model
is exported with ``lmforge export --format gguf`` in f32 and q8_0 and three contestants run interleaved
A B C A B C ... on the same prompt:
  lmforge        ``generate_ids(..., use_cache=True)`` (fp32, torch on the CPU)
  llama.cpp f32  the f32 file through llama-cpp-python (greedy: argmax of its logits, no sampler)
  llama.cpp q8_0 the q8_0 file
Both engines get the same number of CPU threads; llama.cpp caches keys and values in f32 (as lmforge). Reported: median generated tokens/s per contestant (with the
fastest and slowest round), the ratios to lmforge, and how many of the greedy tokens llama.cpp agrees on
(until the first difference). Writes benchmarks/results/gguf_generate.json.
Run: python benchmarks/gguf_generate.py [--small] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import llama_cpp
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import PRESETS, Config, ModelConfig, TrainConfig
from lmforge.convert import export_model
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.gguf import llama_cpp_greedy, open_llama_cpp
from lmforge.model.transformer import build_model

SHAPES = {
    "tiny (4 x 128, vocab 2048)": PRESETS["tiny"],
    "llama 8 x 512, GQA 8/2, vocab 8192": ModelConfig(
        vocab_size=8192, max_seq_len=1024, n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, ffn_hidden=1536
    ),
}


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_case(
    cfg: ModelConfig, *, prompt_len: int, new_tokens: int, rounds: int, threads: int, tmp: Path
) -> dict:
    model = build_model(cfg, seed=0).eval()
    run = tmp / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000001",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=min(cfg.max_seq_len, 256))),
    )
    files = {}
    for dtype in ("f32", "q8_0"):
        files[dtype] = export_model(
            run, tmp / f"model-{dtype}.gguf", format="gguf", dtype=dtype, verify=False
        ).out_dir
    prompt = torch.randint(
        0, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    n_ctx = prompt_len + new_tokens
    engines = {dtype: open_llama_cpp(path, n_ctx, n_threads=threads) for dtype, path in files.items()}

    def ours() -> list[int]:
        return generate_ids(model, [prompt], sampling, device=torch.device("cpu")).tokens[0]

    contestants = {
        "lmforge": ours,
        "llama_cpp_f32": lambda: llama_cpp_greedy(engines["f32"], prompt, new_tokens)[1],
        "llama_cpp_q8_0": lambda: llama_cpp_greedy(engines["q8_0"], prompt, new_tokens)[1],
    }
    outputs = {name: fn() for name, fn in contestants.items()}  # warm-up, and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for llm in engines.values():
        llm.close()
    result = {
        name: {
            "tokens_per_s_median": new_tokens / statistics.median(t),
            "tokens_per_s_best": new_tokens / min(t),
            "tokens_per_s_worst": new_tokens / max(t),
        }
        for name, t in times.items()
    }
    base = result["lmforge"]["tokens_per_s_median"]
    for name in ("llama_cpp_f32", "llama_cpp_q8_0"):
        result[name]["ratio_to_lmforge"] = result[name]["tokens_per_s_median"] / base
        result[name]["greedy_tokens_agreeing"] = agreement(outputs["lmforge"], outputs[name])
    result["file_bytes"] = {dtype: os.path.getsize(path) for dtype, path in files.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="only the tiny shape, fewer tokens")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    prompt_len, new_tokens = 32, (32 if args.small else 128)
    shapes = dict(list(SHAPES.items())[:1]) if args.small else SHAPES
    cases = {}
    for name, cfg in shapes.items():
        with tempfile.TemporaryDirectory() as tmp:
            cases[name] = run_case(
                cfg,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                rounds=args.rounds,
                threads=threads,
                tmp=Path(tmp),
            )
        print(name, json.dumps(cases[name], indent=1))
    out = {
        "claim": "GGUF export runs in llama.cpp; generation speed, batch 1, greedy, lmforge vs llama.cpp",
        "settings": {
            "batch": 1,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "rounds": args.rounds,
            "threads": threads,
            "order": "interleaved lmforge, llama.cpp f32, llama.cpp q8_0 per round",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__,
        },
        "cases": cases,
    }
    path = Path(__file__).parent / "results" / "gguf_generate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
