"""Claim: lmforge's fast decoding step (``infer.fast``) and its int8 weights (``infer.quantize``) against
lmforge's eager path, llama.cpp (f32 and q8_0, the same model exported to GGUF) and transformers ``generate``.

Setup: random weights, greedy, no end-of-text (every run makes all its tokens), on this machine's CPU with
the same number of threads for every engine (``--threads``, default 1: on a shared 2-core machine a second
OpenMP thread waits on busy cores). Shapes: the ``tiny`` preset (4 x 128, vocab 2048, context
raised to 1024) and a Llama 8 x 512 with GQA 8/2 (vocab 8192); batch 1 and 8; prompts of 32 and 512 tokens.
Contestants, run interleaved (A B C ... A B C ...) per case:
  lmforge_eager      ``generate_ids`` on the eager path (``Transformer.hidden_states`` every step)
  lmforge_fast       ``generate_ids(decoder=FastDecoder(model))``: the static-cache step, eager PyTorch
  lmforge_compiled   the same step through ``torch.compile`` (only with ``--compile``: a minute per case)
  lmforge_int8       the fast step on int8 weight-only projections (``aten._weight_int8pack_mm``)
  lmforge_int8_dyn   the fast step on fbgemm's dynamic int8 projections (activations rounded too, as q8_0)
  llama_cpp_f32 / llama_cpp_q8_0   llama-cpp-python, greedy on its last logits (``logits_all=False``); at
                     batch 8 the rows run one after another (its high-level API decodes one sequence)
  transformers       ``LlamaForCausalLM.generate`` (greedy) on the exported Hugging Face folder
Reported per contestant: the median generated tokens/s over the rounds (prompt reading included, as every
engine must do it), fastest and slowest round, the 1-minute load average beside each, its ratio to
llama.cpp f32 (and q8_0 for the int8 ones), and the greedy tokens of row 0 agreeing with lmforge_eager.
Writes benchmarks/results/decode.json.
Run: python benchmarks/decode.py [--quick] [--rounds N] [--new-tokens N] [--compile] [--batch 1 8]
     [--prompt 32 512] [--out decode.json]
The compiled step's own figures: --compile --batch 1 --prompt 32 --out decode_compiled.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import llama_cpp
import numpy as np
import torch
import transformers

from lmforge.checkpoint import save_checkpoint
from lmforge.config import PRESETS, Config, ModelConfig, TrainConfig
from lmforge.convert import export_model
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.infer.quantize import quantize_model
from lmforge.model.transformer import build_model

SHAPES = {
    "tiny 4 x 128": replace(PRESETS["tiny"], max_seq_len=1024),
    "llama 8 x 512 GQA 8/2": ModelConfig(
        vocab_size=8192, max_seq_len=1024, n_layers=8, d_model=512, n_heads=8, n_kv_heads=2, ffn_hidden=1536
    ),
}
CPU = torch.device("cpu")


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def export(cfg: ModelConfig, model: torch.nn.Module, tmp: Path) -> dict[str, Path]:
    run = tmp / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000001",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=256)),
    )
    files = {"hf": export_model(run, tmp / "hf", verify=False).out_dir}
    for dtype in ("f32", "q8_0"):
        files[dtype] = export_model(
            run, tmp / f"model-{dtype}.gguf", format="gguf", dtype=dtype, verify=False
        ).out_dir
    return files


def open_llama(path: Path, n_ctx: int, threads: int):
    """llama.cpp as it serves: logits of the last position only (``logits_all=False``), keys and values in f32
    (as lmforge caches them)."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(n_ctx, 512),
        logits_all=False,
        n_threads=threads,
        n_gpu_layers=0,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens: the argmax of llama.cpp's last logits, fed back one at a time (without ``logits_all``
    llama-cpp-python keeps no copy of the logits: they are read from the context)."""
    vocab = llm.n_vocab()
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
        out.append(token)
        llm.eval([token])
    return out


def contestants(
    cfg: ModelConfig, files: dict[str, Path], prompts: list[list[int]], new_tokens: int, compile: bool
) -> tuple[dict[str, Callable[[], list[int]]], list]:
    """name -> a function generating ``new_tokens`` for every prompt and returning row 0's tokens."""
    threads = torch.get_num_threads()
    model = build_model(cfg, seed=0).eval()
    int8 = quantize_model(build_model(cfg, seed=0).eval(), "int8")
    dynamic = quantize_model(build_model(cfg, seed=0).eval(), "int8-dynamic")
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    fast, fast_int8, fast_dynamic = FastDecoder(model), FastDecoder(int8), FastDecoder(dynamic)
    n_ctx = len(prompts[0]) + new_tokens
    engines = {dtype: open_llama(files[dtype], n_ctx, threads) for dtype in ("f32", "q8_0")}
    hf = transformers.AutoModelForCausalLM.from_pretrained(files["hf"], dtype=torch.float32).eval()
    hf_ids = torch.tensor(prompts)

    def lmforge(m, decoder=None):
        return lambda: generate_ids(m, prompts, greedy, device=CPU, decoder=decoder).tokens[0]

    def llama(dtype):
        return lambda: [llama_greedy(engines[dtype], p, new_tokens) for p in prompts][0]

    @torch.inference_mode()
    def hf_generate():
        out = hf.generate(
            hf_ids,
            attention_mask=torch.ones_like(hf_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        return out[0, hf_ids.shape[1] :].tolist()

    out = {"lmforge_eager": lmforge(model), "lmforge_fast": lmforge(model, fast)}
    if compile:
        out["lmforge_compiled"] = lmforge(model, FastDecoder(model, compile=True))
    out["lmforge_int8"] = lmforge(int8, fast_int8)
    out["lmforge_int8_dyn"] = lmforge(dynamic, fast_dynamic)
    out["llama_cpp_f32"] = llama("f32")
    out["llama_cpp_q8_0"] = llama("q8_0")
    out["transformers"] = hf_generate
    return out, list(engines.values())


def run_case(cfg, files, *, batch: int, prompt_len: int, new_tokens: int, rounds: int, compile: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    fns, engines = contestants(cfg, files, prompts, new_tokens, compile)
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up (and compile), and the tokens to compare
    times: dict[str, list[float]] = {name: [] for name in fns}
    loads: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            loads[name].append(os.getloadavg()[0])
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for llm in engines:
        llm.close()
    made = batch * new_tokens
    result = {
        name: {
            "tokens_per_s_median": made / statistics.median(t),
            "tokens_per_s_best": made / min(t),
            "tokens_per_s_worst": made / max(t),
            "load_average_median": statistics.median(loads[name]),
            "greedy_tokens_agreeing": agreement(outputs["lmforge_eager"], outputs[name]),
        }
        for name, t in times.items()
    }
    f32 = result["llama_cpp_f32"]["tokens_per_s_median"]
    q8 = result["llama_cpp_q8_0"]["tokens_per_s_median"]
    for row in result.values():
        row["ratio_to_llama_cpp_f32"] = row["tokens_per_s_median"] / f32
    for name in ("lmforge_int8", "lmforge_int8_dyn"):
        result[name]["ratio_to_llama_cpp_q8_0"] = result[name]["tokens_per_s_median"] / q8
    return result


def table(cases: dict) -> str:
    lines = [
        f"{'case':<44} {'contestant':<18} {'tok/s':>8} {'load':>5} {'x llama f32':>11} {'x q8_0':>7} agree"
    ]
    for case, result in cases.items():
        for name, row in result.items():
            q8 = row.get("ratio_to_llama_cpp_q8_0")
            lines.append(
                f"{case:<44} {name:<18} {row['tokens_per_s_median']:8.1f} {row['load_average_median']:5.2f} "
                f"{row['ratio_to_llama_cpp_f32']:11.2f} {'' if q8 is None else f'{q8:7.2f}':>7} "
                f"{row['greedy_tokens_agreeing']}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only the tiny shape, batch 1, prompt 32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every engine")
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="batch sizes to run")
    parser.add_argument("--prompt", type=int, nargs="*", default=[32, 512], help="prompt lengths to run")
    parser.add_argument("--out", default="decode.json", help="file name under benchmarks/results")
    parser.add_argument("--shape", default="", help="only the shapes whose name contains this")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    shapes = {name: cfg for name, cfg in shapes.items() if args.shape in name}
    grid = [(1, 32)] if args.quick else [(b, p) for b in args.batch for p in args.prompt]
    cases = {}
    for shape, cfg in shapes.items():
        with tempfile.TemporaryDirectory() as tmp:
            files = export(cfg, build_model(cfg, seed=0).eval(), Path(tmp))
            for batch, prompt_len in grid:
                name = f"{shape}, batch {batch}, prompt {prompt_len}"
                cases[name] = run_case(
                    cfg,
                    files,
                    batch=batch,
                    prompt_len=prompt_len,
                    new_tokens=args.new_tokens,
                    rounds=args.rounds,
                    compile=args.compile,
                )
                print(table({name: cases[name]}), flush=True)
                write(args, cases)  # after every case: a long run stopped early keeps what it measured


def write(args, cases: dict) -> None:
    out = {
        "claim": "decode speed at batch 1 and 8: lmforge eager / fast / int8 vs llama.cpp f32, q8_0, transformers",
        "settings": {
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "threads": torch.get_num_threads(),
            "order": "interleaved contestants per round",
            "llama_cpp_batch": "rows one after another",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_end": os.getloadavg(),
            "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__,
            "transformers": transformers.__version__,
        },
        "cases": cases,
        "table": table(cases).splitlines(),
    }
    path = Path(__file__).parent / "results" / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
