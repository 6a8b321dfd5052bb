"""Claim: an exported lmforge model and an imported Hugging Face model compute the same logits as `transformers`.

For each shape, on random weights in fp32 (norm weights and biases perturbed so mix-ups show):
  export: lmforge checkpoint -> `convert.export_model` -> AutoModelForCausalLM.from_pretrained -> max |logits diff|
  import: transformers model (its own init) -> save_pretrained -> `convert.import_model` -> lmforge -> max |logits diff|
Writes benchmarks/results/hf_parity.json. Run: python benchmarks/hf_parity.py [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lmforge import convert
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import PRESETS, Config, ModelConfig, TrainConfig
from lmforge.model.transformer import build_model

GPT2 = dict(position="learned", ffn="gelu", norm="layernorm", bias=True)
TINY = dict(vocab_size=61, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
SHAPES = {
    "tiny llama MHA, untied": ModelConfig(**TINY, tie_embeddings=False),
    "tiny llama GQA 4/2, tied": ModelConfig(**TINY, n_kv_heads=2),
    "tiny llama MQA + bias": ModelConfig(**TINY, n_kv_heads=1, bias=True, tie_embeddings=False),
    "tiny gpt2, tied": ModelConfig(**TINY, **GPT2),
    "tiny gpt2, untied": ModelConfig(**TINY, **GPT2, tie_embeddings=False),
    "tiny qwen2 GQA 4/2 + qkv bias": ModelConfig(**TINY, n_kv_heads=2, qkv_bias=True),
    "tiny qwen3 qk_norm, head 24": ModelConfig(**TINY, n_kv_heads=2, qk_norm=True, head_size=24),
    "tiny mistral window 9, untied": ModelConfig(
        **TINY, n_kv_heads=2, sliding_window=9, tie_embeddings=False
    ),
    "tiny llama3 rope scaling": ModelConfig(
        **TINY, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16, rope_theta=500.0
    ),
    "tiny qwen2 yarn rope scaling": ModelConfig(
        **TINY, qkv_bias=True, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_theta=1e3
    ),
    "gpt2-124m preset": PRESETS["gpt2-124m"],
    "llama-160m preset": PRESETS["llama-160m"],
    "qwen2.5-0.5b preset": PRESETS["qwen2.5-0.5b"],
    "qwen3-0.6b preset": PRESETS["qwen3-0.6b"],
}


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if any(n in name for n in ("norm", "ln_", "bias")):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def diff(ours: torch.nn.Module, theirs: torch.nn.Module, cfg: ModelConfig) -> float:
    idx = torch.randint(
        0, cfg.vocab_size, (2, min(128, cfg.max_seq_len)), generator=torch.Generator().manual_seed(9)
    )
    return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())


def export_direction(cfg: ModelConfig, tmp: Path) -> dict:
    model = build_model(cfg, seed=1).eval()
    perturb(model)
    config = Config(model=cfg, train=TrainConfig(seq_len=min(128, cfg.max_seq_len)))
    save_checkpoint(tmp / "ck", model_state=model.state_dict(), config=config)
    started = time.perf_counter()
    report = convert.export_model(tmp / "ck", tmp / "hf")
    seconds = time.perf_counter() - started
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    return {
        "architecture": report.architecture,
        "export_self_check": report.max_abs_diff,
        "max_abs_diff": diff(model, loaded, cfg),
        "export_seconds": round(seconds, 2),
    }


def import_direction(tmp: Path) -> dict:
    # The exported folder's architecture, with every weight redrawn by transformers' side.
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator) + (1.0 if p.dim() == 1 else 0.0))
    reference.eval().save_pretrained(tmp / "hf2")
    started = time.perf_counter()
    out = convert.import_model(tmp / "hf2", tmp / "back").checkpoint
    seconds = time.perf_counter() - started
    model, config, _ = load_model(out)
    return {"max_abs_diff": diff(model.eval(), reference, config.model), "import_seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes only")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    results = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "shapes": {},
    }
    for name, cfg in SHAPES.items():
        if args.small and cfg.preset is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = {"config": dataclasses.asdict(cfg), "export": export_direction(cfg, Path(tmp))}
            row["import"] = import_direction(Path(tmp))
        results["shapes"][name] = row
        print(
            f"{name:28s} export {row['export']['max_abs_diff']:.2e}  import {row['import']['max_abs_diff']:.2e}"
        )
    out = Path(__file__).parent / "results" / "hf_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
