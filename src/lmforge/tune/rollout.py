"""The rollout of reinforcement learning with verifiable rewards: prompts in, scored completions out, as the
micro-batches the one training loop draws (``RolloutLoader`` has the loader interface), so the loop stays one
loop and RL is an ``Objective`` of it (``tune.grpo.GRPOObjective``).

Per generation (every ``iterations`` optimizer steps), on each process:
  1. the next prompts of a seeded stream (a permutation per epoch); of the ``prompts_per_step`` prompts of a
     round each process takes its slice;
  2. ``group_size`` completions per prompt from the current policy with the KV-cache generator
     (``infer.generate.generate_ids``), ``generation_batch`` groups per call, each call seeded by
     (``train.seed``, round, call): sampling depends on neither the process count nor the resume point;
  3. the rewards (``tune.rewards``), the group-relative advantages and, with DAPO's dynamic sampling, more
     rounds until every process has enough groups whose rewards differ (at most ``max_sampling_rounds``;
     then groups without signal fill the batch);
  4. the token log-probs of the reference (beta > 0) and, when a generation is optimised more than once, of
     the sampling policy, under ``torch.no_grad``.
The buffer of a generation is part of the loader's state, so a checkpoint taken between the steps that use
it resumes bit for bit. Under FSDP each process samples from a whole copy of the policy gathered from the
shards once per generation (the generator's path is not a collective forward pass): memory for one more copy
of the weights during generation.

Shape legend: P prompts, G completions per prompt, B micro-batch, T tokens.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.data.batch import IGNORE_INDEX
from lmforge.errors import ConfigError, DataError
from lmforge.files import jsonl_records
from lmforge.infer.chat import ChatTemplate, encode_chat, special_token_ids
from lmforge.infer.generate import SamplingConfig, Tokenizer, generate_ids
from lmforge.tune.grpo import PolicyLoss, RolloutBatch, group_advantages, informative_groups, token_logps
from lmforge.tune.rewards import Reward, score, total


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How completions are sampled and batched (defaults: TRL's GRPOTrainer where it has one)."""

    group_size: int = 8  # G: completions per prompt
    prompts_per_step: int = 8  # P: prompts per optimizer step, over all processes
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    iterations: int = 1  # optimizer steps per generation (GRPO's mu); > 1 records the sampling log-probs
    generation_batch: int = 0  # groups per generate call; 0: all of a process's groups in one call
    max_sampling_rounds: int = 3  # dynamic sampling: rounds of prompts to find groups with signal
    log_completions: int = 4  # completions written to completions.jsonl per generation (rank 0)

    def problems(self) -> list[str]:
        out = []
        for name in ("group_size", "prompts_per_step", "max_new_tokens", "iterations", "max_sampling_rounds"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            out.append(f"group_size={self.group_size}: a group needs at least 2 completions to compare")
        if self.generation_batch < 0:
            out.append(f"generation_batch={self.generation_batch} must be >= 0 (0: all groups at once)")
        if self.temperature <= 0:
            out.append(
                f"temperature={self.temperature} must be > 0: a group of greedy completions has no spread"
            )
        return out

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=seed,
        )


# -- prompts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRow:
    ids: list[int]  # the prompt's tokens (through the chat template unless raw)
    text: str  # the prompt as rendered
    record: dict  # the JSONL record, handed to the reward functions (its ``answer``, ``tests``, ...)
    where: str  # file:line


