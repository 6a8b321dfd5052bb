"""The ``lmforge`` command: parse arguments, call one function per verb; no logic of its own.

Each verb has an ``_add_<verb>(subparsers)`` that declares its arguments and a ``_run_<verb>(args)`` that
calls one library function and prints its result. lmforge's own errors, and an OSError of any verb (a path
that cannot be read or written), become one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable

from lmforge.errors import LMForgeError


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


# -- model info --------------------------------------------------------------------------------------------


def _add_model(sub) -> None:
    p = sub.add_parser("model", help="inspect model shapes")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    info = msub.add_parser("info", help="parameters, FLOPs per token and weight sizes of a preset or config")
    info.add_argument(
        "model", help="a preset name (tiny, gpt2-124m, llama-160m, 1b, 3b, 7b) or a YAML config"
    )
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=8")
    info.add_argument(
        "--seq", type=int, default=None, help="sequence length for FLOPs (default: max_seq_len)"
    )
    info.add_argument("--json", action="store_true", help="print JSON")


def _run_model(args) -> int:
    from lmforge.model.info import describe, model_config_from_arg

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
    print(
        f"switches         position={cfg.position} norm={cfg.norm} bias={cfg.bias} tied={cfg.tie_embeddings}"
    )
    print(f"parameters       {info['parameters']:,} ({_human(info['parameters'])})")
    print(f"FLOPs per token  {info['flops_per_token']:.4g} (training, seq {info['seq_len']})")
    print(f"weights fp32     {info['bytes_fp32'] / 2**30:.2f} GiB")
    print(f"weights bf16     {info['bytes_bf16'] / 2**30:.2f} GiB")
    return 0


# -- export / import --------------------------------------------------------------------------------------


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a Hugging Face folder (safetensors + config.json) from a checkpoint"
    )
    p.add_argument("checkpoint", help="an lmforge run folder or checkpoint folder")
    p.add_argument("out_dir", help="the Hugging Face folder to write")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check against transformers")


def _run_export(args) -> int:
    from lmforge.convert import export_model

    report = export_model(args.checkpoint, args.out_dir, verify=not args.no_verify)
    print(f"wrote {report.out_dir} ({report.architecture})")
    if report.max_abs_diff is not None:
        print(f"verified with transformers: max |logits difference| = {report.max_abs_diff:.2e}")
    elif report.verify_note:
        print(report.verify_note)
    return 0


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="read a Hugging Face Llama or GPT-2 folder into an lmforge checkpoint")
    p.add_argument("hf_dir", help="a folder with config.json and *.safetensors (or pytorch_model.bin)")
    p.add_argument("out", help="the lmforge checkpoint folder to write")


def _run_import(args) -> int:
    from lmforge.convert import import_model

    out = import_model(args.hf_dir, args.out).checkpoint
    print(f"wrote {out}")
    return 0


# -- train / plot -------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no config: the built-in demo on the Python stdlib)")
    p.add_argument(
        "items", nargs="*", metavar="[CONFIG] [overrides]", help="a YAML config, then dotted overrides"
    )
    p.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest valid checkpoint of train.out_dir) or a checkpoint path",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def _cache_dir():
    """Where measured CPU peaks and downloaded tokenizers are kept (the environment is read here, at the edge)."""
    from pathlib import Path

    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def _run_train(args) -> int:
    import signal

    from lmforge.config import load_config
    from lmforge.train.demo import demo_config
    from lmforge.train.loop import train

    items = list(args.items)
    if items and "=" not in items[0]:
        cfg = load_config(items[0], items[1:])
    else:
        cfg = demo_config(items)
    result = train(
        cfg, resume=args.resume, cache_dir=_cache_dir(), progress=False if args.no_progress else None
    )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the job
        for text in result.samples:
            print(f"--- sample ---\n{text}")
        print(f"run folder: {result.run_dir} (checkpoint {result.checkpoint})")
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, result.stopped_by))
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss curves of one or more runs, overlaid in one PNG")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN/loss.png for one run)")


def _run_plot(args) -> int:
    from lmforge.train.plots import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


# -- generate / eval / finetune / prune (issue 7) ---------------------------------------------------------


def _device(name: str):
    from lmforge.train.run import pick_device

    return pick_device(name)


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue prompts with a trained model (KV cache, sampling, streaming)"
    )
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")


def _run_generate(args) -> int:
    from lmforge.errors import DataError
    from lmforge.infer.generate import SamplingConfig, open_generator, read_prompts

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts and not args.interactive:
        raise DataError("no prompt: give --prompt TEXT, --prompts-file FILE or --interactive")
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=tuple(args.stop),
        seed=args.seed,
    )
    generator = open_generator(args.model, sampling, device=_device(args.device), use_cache=not args.no_cache)
    if prompts:
        _print_generations(generator, prompts, args)
    while args.interactive:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if line.strip():
            try:
                _print_generations(generator, [line.replace("\\n", "\n")], args)
            except DataError as exc:  # a prompt too long for the context: say so and keep the session
                print(f"lmforge generate: {exc}", file=sys.stderr)
    return 0


def _print_generations(generator, prompts: list[str], args) -> None:
    """One prompt streams its continuation as it comes (unless --no-stream or --json); a batch prints each
    result when it is complete."""
    stream = not args.no_stream and not args.json and len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    on_text = (lambda row, text: print(text, end="", flush=True)) if stream else None
    for g in generator(prompts, on_text=on_text):
        if args.json:
            print(json.dumps(g.to_dict(), ensure_ascii=False))
        elif stream:
            print()
        else:
            print(f"--- {g.finish_reason}, {len(g.tokens)} tokens ---\n{g.prompt}{g.text}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / bits per byte on text, accuracy on multiple-choice tasks")
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--text", action="append", default=[], help="a UTF-8 text file to score (repeatable)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="a folder written by `lmforge data prepare`: score its val split (repeatable)",
    )
    p.add_argument(
        "--task", action="append", default=[], help="a multiple-choice JSONL file (HellaSwag format)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--max-tokens", type=int, default=None, help="first N tokens of each text")
    p.add_argument("--seq-len", type=int, default=None, help="window for perplexity (default: the context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _run_eval(args) -> int:
    from lmforge.infer.evaluate import evaluate_model, format_table, write_results

    report = evaluate_model(
        args.model,
        texts=args.text,
        prepared=args.data,
        tasks=args.task,
        device=_device(args.device),
        limit=args.limit,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    for note in report.notes:
        print(note)
    print(format_table(report.results))
    if args.out:
        print(f"wrote {write_results(report.to_dict(), args.out)}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning (instructions, chat) or classification")
    p.add_argument("base", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("data", help="JSONL: instruction/input/output, prompt/response or messages; or text/label")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 train.lr=2e-5")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument("--task", choices=["sft", "classify"], default="sft")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning; else LoRA with this rank")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated projection names")
    p.add_argument("--no-pack", action="store_true", help="one example per row instead of packing")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=None, help="first N examples")
    p.add_argument("--keep-sparsity", action="store_true", help="keep pruned (zero) weights at zero")
    p.add_argument("--export-hf", default=None, help="also write the merged model as a Hugging Face folder")
    p.add_argument("--test", default=None, help="classify: a labelled test file (default: a held-out split)")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    p.add_argument("--no-progress", action="store_true")


def _run_finetune(args) -> int:
    return _run_classify(args) if args.task == "classify" else _run_sft(args)


def _run_classify(args) -> int:
    from lmforge.tune.classify import finetune_classifier

    result = finetune_classifier(
        args.base,
        args.data,
        out_dir=args.out,
        test_path=args.test,
        test_fraction=args.test_fraction,
        overrides=args.overrides,
        resume=args.resume,
        progress=False if args.no_progress else None,
    )
    print(
        f"accuracy {result.accuracy:.4f} on {result.test_examples} held-out examples "
        f"({', '.join(f'{k} {v:.3f}' for k, v in result.per_label.items())})"
    )
    print(f"classifier: {result.model_dir}")
    return 0


def _run_sft(args) -> int:
    from lmforge.tune.lora import LoRAConfig
    from lmforge.tune.sft import finetune

    lora = None
    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoRAConfig(
            rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets
        )
    result = finetune(
        args.base,
        args.data,
        out_dir=args.out,
        overrides=args.overrides,
        lora=lora,
        pack=not args.no_pack,
        val_fraction=args.val_fraction,
        limit=args.limit,
        resume=args.resume,
        keep_sparsity=args.keep_sparsity,
        export_hf=args.export_hf,
        progress=False if args.no_progress else None,
    )
    print(
        f"{result.train_examples} training / {result.val_examples} validation examples "
        f"({result.skipped_examples} skipped: no response token fits the context)"
    )
    print(f"final loss {result.final_loss}, validation loss {result.val_loss}")
    print(
        f"fine-tuned model: {result.model_dir}"
        + (f"; Hugging Face folder: {result.hf_dir}" if result.hf_dir else "")
    )
    return 0


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="magnitude or structured (heads, FFN channels) pruning")
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("out", help="the pruned checkpoint folder to write")
    p.add_argument("--sparsity", type=float, default=0.0, help="fraction of projection weights to zero")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--heads", type=float, default=0.0, help="fraction of attention heads to remove")
    p.add_argument("--channels", type=float, default=0.0, help="fraction of feed-forward channels to remove")
    p.add_argument("--eval-text", default=None, help="a text file for perplexity before and after")
    p.add_argument("--eval-tokens", type=int, default=20000)
    p.add_argument("--recover", default=None, help="SFT JSONL for a short recovery fine-tune (zeros kept)")
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--device", default="auto")


def _run_prune(args) -> int:
    from lmforge.tune.prune import prune_model

    result = prune_model(
        args.model,
        args.out,
        amount=args.sparsity,
        scope=args.scope,
        heads=args.heads,
        channels=args.channels,
        eval_text=args.eval_text,
        eval_tokens=args.eval_tokens,
        recover=args.recover,
        recover_steps=args.recover_steps,
        device=_device(args.device),
    )
    print(
        f"parameters {result.parameters_before:,} -> {result.parameters_after:,}; sparsity of projection "
        f"weights {result.sparsity:.4f} ({result.zeros:,} of {result.total:,})"
    )
    if result.perplexity_before is not None:
        print(f"perplexity {result.perplexity_before:.3f} -> {result.perplexity_after:.3f}")
    print(f"wrote {result.out}")
    if result.recovered_dir is not None:
        print(f"recovered model: {result.recovered_dir}")
    if result.perplexity_recovered is not None:
        print(f"perplexity after recovery {result.perplexity_recovered:.3f}")
    return 0


# -- plan -------------------------------------------------------------------------------------------------


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict memory, time and cost of training a model on a cluster")
    p.add_argument("--model", required=True, help="a preset name (e.g. 7b) or a YAML config")
    p.add_argument("overrides", nargs="*", help="dotted model overrides, e.g. model.vocab_size=128256")
    p.add_argument("--gpu", default="H100-80GB", help="a device from the hardware table, or 'auto' to detect")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one node (default 8)")
    p.add_argument(
        "--interconnect", default="infiniband", help="network between nodes: nvlink, infiniband, ethernet"
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's max_seq_len)")
    p.add_argument("--global-batch-tokens", default="4M", help="tokens per optimizer step (default 4M)")
    p.add_argument("--tokens", default=None, help="tokens to train on (default: ~20 per parameter)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--tp", default="", help="tensor-parallel degrees to compare, e.g. 2,4,8")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one GPU-hour")
    p.add_argument("--hardware-file", default=None, help="a YAML file adding or changing hardware entries")
    p.add_argument(
        "--probe", action="store_true", help="check the plan with a few real steps on this machine"
    )
    p.add_argument("--probe-steps", type=int, default=4, help="steps of the probe run (default 4)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _count(flag: str, text: str | None) -> int | None:
    """A token count written as 4M, 1T or 2e12."""
    from lmforge.config import parse_number
    from lmforge.errors import ConfigError

    if text is None:
        return None
    try:
        return int(parse_number(text))
    except ValueError:
        raise ConfigError(f"{flag}={text!r} is not a number (examples: 4M, 1T, 2e12)") from None


def _tp_degrees(text: str) -> tuple[int, ...]:
    from lmforge.errors import ConfigError

    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--tp={text!r} must be a comma-separated list of integers, e.g. 2,4") from None


def _run_plan(args) -> int:
    from lmforge.errors import ConfigError
    from lmforge.model.info import model_config_from_arg
    from lmforge.plan.hardware import lookup_interconnect, resolve_hardware
    from lmforge.plan.planner import Cluster, Workload, plan_cluster
    from lmforge.plan.report import render_probe, render_report

    tp_degrees = _tp_degrees(args.tp)
    cfg = model_config_from_arg(args.model, args.overrides)
    cluster = Cluster(
        hardware=resolve_hardware(args.gpu, args.hardware_file),
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        interconnect=lookup_interconnect(args.interconnect),
        price_per_gpu_hour=args.price_per_gpu_hour,
    )
    workload = Workload(
        seq_len=args.seq or cfg.max_seq_len,
        global_batch_tokens=_count("--global-batch-tokens", args.global_batch_tokens),
        total_tokens=_count("--tokens", args.tokens),
        precision=args.precision,
    )
    report = plan_cluster(cfg, cluster, workload, tp_degrees=tp_degrees)
    probe = corrected = None
    if args.probe:  # a few real steps on this machine correct the plan's assumptions
        from lmforge.plan.probe import probe_report

        probe, corrected = probe_report(report, steps=args.probe_steps, hardware_file=args.hardware_file)
    if args.json:
        extra = {"probe": probe.to_dict(), "corrected": corrected.to_dict()} if probe is not None else {}
        print(json.dumps({**report.to_dict(), **extra}, indent=2))
    else:
        print(render_report(report))
        if probe is not None:
            print(f"\n{render_probe(probe)}\n\ncorrected plan:\n{render_report(corrected)}")
    if report.chosen is None:
        raise ConfigError(report.shortfall())
    return 0


# -- launch / consolidate (distributed) ---------------------------------------------------------------------


def _add_launch(sub) -> None:
    p = sub.add_parser(
        "launch", help="run `lmforge train` on N processes / nodes through torchrun, or write a Slurm script"
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG] [overrides]", help="as for `lmforge train`")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (GPUs per node)")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument(
        "--rdzv-endpoint", default=None, help="HOST:PORT where the nodes meet (one node's address)"
    )
    p.add_argument("--rdzv-id", default="lmforge", help="a job id shared by all nodes")
    p.add_argument("--rdzv-timeout", type=float, default=120.0, help="seconds to wait for the endpoint/nodes")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the group after a failure (resumes)")
    p.add_argument("--resume", default=None, help="passed to `lmforge train` (default with restarts: auto)")
    p.add_argument("--no-progress", action="store_true", help="passed to `lmforge train`")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    p.add_argument("--slurm", default=None, metavar="FILE", help="write a Slurm batch script to FILE")
    p.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit")
    p.add_argument("--slurm-partition", default=None, help="Slurm partition")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="Slurm --gpus-per-node (default: --nproc-per-node, unless train.device=cpu; 0: none)",
    )


def _run_launch(args) -> int:
    import shlex
    from pathlib import Path

    from lmforge.config import load_config
    from lmforge.distributed import launch

    items = list(args.items)
    config = items.pop(0) if items and "=" not in items[0] else None
    cfg = load_config(config, items)  # a bad config fails here, not N times
    config_world_size = cfg.parallel.world_size
    spec = launch.LaunchSpec(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        rdzv_timeout_s=args.rdzv_timeout,
    )
    train_args = launch.train_arguments(config, items, resume=args.resume, spec=spec)
    train_args += ["--no-progress"] if args.no_progress else []
    launch.check_world_size(spec, config_world_size)
    if args.slurm:
        from lmforge.files import write_text_atomic

        gpus = args.gpus_per_node
        if gpus is None:  # one GPU per process, unless the run is meant for CPUs
            gpus = 0 if cfg.train.device == "cpu" else args.nproc_per_node
        script = launch.slurm_script(
            spec,
            train_args,
            time_limit=args.slurm_time,
            gpus_per_node=gpus,
            partition=args.slurm_partition,
        )
        write_text_atomic(Path(args.slurm), script)
        print(f"wrote {args.slurm}; submit it with: sbatch {args.slurm}")
        return 0
    if args.dry_run:
        print(shlex.join(launch.torchrun_command(spec, train_args)))
        return 0
    return launch.run(spec, train_args, config_world_size=config_world_size)


def _add_consolidate(sub) -> None:
    p = sub.add_parser(
        "consolidate", help="gather a sharded (multi-process) checkpoint into one safetensors file"
    )
    p.add_argument("checkpoint", help="a sharded checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out", help="the ordinary checkpoint folder to write (readable by export and generate)")


def _run_consolidate(args) -> int:
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.checkpoint.sharded import consolidate

    out = consolidate(resolve_checkpoint(args.checkpoint), args.out)
    print(f"wrote {out}")
    return 0


# -- data ---------------------------------------------------------------------------------------------------


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare token shards from raw text")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    prep = dsub.add_parser("prepare", help="read, clean, tokenize and shard sources into a dataset folder")
    prep.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [SOURCES...] [overrides]",
        help="an optional YAML config, then files/folders/globs, then dotted overrides (data.vocab_size=8000)",
    )
    prep.add_argument("--out", required=True, help="the dataset folder to write")
    prep.add_argument("--strict", action="store_true", help="abort on a malformed record (default: skip it)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.add_argument("--json", action="store_true", help="print meta.json instead of the tables")


def _run_data(args) -> int:
    from lmforge.data.clean import format_report
    from lmforge.data.prepare import prepare_from_arguments

    prepared = prepare_from_arguments(args.items, args.out, progress=not args.no_progress, strict=args.strict)
    meta, src = prepared.meta, prepared.report["sources"]
    if args.json:
        print(json.dumps(meta, indent=2, ensure_ascii=False))
        return 0
    print(format_report(prepared.report))
    print(
        f"inputs {src['files']:,} ({src['bytes'] / 1e6:.1f} MB), binary skipped {src['binary_skipped']}, "
        f"invalid UTF-8 files {src['invalid_utf8_files']} ({src['invalid_utf8_chars']} chars replaced), "
        f"malformed records {src['malformed_records']}"
    )
    for example in src["malformed_examples"][:5]:
        print(f"  skipped {example}")
    for split, info in meta["splits"].items():
        shards = len(info["shards"])
        print(f"{split:<6} {info['docs']:>10,} docs {info['tokens']:>14,} tokens in {shards} shards")
    print(
        f"wrote {args.out}: {meta['dtype']} shards, vocab {meta['vocab_size']}, "
        f"tokenizer {meta['tokenizer_fingerprint']}"
    )
    return 0


# -- the table of verbs -------------------------------------------------------------------------------------

VERBS: dict[str, tuple[Callable, Callable]] = {
    "model": (_add_model, _run_model),
    "data": (_add_data, _run_data),
    "export": (_add_export, _run_export),
    "import": (_add_import, _run_import),
    "train": (_add_train, _run_train),
    "plot": (_add_plot, _run_plot),
    "generate": (_add_generate, _run_generate),
    "eval": (_add_eval, _run_eval),
    "finetune": (_add_finetune, _run_finetune),
    "prune": (_add_prune, _run_prune),
    "plan": (_add_plan, _run_plan),
    "launch": (_add_launch, _run_launch),
    "consolidate": (_add_consolidate, _run_consolidate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Train GPT/Llama-style language models end to end: raw text in, a trained, evaluated, "
        "exported model out. `lmforge train` with no argument runs the built-in demo.",
        epilog="`lmforge VERB --help` shows a verb's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)
    for add, _ in VERBS.values():
        add(sub)
    parser.set_defaults(verb_parsers=sub.choices)  # verb -> its parser, for errors in the verb's own words
    return parser


def _unrecognized(verb_parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """ "unrecognized arguments: ..." with a "did you mean" for a mistyped option."""
    import difflib

    def options_of(p: argparse.ArgumentParser) -> list[str]:  # with those of nested verbs (`model info`)
        found = []
        for action in p._actions:
            found += action.option_strings
            for nested in getattr(action, "choices", None) or {}:
                if isinstance(action.choices[nested], argparse.ArgumentParser):
                    found += options_of(action.choices[nested])
        return found

    options = options_of(verb_parser)
    hints = []
    for arg in extra:
        if arg.startswith("--"):
            close = difflib.get_close_matches(arg.split("=")[0], options, n=1)
            hints += [f"{arg.split('=')[0]}: did you mean {close[0]}?"] if close else []
    message = f"unrecognized arguments: {' '.join(extra)}"
    return message + (f" ({'; '.join(hints)})" if hints else "")


def _one_line(exc: Exception) -> str:
    """lmforge's own message; for an OSError the path(s) and the reason ("/proc/x: Permission denied"). An
    atomic write fails on its temporary (``PATH.tmp-<pid>``), but the user named PATH: show that."""
    if not isinstance(exc, OSError):
        return str(exc)
    if exc.filename is None or not exc.strerror:
        return str(exc).replace("\n", " ")
    paths = [
        re.sub(r"\.tmp-(\d+|sharded)(?=(\.\w+)?$)", "", str(name))
        for name in (exc.filename, exc.filename2)
        if name
    ]
    return f"{' -> '.join(paths)}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a trailing positional list nothing once an option has come between: dotted overrides
    # written after options (`lmforge finetune BASE DATA --out X train.steps=20`) are still overrides.
    dest = next((d for d in ("overrides", "items") if isinstance(getattr(args, d, None), list)), None)
    if extra and dest and all("=" in a and not a.startswith("-") for a in extra):
        setattr(args, dest, getattr(args, dest) + extra)
    elif extra:
        args.verb_parsers[args.verb].error(_unrecognized(args.verb_parsers[args.verb], extra))
    started = time.time()
    try:
        return VERBS[args.verb][1](args) or 0
    except (LMForgeError, OSError) as exc:  # a bad input, or a path that cannot be read or written
        if debug:
            raise
        print(f"lmforge {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted after {time.time() - started:.0f}s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
