"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model sharing the target's
tokenizer proposes ``k`` tokens, the target reads them in one forward pass and keeps the longest prefix
that its own distribution accepts, so the output is distributed exactly as the target's own sampling.

Shape legend: T tokens fed, V vocabulary. One prompt at a time (batch 1: where speculation pays).

Per round, with ``last`` the newest token neither model has read yet:
  1. the draft reads its pending tokens and samples x1..xk one step at a time, keeping each q_i;
  2. the target reads ``last, x1..xk`` at once: p_1..p_{k+1};
  3. x_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from
     norm(max(0, p_i - q_i)) instead and the round ends; if all k are kept, one more comes from p_{k+1}.
     Greedy: x_i is kept while it is the target's argmax, and the target's argmax replaces the first that
     is not: the target's own greedy tokens;
  4. both KV caches are rolled back to the kept tokens (``KVCache.length``; the stale slots beyond it are
     overwritten by the next round).
Temperature, top-k and top-p shape p and q alike (the target's sampling distribution is the one kept); a
repetition penalty is not supported (it would make p depend on the round's own proposals).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.infer.fast import FastDecoder
from lmforge.infer.generate import SamplingConfig, check_prompts, check_sampling, filter_top_k_top_p
from lmforge.model.transformer import KVCache, Transformer


@dataclass
class SpeculativeResult:
    tokens: list[int]  # generated ids, prompt excluded
    finish_reason: str  # eos, length or context
    proposed: int  # draft tokens proposed over all rounds
    accepted: int  # of which the target kept

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def check_draft(target: Transformer, draft: Transformer, sampling: SamplingConfig, k: int) -> None:
    problems = []
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        problems.append(
            f"the draft's vocab_size={draft.cfg.vocab_size} differs from the target's "
            f"{target.cfg.vocab_size}: the draft must share the target's tokenizer"
        )
    if k < 1:
        problems.append(f"draft_tokens={k} must be >= 1")
    if sampling.repetition_penalty != 1.0:
        problems.append("repetition_penalty is not supported with speculative decoding (use 1.0)")
    if problems:
        raise ConfigError("cannot decode speculatively:\n  " + "\n  ".join(problems))


def probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The sampling distribution (T, V) of logits (T, V): temperature, top-k, top-p, as ``next_tokens``."""
    logits = filter_top_k_top_p(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)
    return logits.softmax(dim=-1)


def _feed(
    model: Transformer, cache: KVCache, tokens: list[int], device: torch.device, step: FastDecoder
) -> torch.Tensor:
    """Logits (T, V) after reading ``tokens`` into ``cache`` (positions continue from ``cache.length``): one
    token through the fast step (``infer.fast``), several through ``hidden_states``."""
    if len(tokens) == 1:
        index = torch.tensor([cache.length], device=device)  # (1,): batch 1, so position = cache index
        logits = step.step(cache, torch.tensor([tokens], device=device), index[None], index)  # (1, V)
        cache.length += 1
        return logits
    ids = torch.tensor([tokens], device=device)  # (1, T)
    return model.lm_head(model.hidden_states(ids, cache=cache))[0]  # (T, V)


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Transformer,
    prompt: Sequence[int],
    sampling: SamplingConfig,
    *,
    device: torch.device,
    draft_tokens: int = 4,
    eos_id: int | None = None,
) -> SpeculativeResult:
    """Continue ``prompt`` by up to ``sampling.max_new_tokens`` tokens of ``target``, proposed ``draft_tokens``
    at a time by ``draft``. Greedy: the target's greedy tokens; sampled: the target's distribution."""
    check_sampling(sampling)
    check_draft(target, draft, sampling, draft_tokens)
    context = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    check_prompts([prompt], context)
    target.eval(), draft.eval()
    budget = min(sampling.max_new_tokens, context - len(prompt))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    dtype = next(target.parameters()).dtype
    size = len(prompt) + budget + draft_tokens + 1
    target_cache = KVCache.empty(target.cfg, 1, size, device=device, dtype=dtype)
    draft_cache = KVCache.empty(draft.cfg, 1, size, device=device, dtype=next(draft.parameters()).dtype)
    target_step, draft_step = FastDecoder(target), FastDecoder(draft)
    prompt = list(prompt)
    if len(prompt) > 1:  # both read all but the last prompt token; it is fed with the first proposals
        _feed(target, target_cache, prompt[:-1], device, target_step)
        _feed(draft, draft_cache, prompt[:-1], device, draft_step)
    last, draft_pending = prompt[-1], [prompt[-1]]
    out: list[int] = []
    proposed = accepted = 0
    finish = None
    while finish is None:
        k = min(draft_tokens, budget - len(out) - 1)  # the round's extra token must fit the budget too
        proposals: list[int] = []
        q_rows = []
        if k > 0:
            logits = _feed(draft, draft_cache, draft_pending, device, draft_step)[-1:]  # (1, V)
            for i in range(k):
                if sampling.greedy:
                    token = int(logits.argmax(dim=-1))
                else:
                    q = probabilities(logits, sampling)  # (1, V)
                    q_rows.append(q[0])
                    token = int(torch.multinomial(q, 1, generator=generator))
                proposals.append(token)
                if i < k - 1:
                    logits = _feed(draft, draft_cache, [token], device, draft_step)
        start = target_cache.length
        target_logits = _feed(target, target_cache, [last, *proposals], device, target_step)  # (k + 1, V)
        kept: list[int] = []
        extra = None
        if sampling.greedy:
            choice = target_logits.argmax(dim=-1).tolist()  # (k + 1,)
            for i, token in enumerate(proposals):
                if token != choice[i]:
                    extra = choice[i]
                    break
                kept.append(token)
            if extra is None:
                extra = choice[len(proposals)]
        else:
            p = probabilities(target_logits, sampling)  # (k + 1, V)
            uniform = torch.rand(len(proposals), generator=generator, device=device).tolist()
            for i, token in enumerate(proposals):
                ratio = float(p[i, token]) / float(q_rows[i][token])
                if uniform[i] < min(1.0, ratio):
                    kept.append(token)
                    continue
                residual = (p[i] - q_rows[i]).clamp(min=0)
                extra = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
                break
            if extra is None:
                extra = int(torch.multinomial(p[len(proposals)], 1, generator=generator))
        proposed += len(proposals)
        accepted += len(kept)
        # roll back: the target keeps last + kept; the draft read last, x1..x_{k-1} and keeps last + kept
        target_cache.length = start + 1 + len(kept)
        draft_seen = draft_cache.length  # = start + k when k > 0 (draft and target read the same tokens)
        draft_cache.length = min(draft_seen, start + 1 + len(kept))
        if k == 0:  # the draft read nothing this round
            draft_pending = [*draft_pending, extra]
        else:  # when every proposal was kept, the draft has not read the last one yet
            draft_pending = [*([proposals[-1]] if len(kept) == k else []), extra]
        for token in [*kept, extra]:
            if eos_id is not None and token == eos_id:
                finish = "eos"
                break
            out.append(token)
            if len(out) == budget:
                finish = "length" if budget == sampling.max_new_tokens else "context"
                break
        last = extra
    return SpeculativeResult(out, finish, proposed, accepted)