def render_prompt(obj: dict, where: str, template: ChatTemplate | None) -> str:
    """A record's prompt as text: ``prompt`` (a string: one user message) or ``messages`` (the conversation
    so far), through ``template`` with the assistant's turn opened; ``template=None``: the raw string."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        if template is None:
            raise DataError(f"{where}: 'messages' records need the chat template (drop --raw-prompts)")
        return template.render(messages, add_generation_prompt=True, where=where)
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(
            f"{where}: an RL record needs a 'prompt' string or 'messages' (found: {', '.join(sorted(obj))})"
        )
    if template is None:
        return prompt
    return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True, where=where)


def read_prompts(
    path: str | Path,
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    *,
    max_prompt_tokens: int,
    limit: int | None = None,
) -> tuple[list[PromptRow], list[str]]:
    """(usable prompts, "file:line: why" for each prompt left out: longer than ``max_prompt_tokens``)."""
    specials = special_token_ids(tokenizer, template) if template is not None else {}
    rows, skipped = [], []
    for obj, where in jsonl_records(path, "RL prompts file"):
        if limit is not None and len(rows) >= limit:
            break
        text = render_prompt(obj, where, template)
        ids = encode_chat(tokenizer, text, specials)
        if len(ids) > max_prompt_tokens:
            skipped.append(
                f"{where}: the prompt is {len(ids)} tokens; at most {max_prompt_tokens} leave room for the completion"
            )
            continue
        rows.append(PromptRow(ids, text, obj, where))
    if not rows:
        raise DataError(f"{path}: no usable prompts" + (f" ({skipped[0]})" if skipped else ""))
    return rows, skipped


# -- references ---------------------------------------------------------------------------------------------


class Reference:
    """The KL reference's token log-probs: a frozen copy of the base (full fine-tuning) or, when ``copy`` is
    None, the policy with its LoRA adapters switched off (no second set of weights)."""

    def __init__(self, copy: nn.Module | None = None) -> None:
        self.copy = copy

    @torch.no_grad()
    def logps(
        self, policy: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        if self.copy is not None:
            return token_logps(self.copy, inputs, targets, temperature)[0]
        from lmforge.tune.preference import adapters_off

        with adapters_off(policy):
            return token_logps(policy, inputs, targets, temperature)[0]


# -- the loader ---------------------------------------------------------------------------------------------


def call_seed(seed: int, round_index: int, call: int) -> int:
    """The sampling seed of one generate call: a pure function of the run's seed, the round, the call."""
    return ((seed * 1_000_003 + round_index) * 10_007 + call) % (2**63)


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T): right-padded to the longest row (pad ids; IGNORE_INDEX targets)."""
    T = max(len(i) for i, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for r, (i, t) in enumerate(rows):
        inputs[r, : len(i)] = torch.tensor(i, dtype=torch.long)
        targets[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    return inputs, targets


@dataclass
class Group:
    prompt: PromptRow
    completions: list[list[int]]  # G token lists, each ending with end-of-text when the model ended it
    texts: list[str]
    scores: dict[str, list[float]]  # reward name -> G scores
    rewards: list[float]  # G weighted totals


class RolloutLoader:
    """Micro-batches of scored completions with the ``BatchLoader`` interface (see the module docstring).
    ``bind`` hands it the policy (and the reference) once the run has built the model."""

    def __init__(
        self,
        prompts: list[PromptRow],
        *,
        rewards: Sequence[Reward],
        rollout: RolloutConfig,
        loss: PolicyLoss,
        tokenizer: Tokenizer,
        micro_batch: int,
        seed: int,
        vocab_size: int,
        tokenizer_path: str | None,
        precision: str = "fp32",
        log_path: Path | None = None,
    ):
        if not prompts:
            raise DataError("no RL prompts")
        self.prompts, self.rewards, self.rollout = prompts, list(rewards), rollout
        self.loss = loss.resolved()
        self.tokenizer, self.batch_size, self.seed = tokenizer, micro_batch, seed
        self.vocab_size, self.tokenizer_path, self.precision = vocab_size, tokenizer_path, precision
        self.log_path = log_path
        self.eot = tokenizer.eot_id
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.eot or 0)
        self.rank = 0
        self.policy: nn.Module | None = None
        self.reference: Reference | None = None
        # the state a checkpoint saves
        self.drawn = 0  # prompts taken from the stream, over all processes
        self.rounds = 0  # rounds of prompts sampled
        self.generations = 0
        self.position = 0  # micro-batches drawn from the current buffer (over its iterations)
        self.buffer: list[RolloutBatch] = []
        self.timings: dict[str, float] = {}

    # -- wiring --
    def bind(self, policy: nn.Module, reference: Reference | None) -> None:
        self.policy, self.reference = policy, reference

    @property
    def rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    # -- the prompt stream --
    def _prompt_at(self, index: int) -> PromptRow:
        n = len(self.prompts)
        epoch, offset = divmod(index, n)
        order = list(range(n))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return self.prompts[order[offset]]

    def _draw_round(self) -> list[PromptRow]:
        """This process's slice of the next ``prompts_per_step`` prompts of the stream."""
        rank, world = self.rank_world
        self.rank = rank  # remembered for after the run, when the process group is gone
        P = self.rollout.prompts_per_step
        if P % world:
            raise ConfigError(f"--prompts-per-step {P} must be a multiple of the process count {world}")
        mine = range(self.drawn + rank * (P // world), self.drawn + (rank + 1) * (P // world))
        self.drawn += P
        return [self._prompt_at(i) for i in mine]

    # -- generation --
    def _generator_model(self) -> nn.Module:
        """The policy to sample from: itself, or under FSDP (whose forward passes are collective, and whose
        generation path is not a forward pass) a whole copy gathered from the shards (LoRA merged)."""
        from torch.distributed.tensor import DTensor

        from lmforge.distributed.parallelize import is_sharded
        from lmforge.model.transformer import build_model
        from lmforge.tune.lora import LoRALinear

        policy = self.policy
        if not is_sharded(policy):
            return policy
        state = {  # every rank gathers every parameter, in the same order
            name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for name, p in policy.named_parameters()
        }
        for name, module in policy.named_modules():
            if isinstance(module, LoRALinear):
                A, B = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")
                state[f"{name}.weight"] = state[f"{name}.weight"] + module.scaling * (B @ A)
        whole = build_model(policy.cfg, device=self._device())
        missing, unexpected = whole.load_state_dict(state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        whole.tie_weights()
        return whole

    def _generate(
        self, model: nn.Module, rows: list[list[int]], seed: int, device: torch.device
    ) -> list[list[int]]:
        """Completions of ``rows`` (prompt ids), each ending with end-of-text when the model ended it."""
        sampling = self.rollout.sampling(seed)
        out = generate_ids(model, rows, sampling, device=device, eos_id=self.eot, pad_id=self.pad_id)
        return [t + [self.eot] if r == "eos" else t for t, r in zip(out.tokens, out.finish_reasons)]

    def _sample_groups(self, model: nn.Module, prompts: list[PromptRow], device: torch.device) -> list[Group]:
        G, rank_world = self.rollout.group_size, self.rank_world
        per_call = self.rollout.generation_batch or len(prompts)
        first_call = rank_world[0] * math.ceil(len(prompts) / per_call)  # global call index of this rank
        groups = []
        for c, start in enumerate(range(0, len(prompts), per_call)):
            chunk = prompts[start : start + per_call]
            rows = [p.ids for p in chunk for _ in range(G)]
            seed = call_seed(self.seed, self.rounds, first_call + c)
            completions = self._generate(model, rows, seed, device)
            for k, prompt in enumerate(chunk):
                mine = completions[k * G : (k + 1) * G]
                texts = [self.tokenizer.decode([t for t in c if t != self.eot]) for c in mine]
                scores = score(
                    self.rewards,
                    texts,
                    [prompt.record] * G,
                    completion_lengths=[len(c) for c in mine],
                    max_length=self.rollout.max_new_tokens,
                )
                groups.append(Group(prompt, mine, texts, scores, total(self.rewards, scores)))
        self.rounds += 1
        return groups

    def _agree_short(self, short: bool) -> bool:
        if self.rank_world[1] == 1:
            return short
        flag = torch.tensor([1.0 if short else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def _collect(self, device: torch.device) -> tuple[list[Group], list[Group]]:
        """(the groups to train on, every group sampled): DAPO's dynamic sampling keeps drawing rounds
        while any process lacks groups with signal (at most ``max_sampling_rounds``)."""
        want = self.rollout.prompts_per_step // self.rank_world[1]
        model = self._generator_model()
        sampled = self._sample_groups(model, self._draw_round(), device)
        if not self.loss.dynamic_sampling:
            return sampled, sampled
        rounds = 1
        while True:
            signal = [g for g in sampled if informative_groups(torch.tensor([g.rewards]))[0]]
            short = len(signal) < want
            if rounds >= self.rollout.max_sampling_rounds or not self._agree_short(short):
                break
            sampled += self._sample_groups(model, self._draw_round(), device)
            rounds += 1
        chosen = {id(g) for g in signal}
        return (signal + [g for g in sampled if id(g) not in chosen])[:want], sampled

    @torch.no_grad()
    def _generate_buffer(self) -> None:
        from lmforge.train.loop import autocast_for

        if self.policy is None:
            raise RuntimeError("RolloutLoader.bind(policy) must be called before drawing batches")
        device = self._device()
        started = time.perf_counter()
        with autocast_for(device, self.precision):
            kept, sampled = self._collect(device)
        generated = time.perf_counter()
        rewards = torch.tensor([g.rewards for g in kept], dtype=torch.float64)  # (P, G)
        advantages = group_advantages(rewards, scale=self.loss.scale_rewards).to(torch.float32)  # (P, G)
        rows, adv = [], []
        for g, a in zip(kept, advantages):
            for completion, value in zip(g.completions, a.tolist()):
                prompt = g.prompt.ids
                inputs = (prompt + completion)[:-1]
                rows.append((inputs, [IGNORE_INDEX] * (len(prompt) - 1) + completion))
                adv.append(value)
        if len(rows) % self.batch_size:
            raise ConfigError(
                f"{len(rows)} completions per process per step (prompts per step x group size / processes) "
                f"is not a multiple of train.micro_batch={self.batch_size}"
            )
        stats = self._stats(kept, sampled)
        buffer, temperature = [], self.rollout.temperature
        for i in range(0, len(rows), self.batch_size):
            inputs, targets = pad_rows(rows[i : i + self.batch_size], self.pad_id)
            inputs, targets = inputs.to(device), targets.to(device)
            old = ref = None
            with autocast_for(device, self.precision):
                if self.rollout.iterations > 1:
                    old = token_logps(self.policy, inputs, targets, temperature)[0].cpu()
                if self.loss.beta > 0:
                    if self.reference is None:
                        raise ConfigError(f"beta={self.loss.beta} needs a reference model")
                    ref = self.reference.logps(self.policy, inputs, targets, temperature).cpu()
            advantages_i = torch.tensor(adv[i : i + self.batch_size])  # (B,)
            buffer.append(
                RolloutBatch(
                    inputs.cpu(), targets.cpu(), advantages=advantages_i, old_logps=old, ref_logps=ref
                )
            )
        scored = time.perf_counter()
        stats.update(generate_s=generated - started, logps_s=scored - generated)
        for b in buffer:
            b.stats = stats
        self.buffer, self.position = buffer, 0
        self._log_completions(kept)
        self.generations += 1

    def _stats(self, kept: list[Group], sampled: list[Group]) -> dict[str, float]:
        """Figures of a generation, over every process: the mean and standard deviation of the rewards (the
        weighted total and each function's) of the completions trained on, the fraction of sampled groups
        without signal, the mean completion length."""
        names = [r.name for r in self.rewards]
        values = [[sum(g.rewards), sum(x * x for x in g.rewards)] for g in kept]
        sums = [
            sum(v[0] for v in values),
            sum(v[1] for v in values),
            float(sum(len(g.rewards) for g in kept)),
            float(sum(1 for g in sampled if not informative_groups(torch.tensor([g.rewards]))[0])),
            float(len(sampled)),
            float(sum(len(c) for g in kept for c in g.completions)),
            *[sum(sum(g.scores[n]) for g in kept) for n in names],
            *[sum(x * x for g in kept for x in g.scores[n]) for n in names],
        ]
        if self.rank_world[1] > 1:
            t = torch.tensor(sums, dtype=torch.float64, device=self._device())
            dist.all_reduce(t)
            sums = t.tolist()
        total_, squares, n, flat, groups, length = sums[:6]
        mean = total_ / n
        out = {
            "reward": mean,
            "reward_std": math.sqrt(max(0.0, squares / n - mean * mean)),
            "zero_variance_groups": flat / groups,
            "completion_length": length / n,
        }
        k = len(names)
        for name, s, s2 in zip(names, sums[6 : 6 + k], sums[6 + k :]):
            out[f"reward_{name}"] = s / n
            out[f"reward_{name}_std"] = math.sqrt(max(0.0, s2 / n - (s / n) ** 2))
        return out

    def _log_completions(self, kept: list[Group]) -> None:
        if self.log_path is None or self.rank_world[0] != 0 or not self.rollout.log_completions:
            return
        lines = []
        for g in kept:
            for text, r, k in zip(g.texts, g.rewards, range(len(g.texts))):
                if len(lines) >= self.rollout.log_completions:
                    break
                record = {
                    "generation": self.generations,
                    "step": self.generations * self.rollout.iterations + 1,
                    "prompt": g.prompt.text,
                    "completion": text,
                    "reward": r,
                    "scores": {name: s[k] for name, s in g.scores.items()},
                }
                lines.append(json.dumps(record) + "\n")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.writelines(lines)

    # -- the loader interface --
    def next_batch(self) -> RolloutBatch:
        if self.position >= len(self.buffer) * self.rollout.iterations:
            self._generate_buffer()
        batch = self.buffer[self.position % len(self.buffer)]
        self.position += 1
        return batch

    def skip(self, n_batches: int) -> None:
        for _ in range(n_batches):
            self.next_batch()

    def state_dict(self) -> dict:
        return {
            "drawn": self.drawn,
            "rounds": self.rounds,
            "generations": self.generations,
            "position": self.position,
            "seed": self.seed,
            "prompts": len(self.prompts),
            "world_size": self.rank_world[1],
            "buffer": [_batch_state(b) for b in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("prompts") != len(self.prompts) or state.get("seed") != self.seed:
            raise DataError("the RL prompts changed since the checkpoint (prompt count or seed differ)")
        if state.get("world_size") != self.rank_world[1]:
            raise ConfigError(
                f"an RL run resumes on the process count it was saved with ({state.get('world_size')}), "
                f"not {self.rank_world[1]}: its generation buffer is per process"
            )
        self.drawn, self.rounds = state["drawn"], state["rounds"]
        self.generations, self.position = state["generations"], state["position"]
        self.buffer = [_batch_from_state(b) for b in state["buffer"]]
        self._truncate_log()

    def _truncate_log(self) -> None:
        """completions.jsonl keeps the generations before the checkpoint (the rest are sampled again)."""
        if self.log_path is None or self.rank_world[0] != 0 or not self.log_path.is_file():
            return
        from lmforge.files import write_text_atomic

        kept = [
            line
            for line in self.log_path.read_text(encoding="utf-8").splitlines(keepends=True)
            if json.loads(line)["generation"] < self.generations
        ]
        write_text_atomic(self.log_path, "".join(kept))


def _batch_state(b: RolloutBatch) -> dict:
    return {
        "inputs": b.inputs,
        "targets": b.targets,
        "advantages": b.advantages,
        "old_logps": b.old_logps,
        "ref_logps": b.ref_logps,
        "stats": dict(b.stats),
    }


def _batch_from_state(s: dict) -> RolloutBatch:
    return RolloutBatch(
        s["inputs"],
        s["targets"],
        advantages=s["advantages"],
        old_logps=s["old_logps"],
        ref_logps=s["ref_logps"],
        stats=dict(s["stats"]),
    )


# -- held-out evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_rewards(
    model: nn.Module,
    prompts: Sequence[PromptRow],
    rewards: Sequence[Reward],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int,
    device: torch.device,
    batch_size: int = 64,
    on_texts: Callable[[list[str]], None] | None = None,
) -> dict[str, float]:
    """Mean reward (the weighted total and each function's) of greedy completions of ``prompts``."""
    eot = tokenizer.eot_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (eot or 0)
    sums: dict[str, float] = {}
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        out = generate_ids(model, [p.ids for p in chunk], greedy, device=device, eos_id=eot, pad_id=pad)
        texts = [tokenizer.decode(t) for t in out.tokens]
        if on_texts is not None:
            on_texts(texts)
        scores = score(
            rewards,
            texts,
            [p.record for p in chunk],
            completion_lengths=[len(t) + (r == "eos") for t, r in zip(out.tokens, out.finish_reasons)],
            max_length=max_new_tokens,
        )
        values = {"reward": total(rewards, scores), **{f"reward_{k}": v for k, v in scores.items()}}
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + sum(v)
    return {name: s / len(prompts) for name, s in sums.items()}
