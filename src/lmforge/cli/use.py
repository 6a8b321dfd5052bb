"""``lmforge generate``, ``eval``, ``finetune`` and ``prune``: using and adapting a trained model."""

from __future__ import annotations

import json
import sys

# -- generate / eval / finetune / prune (issue 7) ---------------------------------------------------------


def _device(name: str):
    from lmforge.train.run import pick_device

    return pick_device(name)


def add_sampling_options(p, *, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The sampling options `generate` and `chat` share (their defaults differ)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=top_p, help="1: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(args, stop: tuple[str, ...] = ()):
    from lmforge.infer.generate import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=stop,
        seed=args.seed,
    )


def add_quantize_option(p) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8", "int8-dynamic", "int4"],
        default=None,
        help="int8 projections (CPU): int8 and int4 weight-only; int8-dynamic also rounds activations "
        "(fastest on AVX2, larger quality cost); see docs/inference.md",
    )


def add_decode_options(p) -> None:
    """How `generate`, `chat` and `eval` decode (``lmforge.infer.loading.DecodeOptions``)."""
    p.add_argument(
        "--decode",
        choices=["fast", "eager"],
        default="fast",
        help="fast: the static-cache decoding step (default); eager: the reference path",
    )
    p.add_argument(
        "--compile", action="store_true", help="compile the fast step with torch.compile (a minute at start)"
    )
    add_quantize_option(p)


def decode_from_args(args):
    from lmforge.infer.loading import DecodeOptions

    return DecodeOptions(fast=args.decode == "fast", compile=args.compile, quantize=args.quantize)


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue prompts with a trained model (KV cache, sampling, streaming)"
    )
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--interactive", action="store_true", help="read prompts from the terminal until EOF")
    add_sampling_options(p, max_new_tokens=200, temperature=0.8, top_p=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--no-stream", action="store_true", help="print each result when it is complete")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument(
        "--chat", action="store_true", help="send each prompt as a user message through the chat template"
    )
    p.add_argument("--system", default=None, help="--chat: a system prompt")
    add_decode_options(p)


def run_generate(args) -> int:
    from lmforge.errors import DataError
    from lmforge.infer.generate import read_prompts
    from lmforge.infer.loading import open_generator

    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts and not args.interactive:
        raise DataError("no prompt: give --prompt TEXT, --prompts-file FILE or --interactive")
    sampling = sampling_from_args(args, stop=tuple(args.stop))
    if args.chat:
        return _chat_generations(prompts, sampling, args)
    generator = open_generator(
        args.model,
        sampling,
        device=_device(args.device),
        use_cache=not args.no_cache,
        decode=decode_from_args(args),
    )
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


