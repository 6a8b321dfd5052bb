"""Claim: where a GRPO step's time goes (sampling, reference log-probs, training) and how the generator's
batching changes the sampling part (issue 28).

Setup: (1) the sampling of one step alone: P prompts x G completions with ``generate_ids`` (the KV-cache
generator the rollout uses), as P calls of one group (G rows) or as one call of all P x G rows, alternated
over --rounds rounds, min and median seconds of each; (2) a short GRPO run (``tune_grpo``, reward ``exact``,
beta 0.04, so the reference is scored every step) with each ``generation_batch`` (1 group per call, all
groups in one call): per-step medians of ``generate_s`` (sampling + rewards), ``logps_s`` (the reference's
log-probs) and the step's wall time from the loop's own interval (step - the two = training: forward,
backward, optimizer, the logged figures). CPU, one thread; the load average is recorded beside the figures.
Results: benchmarks/results/grpo_step_time.json.
Run: python benchmarks/grpo_step_time.py --model DIR [--prompts 8] [--group 8] [--steps 8] [--rounds 7]
(DIR: an lmforge checkpoint, e.g. the SFT model ``grpo_learning.py`` leaves in its --dir /sft/model)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from lmforge.infer.chat import default_template
from lmforge.infer.generate import generate_ids
from lmforge.infer.loading import load_for_inference
from lmforge.tune.rl import tune_grpo
from lmforge.tune.rollout import RolloutConfig, read_prompts

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="prompts JSONL with an answer field")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", default="/tmp/grpo-step-time")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_step_time.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_for_inference(args.model, device=CPU)
    tok = loaded.require_tokenizer()
    rows, _ = read_prompts(
        args.data, tok, loaded.chat_template or default_template(tok), max_prompt_tokens=56
    )
    prompts = [r.ids for r in rows[: args.prompts]]
    rollout = RolloutConfig(
        group_size=args.group, prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens
    )

    def sample(per_call: int, seed: int) -> float:
        started = time.perf_counter()
        for start in range(0, len(prompts), per_call):
            batch = [p for p in prompts[start : start + per_call] for _ in range(args.group)]
            generate_ids(loaded.model, batch, rollout.sampling(seed), device=CPU, eos_id=tok.eot_id, pad_id=0)
        return time.perf_counter() - started

    seconds: dict[int, list[float]] = {1: [], args.prompts: []}
    for r in range(args.rounds):
        for per_call in seconds:  # alternated, so a burst of other jobs meets both
            seconds[per_call].append(sample(per_call, seed=r))
    sampling = {
        f"{per_call} group(s) per call": {
            "min_s": round(min(s), 4),
            "median_s": round(statistics.median(s), 4),
        }
        for per_call, s in seconds.items()
    }
    speedup = statistics.median(seconds[1]) / statistics.median(seconds[args.prompts])
    print(f"sampling one step: {sampling}; one call / one group per call: {speedup:.2f}x faster")

    runs = {}
    for batch in (1, 0):
        out_dir = Path(args.dir) / f"run-{batch}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = RolloutConfig(
            group_size=args.group, prompts_per_step=args.prompts, max_new_tokens=args.max_new_tokens,
            generation_batch=batch,
        )  # fmt: skip
        tune_grpo(
            args.model, args.data, out_dir=out_dir, rewards=["exact"], rollout=cfg, val_fraction=0.0,
            progress=False, overrides=[f"train.steps={args.steps}", "train.log_every=1", "train.ckpt_every=100000"],
        )  # fmt: skip
        logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logged if "generate_s" in r][1:]  # the first step includes start-up
        per_step_tokens = steps[1]["tokens"] - steps[0]["tokens"]
        step_s = statistics.median(per_step_tokens / s["tokens_per_s"] for s in steps)
        gen = statistics.median(s["generate_s"] for s in steps)
        ref = statistics.median(s["logps_s"] for s in steps)
        name = "one group per call" if batch == 1 else "all groups in one call"
        runs[name] = {
            "step_s": round(step_s, 4),
            "generate_s": round(gen, 4),
            "reference_logps_s": round(ref, 4),
            "training_s": round(step_s - gen - ref, 4),
            "generation_share": round((gen + ref) / step_s, 3),
        }
        print(f"{name}: {runs[name]}")
    result = {
        "claim": "time per GRPO step split into generation and training; batching the generator's calls",
        "model": str(args.model),
        "prompts_per_step": args.prompts,
        "group_size": args.group,
        "max_new_tokens": args.max_new_tokens,
        "sampling_one_step": sampling,
        "sampling_speedup_one_call": round(speedup, 2),
        "grpo_steps_median": runs,
        "load_average": os.getloadavg()[0],
        "threads": 1,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
