"""``lmforge model info``, ``export`` and ``import``: shapes and the Hugging Face world."""

from __future__ import annotations

import json


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# -- model info --------------------------------------------------------------------------------------------


def add_model(sub) -> None:
    p = sub.add_parser("model", help="inspect model shapes")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    info = msub.add_parser("info", help="parameters, FLOPs per token and weight sizes of a preset or config")
    info.add_argument(
        "model", help="a preset name (tiny, 7b, mixtral-8x7b, ...; see docs/models.md) or a YAML config"
    )
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=8")
    info.add_argument(
        "--seq", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)"
    )
    info.add_argument("--json", action="store_true", help="print JSON")


def run_model(args) -> int:
    from lmforge.model.info import describe, expert_hidden, model_config_from_arg, shared_expert_hidden

    cfg = model_config_from_arg(args.model, args.overrides)
    info = describe(cfg, seq_len=args.seq)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {info['preset'] or args.model}")
    print(
        f"shape            {cfg.n_layers} layers x d_model {cfg.d_model}, {cfg.n_heads} heads "
        f"({cfg.kv_heads} kv), ffn {cfg.ffn} {cfg.hidden_dim}, vocab {cfg.vocab_size}"
    )
    family = [f"{k}={getattr(cfg, k)}" for k in ("qkv_bias", "qk_norm") if getattr(cfg, k)]
    family += [f"{k}={getattr(cfg, k)}" for k in ("sliding_window",) if getattr(cfg, k) is not None]
    family += [f"rope_scaling={cfg.rope_scaling} x{cfg.rope_factor:g}"] if cfg.rope_scaling != "none" else []
    print(
        f"switches         position={cfg.position} norm={cfg.norm} bias={cfg.bias} tied={cfg.tie_embeddings}"
        + "".join(f" {f}" for f in family)
    )
    if cfg.moe.enabled:
        moe = cfg.moe
        print(
            f"experts          {moe.n_experts} routed, top-{moe.top_k}, hidden {expert_hidden(cfg)}"
            + (f"; shared hidden {shared_expert_hidden(cfg)}" if shared_expert_hidden(cfg) else "")
            + (f"; first {moe.first_dense_layers} layer(s) dense" if moe.first_dense_layers else "")
        )
    print(f"parameters       {info['parameters']:,} ({human_count(info['parameters'])})")
    if cfg.moe.enabled:
        print(
            f"active/token     {info['active_parameters']:,} ({human_count(info['active_parameters'])}, "
            f"{100 * info['active_parameters'] / info['parameters']:.1f}% of the total)"
        )
        print(
            f"routed experts   {info['expert_parameters']:,} ({100 * info['expert_share']:.1f}% of the total)"
        )
    print(f"FLOPs per token  {info['flops_per_token']:.4g} (training, seq {info['seq_len']})")
    print(f"weights fp32     {info['bytes_fp32'] / 2**30:.2f} GiB")
    print(f"weights bf16     {info['bytes_bf16'] / 2**30:.2f} GiB")
    return 0


# -- export / import --------------------------------------------------------------------------------------


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a Hugging Face folder (safetensors + config.json) or a llama.cpp GGUF file",
    )
    p.add_argument("checkpoint", help="an lmforge run folder or checkpoint folder")
    p.add_argument("out_dir", help="the Hugging Face folder to write (with --format gguf: the .gguf file)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf (llama.cpp)")
    p.add_argument(
        "--dtype", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF weight type (default f32)"
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the check against transformers (or llama.cpp for gguf)"
    )


def run_export(args) -> int:
    from lmforge.convert import export_model

    report = export_model(
        args.checkpoint, args.out_dir, verify=not args.no_verify, format=args.format, dtype=args.dtype
    )
    print(f"wrote {report.out_dir} ({report.architecture})")
    if args.format == "gguf":
        print(report.verify_note)
    elif report.max_abs_diff is not None:
        print(f"verified with transformers: max |logits difference| = {report.max_abs_diff:.2e}")
    elif report.verify_note:
        print(report.verify_note)
    return 0


def add_import(sub) -> None:
    from lmforge.model.hf_families import family_list

    about = f"read a Hugging Face folder ({family_list()}) into an lmforge checkpoint"
    p = sub.add_parser("import", help=about, description=about)
    p.add_argument("hf_dir", help="a folder with config.json and *.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="the lmforge checkpoint folder to write")


def run_import(args) -> int:
    from lmforge.convert import import_model

    out = import_model(args.hf_dir, args.out).checkpoint
    print(f"wrote {out}")
    return 0