def _chat_generations(prompts: list[str], sampling, args) -> int:
    """``generate --chat``: each prompt is one user message (after ``--system``) rendered by the model's chat
    template; the reply ends at the end of the assistant's turn."""
    from lmforge.errors import DataError
    from lmforge.infer.loading import open_chat

    if args.interactive:
        raise DataError(
            "--chat answers --prompt/--prompts-file one by one; for a conversation use `lmforge chat`"
        )
    session, notice = open_chat(
        args.model,
        sampling,
        device=_device(args.device),
        system=args.system,
        use_cache=not args.no_cache,
        decode=decode_from_args(args),
    )
    if notice:
        print(f"lmforge generate: {notice}", file=sys.stderr)
    stream = not args.no_stream and not args.json
    for prompt in prompts:
        session.reset()
        on_text = (lambda piece: print(piece, end="", flush=True)) if stream else None
        reply = session.send(prompt, on_text=on_text)
        if args.json:
            record = {"prompt": prompt, "text": reply.text, "tokens": len(reply.tokens)}
            print(json.dumps({**record, "finish_reason": reply.finish_reason}, ensure_ascii=False))
        elif stream:
            print()
        else:
            print(f"--- {reply.finish_reason}, {len(reply.tokens)} tokens ---\n{reply.text}")
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


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity / bits per byte on text; multiple-choice, translation, summary and QA tasks"
    )
    p.add_argument("model", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument("--text", action="append", default=[], help="a UTF-8 text file to score (repeatable)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="a folder written by `lmforge data prepare`: score its val split (repeatable)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        help="a task name (flores-zh-en, squad, hellaswag, ...), a task spec .yaml, or a multiple-choice "
        "JSONL file (repeatable)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="the folder holding eval/ for named tasks (default: $LMFORGE_DATA)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the spec's)")
    p.add_argument("--chat", action="store_true", help="give generative tasks through the chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="generative tasks: 0 is greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generative tasks: the most tokens generated per item (default: each task's max_new_tokens)",
    )
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--max-tokens", type=int, default=None, help="first N tokens of each text")
    p.add_argument("--seq-len", type=int, default=None, help="window for perplexity (default: the context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results, config and fingerprint as JSON here")
    add_decode_options(p)
    p.add_argument(
        "--no-log-samples",
        action="store_true",
        help="leave the per-item prompts, predictions and scores out of --out",
    )


def run_eval(args) -> int:
    import os

    from lmforge.infer.suite import evaluate_model, format_table, write_results

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
        data_dir=args.data_dir or os.environ.get("LMFORGE_DATA") or None,
        num_fewshot=args.num_fewshot,
        chat=True if args.chat else None,
        render_chat=None,  # --chat needs the model's template from lmforge.infer.chat (wired at merge)
        temperature=args.temperature,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        decode=decode_from_args(args),
    )
    for note in report.notes:
        print(note)
    print(format_table(report.results))
    for name, metrics in report.results.items():
        for key, value in metrics.items():
            if key.endswith("_signature"):
                print(f"{name} {key[: -len('_signature')]}: {value}")
    if args.out:
        print(f"wrote {write_results(report.to_dict(samples=not args.no_log_samples), args.out)}")
    return 0


def add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="supervised fine-tuning (instructions, chat), preference tuning or classification"
    )
    p.add_argument("base", help="an lmforge run/checkpoint folder or a Hugging Face model folder")
    p.add_argument(
        "data",
        help="JSONL: instruction/input/output, prompt/response or messages; text/label; prompt/chosen/rejected",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 train.lr=2e-5")
    p.add_argument("--out", required=True, help="the run folder to write")
    p.add_argument(
        "--task",
        choices=["sft", "classify", "dpo", "simpo", "orpo", "grpo", "dr_grpo", "dapo", "gspo"],
        default="sft",
        help="dpo/simpo/orpo: preference tuning on prompt/chosen/rejected records; grpo/dr_grpo/dapo/gspo: "
        "reinforcement learning with --reward on prompt (or messages) records",
    )
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
    p.add_argument(
        "--test-fraction", type=float, default=None, help="classify: the held-out split without --test (0.1)"
    )
    p.add_argument("--beta", type=float, default=None, help="dpo/simpo: default 0.1 (DPO), 2.0 (SimPO)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="dpo: label-flip probability (cDPO)")
    p.add_argument("--gamma", type=float, default=0.5, help="simpo: target reward margin")
    p.add_argument("--orpo-lambda", type=float, default=0.1, help="orpo: weight of the odds-ratio term")
    p.add_argument(
        "--reference",
        choices=["cached", "live"],
        default="cached",
        help="dpo: reference log-probs computed once before training (cached) or on every batch (live)",
    )
    rl = p.add_argument_group("reinforcement learning (--task grpo, dr_grpo, dapo, gspo)")
    rl.add_argument(
        "--reward",
        action="append",
        default=[],
        help="NAME[=WEIGHT] (exact, math, format, length, code) or module:function[=WEIGHT]; repeatable",
    )
    rl.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    rl.add_argument(
        "--prompts-per-step", type=int, default=8, help="prompts per optimizer step, all processes"
    )
    rl.add_argument("--max-new-tokens", type=int, default=128, help="the completion budget")
    rl.add_argument("--temperature", type=float, default=1.0)
    rl.add_argument("--top-p", type=float, default=1.0)
    rl.add_argument("--iterations", type=int, default=1, help="optimizer steps per generation (mu)")
    rl.add_argument("--generation-batch", type=int, default=0, help="groups per generate call (0: all)")
    rl.add_argument("--epsilon-low", type=float, default=None, help="clip below 1 - eps (variant's default)")
    rl.add_argument("--epsilon-high", type=float, default=None, help="clip above 1 + eps (variant's default)")
    rl.add_argument("--kl-beta", type=float, default=None, help="KL weight (grpo 0.04, the others 0)")
    rl.add_argument(
        "--raw-prompts", action="store_true", help="prompts as given, not through the chat template"
    )
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint path")
    p.add_argument("--no-progress", action="store_true")


def run_finetune(args) -> int:
    from lmforge.errors import ConfigError

    given = [
        flag
        for flag, value in (("--test", args.test), ("--test-fraction", args.test_fraction))
        if value is not None
    ]
    if given and args.task != "classify":  # refused, not ignored: only a classifier is scored on a test set
        raise ConfigError(
            f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --task classify; --task {args.task} holds out "
            f"--val-fraction of DATA (now {args.val_fraction}) instead"
        )
    if args.task in ("dpo", "simpo", "orpo"):
        return run_preference(args)
    if args.task in ("grpo", "dr_grpo", "dapo", "gspo"):
        return run_rl(args)
    if args.reward:
        raise ConfigError(
            f"--reward only applies to the RL tasks (grpo, dr_grpo, dapo, gspo), not {args.task}"
        )
    return run_classify(args) if args.task == "classify" else run_sft(args)


def run_preference(args) -> int:
    from lmforge.tune.preference import PreferenceConfig, tune_preferences

    preference = PreferenceConfig(
        method=args.task,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        gamma=args.gamma,
        lam=args.orpo_lambda,
        reference=args.reference,
    )
    result = tune_preferences(
        args.base,
        args.data,
        out_dir=args.out,
        preference=preference,
        overrides=args.overrides,
        lora=_lora(args),
        val_fraction=args.val_fraction,
        limit=args.limit,
        resume=args.resume,
        export_hf=args.export_hf,
        progress=False if args.no_progress else None,
    )
    print(
        f"{result.method}: {result.train_pairs} training / {result.val_pairs} held-out pairs, "
        f"{len(result.skipped)} skipped" + (f"; reference: {result.reference}" if result.reference else "")
    )
    for line in result.skipped[:20]:
        print(f"  skipped {line}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more")
    if result.val_after:
        before, after = result.val_before, result.val_after
        print(
            f"held-out reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
            f"margin {before['reward_margin']:.4f} -> {after['reward_margin']:.4f}, "
            f"loss {before['loss']:.4f} -> {after['loss']:.4f}"
        )
    print(f"final loss {result.final_loss}")
    print(
        f"tuned model: {result.model_dir}"
        + (f"; Hugging Face folder: {result.hf_dir}" if result.hf_dir else "")
    )
    return 0


def run_rl(args) -> int:
    from lmforge.tune.grpo import PolicyLoss
    from lmforge.tune.rl import tune_grpo
    from lmforge.tune.rollout import RolloutConfig

    rollout = RolloutConfig(
        group_size=args.group_size,
        prompts_per_step=args.prompts_per_step,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        iterations=args.iterations,
        generation_batch=args.generation_batch,
    )
    loss = PolicyLoss(
        variant=args.task, epsilon_low=args.epsilon_low, epsilon_high=args.epsilon_high, beta=args.kl_beta
    )
    result = tune_grpo(
        args.base,
        args.data,
        out_dir=args.out,
        rewards=args.reward,
        rollout=rollout,
        loss=loss,
        overrides=args.overrides,
        lora=_lora(args),
        raw_prompts=args.raw_prompts,
        val_fraction=args.val_fraction,
        limit=args.limit,
        resume=args.resume,
        export_hf=args.export_hf,
        progress=False if args.no_progress else None,
    )
    print(
        f"{result.variant}: {result.train_prompts} training / {result.val_prompts} held-out prompts, "
        f"{len(result.skipped)} skipped" + (f"; reference: {result.reference}" if result.reference else "")
    )
    for line in result.skipped[:20]:
        print(f"  skipped {line}")
    if result.val_after:
        print(
            "held-out mean reward (greedy) "
            + ", ".join(f"{k} {result.val_before[k]:.3f} -> {v:.3f}" for k, v in result.val_after.items())
        )
    print(f"final loss {result.final_loss}; sampled completions: {result.run_dir / 'completions.jsonl'}")
    print(f"planner: {result.memory}")
    print(
        f"tuned model: {result.model_dir}"
        + (f"; Hugging Face folder: {result.hf_dir}" if result.hf_dir else "")
    )
    return 0


def _lora(args):
    from lmforge.tune.lora import LoRAConfig

    if not args.lora_rank:
        return None
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets)


def run_classify(args) -> int:
    from lmforge.tune.classify import finetune_classifier

    result = finetune_classifier(
        args.base,
        args.data,
        out_dir=args.out,
        test_path=args.test,
        test_fraction=0.1 if args.test_fraction is None else args.test_fraction,
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


def run_sft(args) -> int:
    from lmforge.tune.sft import finetune

    lora = _lora(args)
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
        f"({result.skipped_examples} skipped: no assistant turn fits the context; "
        f"{result.cut_conversations} conversations cut at a turn boundary, {result.cut_turns} turns dropped)"
    )
    print(f"chat template: {result.chat_template}")
    print(f"final loss {result.final_loss}, validation loss {result.val_loss}")
    print(
        f"fine-tuned model: {result.model_dir}"
        + (f"; Hugging Face folder: {result.hf_dir}" if result.hf_dir else "")
    )
    return 0


def add_prune(sub) -> None:
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


def run_prune(args) -> int:
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
