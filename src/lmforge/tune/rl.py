"""``lmforge finetune MODEL prompts.jsonl --task grpo --reward NAME ...``: reinforcement learning with
verifiable rewards, as one run of the one training loop.

The recipe: read the prompts through the model's chat template (records: ``prompt`` or ``messages``, plus
whatever the rewards read, e.g. ``answer``), hold some out, score the base model's greedy answers to them,
train (``tune.rollout.RolloutLoader`` samples and scores; ``tune.grpo.GRPOObjective`` is the loss), save the
model (LoRA merged), score the held-out prompts again. The run folder also holds ``completions.jsonl``:
a few sampled completions with their rewards per generation.

Batch arithmetic: one optimizer step trains on ``prompts_per_step x group_size`` completions over all
processes, in micro-batches of ``train.micro_batch`` completions (default: one group), so the loop
accumulates ``prompts_per_step x group_size / (micro_batch x processes)`` micro-batches per step.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import ConfigError
from lmforge.tune.grpo import GRPOObjective, PolicyLoss
from lmforge.tune.lora import LoRAConfig, apply_lora
from lmforge.tune.rewards import parse_reward
from lmforge.tune.rollout import Reference, RolloutConfig, RolloutLoader, evaluate_rewards, read_prompts

DEFAULT_ROLLOUT = RolloutConfig()
DEFAULT_LOSS = PolicyLoss()


@dataclass
class RLResult:
    run_dir: Path
    model_dir: Path  # a plain lmforge checkpoint of the tuned model (LoRA merged)
    variant: str
    reference: str | None  # "LoRA adapters off", "frozen copy", None (beta = 0)
    final_loss: float | None
    train_prompts: int
    val_prompts: int
    skipped: list[str]  # "file:line: why" for every prompt left out
    val_before: dict[str, float]  # mean held-out rewards of the base model's greedy answers
    val_after: dict[str, float]  # ... and of the tuned model's
    hf_dir: Path | None
    memory: str = ""  # the planner's figure for the RL step (plan.rl)


def rl_config(loaded_cfg, out_dir, overrides: Sequence[str], rollout: RolloutConfig, prompt_tokens: int):
    """The run's Config: fine-tuning defaults, a group per micro-batch, the context a prompt and its
    completion need; then the overrides; then the step's batch in completions (see the module docstring)."""
    from lmforge.tune.sft import finetune_config

    seq_len = min(prompt_tokens + rollout.max_new_tokens, loaded_cfg.model.max_seq_len)
    defaults = [
        f"train.seq_len={seq_len}",
        f"train.micro_batch={rollout.group_size}",
        "train.eval_every=1000000",
    ]
    cfg = finetune_config(loaded_cfg, out_dir, [*defaults, *overrides])
    per_step = rollout.prompts_per_step * rollout.group_size
    if per_step % cfg.train.micro_batch:
        raise ConfigError(
            f"prompts per step x group size = {per_step} completions is not a multiple of "
            f"train.micro_batch={cfg.train.micro_batch}"
        )
    # the loop accumulates global_batch_tokens / (micro x seq_len x processes) micro-batches per step
    tokens = per_step * cfg.train.seq_len
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_tokens=tokens))


