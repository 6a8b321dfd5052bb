"""Claim: GRPO with a verifiable reward (``exact``) raises the held-out accuracy of a model that solves a task
only sometimes; compared with the same budget of further supervised fine-tuning (issue 28).

Setup: a char-level 2-layer model (printable ASCII) is SFT'd (``lmforge.tune.sft.finetune``, chat template) on
a letter-mapping puzzle (``--task cipher``: a 4-letter word -> each letter through a fixed substitution) or on
2-digit additions (``--task addition``) until it is right only part of the time. From that checkpoint:
(1) GRPO (``tune_grpo``, variant grpo, reward ``exact``, G completions per prompt, P prompts per step) on the
same training problems; (2) the same number of optimizer steps of further SFT on P x G examples per step
(the same sequences per step). Held-out accuracy: greedy answers to --eval problems (disjoint from training),
exact match, before and after each. The reward curve (mean sampled reward per step) is recorded. A rough
timing (--timing-steps GRPO steps with ``generation_batch`` 1 and 0; means, noisy on a shared machine; see
``grpo_step_time.py`` for medians over alternated rounds). ``--reuse-sft`` keeps DIR/sft from an earlier run.
Results: benchmarks/results/grpo_learning.json (cipher, T 0.5; the defaults), grpo_learning_cipher_t1.json
(--temperature 1), grpo_learning_addition.json (--task addition --sft-steps 500 --temperature 1).
Run: python benchmarks/grpo_learning.py [--task cipher] [--sft-steps 400] [--rl-steps 100] [--dir /tmp/grpo-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.config import Config, ModelConfig
from lmforge.data.tokenizer import char_tokenizer
from lmforge.infer.loading import load_for_inference
from lmforge.model.transformer import build_model
from lmforge.tune.grpo import PolicyLoss
from lmforge.tune.rewards import parse_reward
from lmforge.tune.rl import tune_grpo
from lmforge.tune.rollout import RolloutConfig, evaluate_rewards, read_prompts
from lmforge.tune.sft import finetune

CPU = torch.device("cpu")


CIPHER = dict(zip("abcdefghijklmnopqrstuvwxyz", random.Random(7).sample("abcdefghijklmnopqrstuvwxyz", 26)))


def problems(n: int, seed: int, task: str, exclude: set[str] = frozenset()) -> list[dict]:
    """``addition``: "a+b" -> the sum of two 2-digit numbers; ``cipher``: a 4-letter word -> each letter
    through a fixed substitution (a letter-mapping puzzle)."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        if task == "addition":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            prompt, answer = f"{a}+{b}", str(a + b)
        else:
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
            answer = "".join(CIPHER[c] for c in prompt)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": answer, "answer": answer})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def base_model(folder: Path) -> Path:
    tokenizer = char_tokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    tok_file = tokenizer.save(folder / "tok" / "tokenizer.json")
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, max_seq_len=64, n_layers=2, d_model=128, n_heads=4, n_kv_heads=4,
        ffn_hidden=384, tie_embeddings=True,
    )  # fmt: skip
    model = build_model(cfg, seed=0)
    return save_checkpoint(
        folder / "base", model_state=model.state_dict(), config=Config(model=cfg), tokenizer_file=tok_file
    )


def accuracy(model_dir: Path, eval_file: Path) -> float:
    loaded = load_for_inference(model_dir, device=CPU)
    tok = loaded.require_tokenizer()
    from lmforge.infer.chat import default_template

    rows, _ = read_prompts(
        eval_file, tok, loaded.chat_template or default_template(tok), max_prompt_tokens=56
    )
    return evaluate_rewards(loaded.model, rows, [parse_reward("exact")], tok, max_new_tokens=6, device=CPU)[
        "reward"
    ]