def tune_grpo(
    base: str | Path,
    data_path: str | Path,
    *,
    out_dir: str | Path,
    rewards: Sequence[str],
    rollout: RolloutConfig = DEFAULT_ROLLOUT,
    loss: PolicyLoss = DEFAULT_LOSS,
    overrides: Sequence[str] = (),
    lora: LoRAConfig | None = None,
    raw_prompts: bool = False,
    val_fraction: float = 0.05,
    limit: int | None = None,
    resume: str | None = None,
    export_hf: str | Path | None = None,
    progress: bool | None = None,
) -> RLResult:
    """Tune ``base`` (an lmforge run/checkpoint or a Hugging Face folder) by RL on the prompts of
    ``data_path`` with ``rewards`` (``NAME[=WEIGHT]`` or ``module:function[=WEIGHT]``). Every input is read
    and checked before any run folder is written. (Long by choice: the recipe in order.)"""
    from lmforge.infer.chat import default_template
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.loop import train
    from lmforge.train.run import Task, pick_device
    from lmforge.tune.sft import save_final_model, split_examples

    problems = loss.problems() + rollout.problems() + (lora.problems() if lora is not None else [])
    if lora is not None and any(o.replace(" ", "") == "parallel.strategy=fsdp" for o in overrides):
        problems.append(
            "LoRA with parallel.strategy=fsdp: use full fine-tuning or ddp (the final merge needs it)"
        )
    if not rewards:
        problems.append(
            "no reward: give --reward NAME (exact, math, format, length, code) or module:function"
        )
    if problems:
        raise ConfigError("invalid RL settings:\n  " + "\n  ".join(problems))
    parsed = [parse_reward(r) for r in rewards]
    loaded = load_for_inference(base, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    template = None if raw_prompts else (loaded.chat_template or default_template(tokenizer))
    context = loaded.config.model.max_seq_len
    prompts, skipped = read_prompts(
        data_path, tokenizer, template, max_prompt_tokens=context - rollout.max_new_tokens, limit=limit
    )
    longest = max(len(p.ids) for p in prompts)
    cfg = rl_config(loaded.config, out_dir, overrides, rollout, longest)
    tc = cfg.train
    train_prompts, val_prompts = split_examples(prompts, val_fraction, tc.seed)
    device = pick_device(tc.device)
    resolved = loss.resolved()
    base_model = loaded.model.to(device)
    evaluate = lambda model: evaluate_rewards(  # noqa: E731
        model, val_prompts, parsed, tokenizer, max_new_tokens=rollout.max_new_tokens, device=device
    )
    val_before = evaluate(base_model) if val_prompts else {}
    base_state = {k: v.cpu() for k, v in base_model.state_dict().items()}
    base_model.cpu()

    loader = RolloutLoader(
        train_prompts,
        rewards=parsed,
        rollout=rollout,
        loss=loss,
        tokenizer=tokenizer,
        micro_batch=tc.micro_batch,
        seed=tc.seed,
        vocab_size=cfg.model.vocab_size,
        tokenizer_path=str(loaded.tokenizer_path),
        precision=tc.precision,
        log_path=Path(out_dir) / "completions.jsonl",
    )
    reference_kind = None if resolved.beta == 0 else ("LoRA adapters off" if lora else "frozen copy")

    def adapt(model):
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        reference = None
        if resolved.beta > 0:
            reference = Reference(None if lora else copy.deepcopy(model).requires_grad_(False).eval())
        model = apply_lora(model, lora) if lora is not None else model
        loader.bind(model, reference)
        return model

    memory = step_memory(
        cfg, rollout, longest, reference_copy=resolved.beta > 0 and lora is None, device=device
    )
    lineage = rl_lineage(
        base, loaded, data_path, resolved.variant, template, (train_prompts, val_prompts, skipped)
    )
    task = Task(
        loader=loader,
        val_batches=lambda: (),
        objective=GRPOObjective(resolved, rollout.max_new_tokens, rollout.temperature),
        adapt_model=adapt,
        lineage=lineage,
    )
    result = train(cfg, resume=resume, task=task, progress=progress)
    loader.reference = None  # the frozen copy is no longer needed
    model_dir = Path(out_dir) / "model"
    if loader.rank == 0:  # under torchrun, rank 0 writes the final model and scores it
        save_final_model(whole_checkpoint(result.checkpoint), cfg, lora, model_dir, loaded.tokenizer_path)
    val_after = {}
    if val_prompts and loader.rank == 0:
        from lmforge.checkpoint import load_model_state
        from lmforge.model.transformer import build_model

        tuned = build_model(cfg.model, device="cpu")
        tuned.load_state_dict(load_model_state(model_dir, cfg), strict=True)
        val_after = evaluate(tuned.to(device))
    hf_dir = None
    if export_hf is not None and loader.rank == 0:
        from lmforge.convert import export_model

        hf_dir = export_model(model_dir, export_hf, verify=True).out_dir
    return RLResult(
        run_dir=result.run_dir,
        model_dir=model_dir,
        variant=resolved.variant,
        reference=reference_kind,
        final_loss=result.final_loss,
        train_prompts=len(train_prompts),
        val_prompts=len(val_prompts),
        skipped=skipped,
        val_before=val_before,
        val_after=val_after,
        hf_dir=hf_dir,
        memory=memory.describe(),
    )


def step_memory(cfg, rollout: RolloutConfig, prompt_tokens: int, *, reference_copy: bool, device):
    """The planner's memory of one process's RL step (``plan.rl``) for this run's layout and batches."""
    from lmforge.plan.memory import Layout
    from lmforge.plan.rl import rl_memory

    tc, parallel = cfg.train, cfg.parallel
    world = parallel.world_size or 1
    strategy = parallel.strategy if parallel.strategy != "auto" else ("single" if world == 1 else "ddp")
    per_process = rollout.prompts_per_step // world
    layout = Layout(
        strategy=strategy,
        world_size=world,
        micro_batch=tc.micro_batch,
        seq_len=tc.seq_len,
        grad_accum=max(1, per_process * rollout.group_size // tc.micro_batch),
        precision=tc.precision,
        device_kind=device.type,
    )
    return rl_memory(
        cfg.model,
        layout,
        rows_per_call=(rollout.generation_batch or per_process) * rollout.group_size,
        prompt_tokens=prompt_tokens,
        max_new_tokens=rollout.max_new_tokens,
        reference_copy=reference_copy,
    )


def whole_checkpoint(directory: Path) -> Path:
    """The run's last checkpoint as one folder: a sharded (FSDP) one is consolidated beside it first."""
    import shutil

    from lmforge.checkpoint.sharded import consolidate, is_sharded

    if not is_sharded(directory):
        return directory
    out = consolidate(directory, directory.parent / f"{directory.name}-whole")
    card = directory / "MODEL_CARD.md"
    if card.is_file():
        shutil.copyfile(card, out / "MODEL_CARD.md")
    return out


def rl_lineage(base, loaded, data_path, variant: str, template, split: tuple) -> dict:
    """What the model card says of where this model comes from: this stage's data, then the base's card."""
    from lmforge.train.card import data_licence, find_card

    train_prompts, val_prompts, skipped = split
    n = len(train_prompts) + len(val_prompts)
    data = {"path": str(data_path), "records": n + len(skipped), "examples": n}
    return {
        "base": str(base),
        "base_card": find_card(loaded.directory),
        "stage": f"reinforcement learning with verifiable rewards ({variant.upper()})",
        "data": [{**data, "licence": data_licence(data_path)}],
        "chat_template": template.origin if template is not None else "none (raw prompts)",
        "counts": {
            "train prompts": len(train_prompts),
            "held-out prompts": len(val_prompts),
            "skipped prompts": len(skipped),
        },
    }