def step_times(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=["addition", "cipher"], default="cipher")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--rl-steps", type=int, default=100)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--rl-lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--timing-steps", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/grpo-bench")
    parser.add_argument(
        "--reuse-sft", action="store_true", help="keep DIR/sft from an earlier run of these settings"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_learning.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.dir)
    reuse = args.reuse_sft and (work / "sft" / "model").is_dir()
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    else:
        for name in ("grpo", "more-sft", "timing-1", "timing-0"):
            shutil.rmtree(work / name, ignore_errors=True)
    train = problems(args.train, seed=0, task=args.task)
    held_out = problems(args.eval, seed=1, task=args.task, exclude={r["prompt"] for r in train})
    train_file, eval_file = (
        write_jsonl(work / "train.jsonl", train),
        write_jsonl(work / "eval.jsonl", held_out),
    )
    base = base_model(work)
    quiet = ["train.log_every=1", "train.ckpt_every=100000", "train.eval_every=100000"]

    started = time.perf_counter()
    sft = SimpleNamespace(model_dir=work / "sft" / "model") if reuse else finetune(
        base, train_file, out_dir=work / "sft", val_fraction=0.0, progress=False,
        overrides=[f"train.steps={args.sft_steps}", f"train.lr={args.sft_lr}", f"train.min_lr={args.sft_lr / 10}", "train.micro_batch=32",
                   "train.seq_len=64", "train.warmup_steps=20", *quiet],
    )  # fmt: skip
    sft_seconds = time.perf_counter() - started
    acc_sft = accuracy(sft.model_dir, eval_file)
    print(f"SFT {args.sft_steps} steps ({sft_seconds:.0f} s): held-out accuracy {acc_sft:.3f}", flush=True)
    if args.rl_steps == 0:
        return

    per_step = args.group * args.prompts
    rollout = RolloutConfig(
        group_size=args.group, prompts_per_step=args.prompts, max_new_tokens=6, temperature=args.temperature
    )
    started = time.perf_counter()
    rl = tune_grpo(
        sft.model_dir, train_file, out_dir=work / "grpo", rewards=["exact"], rollout=rollout,
        loss=PolicyLoss(variant="grpo"), val_fraction=0.0, progress=False,
        overrides=[f"train.steps={args.rl_steps}", f"train.lr={args.rl_lr}", f"train.min_lr={args.rl_lr / 10}",
                   "train.warmup_steps=5", *quiet],
    )  # fmt: skip
    rl_seconds = time.perf_counter() - started
    acc_rl = accuracy(rl.model_dir, eval_file)
    curve = [(r["step"], round(r["reward"], 4)) for r in step_times(rl.run_dir)]
    print(f"GRPO {args.rl_steps} steps ({rl_seconds:.0f} s): held-out accuracy {acc_sft:.3f} -> {acc_rl:.3f}")

    started = time.perf_counter()
    more = finetune(
        sft.model_dir, train_file, out_dir=work / "more-sft", val_fraction=0.0, progress=False,
        overrides=[f"train.steps={args.rl_steps}", f"train.lr={args.rl_lr}", f"train.min_lr={args.rl_lr / 10}",
                   f"train.micro_batch={per_step}", "train.seq_len=64", "train.warmup_steps=5", *quiet],
    )  # fmt: skip
    more_seconds = time.perf_counter() - started
    acc_more = accuracy(more.model_dir, eval_file)
    print(
        f"further SFT {args.rl_steps} steps ({more_seconds:.0f} s): held-out accuracy {acc_sft:.3f} -> {acc_more:.3f}"
    )

    timing = {}
    for batch in (1, 0):
        out_dir = work / f"timing-{batch}"
        r = RolloutConfig(
            group_size=args.group, prompts_per_step=args.prompts, max_new_tokens=6, generation_batch=batch
        )
        t0 = time.perf_counter()
        tune_grpo(
            sft.model_dir, train_file, out_dir=out_dir, rewards=["exact"], rollout=r, val_fraction=0.0, progress=False,
            overrides=[f"train.steps={args.timing_steps}", *quiet],
        )  # fmt: skip
        total = time.perf_counter() - t0
        steps = step_times(out_dir)[1:]  # the first step includes start-up
        gen = sum(s["generate_s"] for s in steps) / len(steps)
        logps = sum(s["logps_s"] for s in steps) / len(steps)
        tokens_per_step = steps[1]["tokens"] - steps[0]["tokens"]
        wall = sum(tokens_per_step / s["tokens_per_s"] for s in steps) / len(steps)  # the loop's interval
        timing["one group per call" if batch == 1 else "all groups in one call"] = {
            "generate_s_per_step": round(gen, 4),
            "logps_s_per_step": round(logps, 4),
            "step_s": round(wall, 4),
            "training_s_per_step": round(wall - gen - logps, 4),
            "run_seconds": round(total, 2),
        }
        print(
            f"generation_batch={batch}: step {wall:.3f} s = generate {gen:.3f} + log-probs {logps:.3f} + training"
        )

    result = {
        "claim": "GRPO on a verifiable reward raises held-out accuracy; compared with the same budget of further SFT",
        "task": f"{args.task}, {args.train} training / {args.eval} held-out problems, greedy exact match",
        "model": "char-level, 2 layers, d_model 128 (printable ASCII)",
        "sft_steps": args.sft_steps,
        "sft_seconds": None if reuse else round(sft_seconds, 1),
        "held_out_accuracy": {"after_sft": acc_sft, "grpo": acc_rl, "further_sft": acc_more},
        "budget": {"steps": args.rl_steps, "sequences_per_step": per_step, "grpo_seconds": round(rl_seconds, 1),
                   "further_sft_seconds": round(more_seconds, 1)},
        "grpo": {"variant": "grpo (beta 0.04, eps 0.2)", "group_size": args.group, "prompts_per_step": args.prompts,
                 "lr": args.rl_lr, "temperature": args.temperature},
        "sft_lr": args.sft_lr,
        "reward_curve": curve,
        "timing": timing,
        "load_average": os.getloadavg()[0],
        "threads": 1,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
