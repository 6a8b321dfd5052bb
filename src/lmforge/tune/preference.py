"""Preference tuning on chosen/rejected pairs: DPO (Rafailov et al. 2023, with the label smoothing of
conservative DPO), and two objectives without a reference model, SimPO (Meng et al. 2024) and ORPO (Hong et al.
2024). Each is an ``Objective`` run by the one training loop (checkpoints, exact resume, guards).

Shape legend: P pairs in a micro-batch, R = 2P rows (the P chosen rows first, then the P rejected ones),
T tokens, V vocabulary.

Records (JSONL): ``prompt``/``chosen``/``rejected`` strings, or ``chosen``/``rejected`` message lists
(``{role, content}``) whose last message is the assistant's answer and whose earlier messages are the shared
prompt (an optional ``prompt`` message list goes in front). A side is tokenised like fine-tuning examples:
prompt tokens, then response tokens and end-of-text, the loss on the response only (targets are
IGNORE_INDEX on the prompt and padding). Pairs whose answers are identical or empty, or that do not fit
``train.seq_len``, are skipped and reported as ``file:line``.

The DPO reference is the base model, in one of two modes (``reference=``):
- ``"cached"`` (the default): before training, the base model scores every pair once and each row keeps its
  two reference log-probs; training then holds no reference model at all (no second copy of the weights, no
  second forward pass per step). It costs one forward pass over the data set before step 1, so it is the
  cheaper mode unless the run sees only a small part of a large data set.
- ``"live"``: the reference is evaluated on each batch. With LoRA it is the same model with its adapters
  switched off (no copy); with full fine-tuning, a frozen copy of the base held beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.batch import IGNORE_INDEX, Batch
from lmforge.errors import ConfigError, DataError
from lmforge.infer.chat import default_template
from lmforge.tune.lora import LoRAConfig, LoRALinear, apply_lora
from lmforge.tune.pairs import (
    PairRow,
    collate_pairs,
    load_pairs,
    tokenize_pairs,
)
from lmforge.tune.rows import RowLoader
from lmforge.tune.sft import split_examples

# -- log-probs and the reference ----------------------------------------------------------------------------


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each row's response tokens, their count), both (R,); fp32."""
    logits = model(batch.inputs)  # (R, T, V)
    R, T, V = logits.shape
    token_logps = -F.cross_entropy(
        logits.reshape(-1, V).float(), batch.targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(R, T)  # 0 where the target is ignored
    return token_logps.sum(-1), (batch.targets != IGNORE_INDEX).sum(-1)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Every LoRA layer of ``model`` computes its base layer alone (scaling 0) inside the block."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    try:
        for m in layers:
            m.scaling = 0.0
        yield
    finally:
        for m, scaling in zip(layers, saved):
            m.scaling = scaling


class LiveReference:
    """The reference evaluated on each batch: the frozen copy of the base set by ``adapt`` (full fine-tuning)
    or, when ``copy`` is None, the trained model with its LoRA adapters switched off."""

    def __init__(self) -> None:
        self.copy: nn.Module | None = None

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.copy is not None:
            return sequence_logps(self.copy, batch)[0]
        from lmforge.distributed.parallelize import unwrap

        inner = unwrap(model)
        if not any(isinstance(m, LoRALinear) for m in inner.modules()):
            raise ConfigError("a live reference without a frozen copy needs LoRA adapters to switch off")
        with adapters_off(inner):
            return sequence_logps(inner, batch)[0]


# -- objectives: units are pairs, the loss is summed over pairs -----------------------------------------------


class PairTerms(NamedTuple):
    losses: torch.Tensor  # (P,)
    chosen_rewards: torch.Tensor  # (P,)
    rejected_rewards: torch.Tensor  # (P,)


class PairObjective:
    """What DPO, SimPO and ORPO share: pairs as units, and the reward figures the loop logs."""

    def units(self, batch: Batch) -> int:
        return batch.inputs.shape[0] // 2

    def terms(self, model: nn.Module, batch: Batch) -> PairTerms:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.terms(model, batch).losses.sum()

    def metrics(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums over the batch's pairs (the loop divides by the pairs): rewards, accuracy, margin."""
        return reward_figures(self.terms(model, batch))


def reward_figures(terms: PairTerms) -> dict[str, torch.Tensor]:
    _, chosen, rejected = terms
    return {
        "reward_chosen": chosen.sum(),
        "reward_rejected": rejected.sum(),
        "reward_accuracy": (chosen > rejected).float().sum(),
        "reward_margin": (chosen - rejected).sum(),
    }


def smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(x), with the preference label flipped with probability ``label_smoothing`` (cDPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@dataclass(frozen=True)
class DPO(PairObjective):
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), pi/ref the summed response log-probs; the
    rewards are beta * (pi - ref). The reference comes from the batch (cached) or from ``live``."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    live: LiveReference | None = None

    def terms(self, model: nn.Module, batch: Batch) -> PairTerms:
        policy, _ = sequence_logps(model, batch)  # (R,)
        reference = getattr(batch, "reference_logps", None)
        if reference is None:
            if self.live is None:
                raise DataError("DPO batch without cached reference log-probs and no live reference")
            reference = self.live.logps(model, batch)
        ratio = policy - reference.to(policy.dtype)  # (R,)
        chosen, rejected = ratio.chunk(2)  # (P,), (P,)
        losses = smoothed_logistic(self.beta * (chosen - rejected), self.label_smoothing)
        return PairTerms(losses, self.beta * chosen.detach(), self.beta * rejected.detach())


@dataclass(frozen=True)
class SimPO(PairObjective):
    """-log sigmoid(beta * (mean log-prob of chosen - of rejected) - gamma): no reference; the rewards are
    beta * the mean response log-prob."""

    beta: float = 2.0
    gamma: float = 0.5

    def terms(self, model: nn.Module, batch: Batch) -> PairTerms:
        logps, counts = sequence_logps(model, batch)
        mean = logps / counts.clamp(min=1)  # (R,)
        chosen, rejected = mean.chunk(2)
        losses = -F.logsigmoid(self.beta * (chosen - rejected) - self.gamma)
        return PairTerms(losses, self.beta * chosen.detach(), self.beta * rejected.detach())


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class ORPO(PairObjective):
    """Per pair: the chosen answer's mean negative log-likelihood (SFT) - lam * log sigmoid(log odds ratio),
    log odds(y) = m - log(1 - exp(m)) with m the mean response log-prob; the rewards are lam * m."""

    lam: float = 0.1

    def terms(self, model: nn.Module, batch: Batch) -> PairTerms:
        logps, counts = sequence_logps(model, batch)
        mean = logps / counts.clamp(min=1)  # (R,)
        chosen, rejected = mean.chunk(2)
        log_odds = (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))
        losses = -chosen - self.lam * F.logsigmoid(log_odds)
        return PairTerms(losses, self.lam * chosen.detach(), self.lam * rejected.detach())


Method = Literal["dpo", "simpo", "orpo"]


@dataclass(frozen=True, kw_only=True)
class PreferenceConfig:
    method: Method = "dpo"
    beta: float | None = None  # None: the method's default (DPO 0.1, SimPO 2.0)
    label_smoothing: float = 0.0  # DPO: conservative DPO's label-flip probability
    gamma: float = 0.5  # SimPO: the target margin
    lam: float = 0.1  # ORPO: the weight of the odds-ratio term
    reference: Literal["cached", "live"] = "cached"  # DPO: see the module docstring

    def problems(self) -> list[str]:
        out = []
        if self.method not in ("dpo", "simpo", "orpo"):
            out.append(f"method={self.method!r}: choose dpo, simpo or orpo")
        if self.beta is not None and self.beta <= 0:
            out.append(f"beta={self.beta} must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(f"label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.lam < 0:
            out.append(f"lam={self.lam} must be >= 0")
        if self.reference not in ("cached", "live"):
            out.append(f"reference={self.reference!r}: choose cached or live")
        return out

    def objective(self, live: LiveReference | None = None) -> PairObjective:
        if self.method == "dpo":
            return DPO(beta=self.beta or 0.1, label_smoothing=self.label_smoothing, live=live)
        if self.method == "simpo":
            return SimPO(beta=self.beta or 2.0, gamma=self.gamma)
        return ORPO(lam=self.lam)


@torch.no_grad()
def cache_reference(
    model: nn.Module,
    rows: list[PairRow],
    *,
    pad_id: int,
    device: torch.device,
    precision: str,
    batch_size: int,
) -> list[PairRow]:
    """The rows with the reference log-probs of ``model`` (the base) filled in: one forward pass per row."""
    from lmforge.train.loop import autocast_for

    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        with autocast_for(device, precision):
            logps = sequence_logps(model, collate_pairs(chunk, pad_id).to(device))[0].double().cpu()
        chosen, rejected = logps.chunk(2)
        out += [
            dataclasses.replace(r, reference=(c, j))
            for r, c, j in zip(chunk, chosen.tolist(), rejected.tolist())
        ]
    model.train(was_training)
    return out


@torch.no_grad()
def score_pairs(
    model: nn.Module,
    objective: PairObjective,
    rows: Sequence[PairRow],
    *,
    pad_id: int,
    device: torch.device,
    batch_size: int = 16,
) -> dict[str, float]:
    """Means per pair of the loss and the reward figures over ``rows`` (held-out pairs, say)."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for i in range(0, len(rows), batch_size):
        terms = objective.terms(model, collate_pairs(rows[i : i + batch_size], pad_id).to(device))
        values = {"loss": terms.losses.sum(), **reward_figures(terms)}
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    model.train(was_training)
    return {name: total / max(1, len(rows)) for name, total in totals.items()}


# -- the run ------------------------------------------------------------------------------------------------


@dataclass
class PreferenceResult:
    run_dir: Path
    model_dir: Path  # a plain lmforge checkpoint of the tuned model (LoRA merged)
    method: str
    reference: str | None  # DPO: "cached", "live: LoRA adapters off" or "live: frozen copy"
    final_loss: float | None
    train_pairs: int
    val_pairs: int
    skipped: list[str]  # "file:line: why" for every pair left out
    val_before: dict[str, float]  # held-out loss and reward figures of the base model
    val_after: dict[str, float]  # ... and of the tuned model
    hf_dir: Path | None


def read_pairs(
    data_path: str | Path, tokenizer, cfg, val_fraction: float, limit: int | None, template=None
) -> tuple[list[PairRow], list[PairRow], list[str]]:
    """(train rows, held-out rows, skipped pairs as "file:line: why") of a preference file."""

    records = load_pairs(data_path, limit, template)
    rows, skipped = tokenize_pairs(records, tokenizer, cfg.train.seq_len)
    if not rows:
        raise DataError(
            f"{data_path}: none of its {len(records)} pairs is usable ({skipped[0]}{' ...' if len(skipped) > 1 else ''})"
        )
    train_rows, val_rows = split_examples(rows, val_fraction, cfg.train.seed)
    return train_rows, val_rows, skipped


def score_saved(
    model_dir: Path, cfg, objective, rows: list[PairRow], pad_id: int, device
) -> dict[str, float]:
    """The held-out preference figures of the model saved in ``model_dir``."""
    from lmforge.checkpoint import load_model_state
    from lmforge.model.transformer import build_model

    tuned = build_model(cfg.model, device="cpu")
    tuned.load_state_dict(load_model_state(model_dir, cfg), strict=True)
    return score_pairs(tuned.to(device), objective, rows, pad_id=pad_id, device=device)


def preference_lineage(base, loaded, data_path, method: str, template, split: tuple) -> dict:
    """What the model card says of where this model comes from: this stage's data, then the base's card."""
    from lmforge.train.card import data_licence, find_card

    train_rows, val_rows, skipped = split
    pairs = len(train_rows) + len(val_rows)
    data = {"path": str(data_path), "records": pairs + len(skipped), "examples": pairs}
    return {
        "base": str(base),
        "base_card": find_card(loaded.directory),
        "stage": f"preference tuning ({method.upper()})",
        "data": [{**data, "licence": data_licence(data_path)}],
        "chat_template": template.origin,
        "counts": {
            "train pairs": len(train_rows),
            "held-out pairs": len(val_rows),
            "skipped pairs": len(skipped),
        },
    }


def pair_loaders(train_rows, val_rows, cfg, pad_id: int, loaded, base_state: dict, live, lora):
    """The training loader, the validation batches and the model adaptation (base weights, the frozen
    reference copy where one is needed, LoRA) of a preference run."""
    loader = RowLoader(
        train_rows,
        collate=partial(collate_pairs, pad_id=pad_id),
        batch_size=cfg.train.micro_batch,
        seed=cfg.train.seed,
        vocab_size=cfg.model.vocab_size,
        tokenizer_path=str(loaded.tokenizer_path),
        what="preference data",
    )

    def val_batches():
        mb = cfg.train.micro_batch
        for i in range(0, min(len(val_rows), mb * cfg.train.eval_batches), mb):
            yield collate_pairs(val_rows[i : i + mb], pad_id)

    def adapt(model):
        missing, unexpected = model.load_state_dict(base_state, strict=False)
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        if live is not None and lora is None:
            live.copy = copy.deepcopy(model).requires_grad_(False).eval()
        return apply_lora(model, lora) if lora is not None else model

    return loader, val_batches, adapt


def tune_preferences(
    base: str | Path,
    data_path: str | Path,
    *,
    out_dir: str | Path,
    preference: PreferenceConfig = PreferenceConfig(),
    overrides: Sequence[str] = (),
    lora: LoRAConfig | None = None,
    val_fraction: float = 0.05,
    limit: int | None = None,
    resume: str | None = None,
    export_hf: str | Path | None = None,
    progress: bool | None = None,
) -> PreferenceResult:
    """Tune ``base`` (an lmforge run/checkpoint or a Hugging Face folder) on the pairs of ``data_path``.

    Every input is read and checked before any run folder is written; ``OUT/model`` holds the final model
    (LoRA merged). ``val_before``/``val_after`` score the held-out pairs with the base and the tuned model.
    (Long by choice: the recipe in order - read the pairs, score the reference, train, score, export.)"""
    from lmforge.infer.loading import load_for_inference
    from lmforge.train.loop import train
    from lmforge.train.run import Task, pick_device
    from lmforge.tune.sft import finetune_config, save_final_model

    problems = preference.problems() + (lora.problems() if lora is not None else [])
    if problems:
        raise ConfigError("invalid preference-tuning settings:\n  " + "\n  ".join(problems))
    loaded = load_for_inference(base, device=torch.device("cpu"))
    tokenizer = loaded.require_tokenizer()
    cfg = finetune_config(loaded.config, out_dir, overrides)
    template = loaded.chat_template or default_template(tokenizer)
    train_rows, val_rows, skipped = read_pairs(data_path, tokenizer, cfg, val_fraction, limit, template)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eot_id or 0)
    uses_reference = preference.method == "dpo"
    cached = uses_reference and preference.reference == "cached"
    device = pick_device(cfg.train.device)
    base_model = loaded.model.to(device)
    if cached:
        score = partial(
            cache_reference,
            base_model,
            pad_id=pad_id,
            device=device,
            precision=cfg.train.precision,
            batch_size=cfg.train.micro_batch,
        )
        train_rows, val_rows = score(train_rows), score(val_rows)
    live = LiveReference() if uses_reference and not cached else None
    objective = preference.objective(live)
    held_out = _with_reference(val_rows, base_model, pad_id, device) if uses_reference else val_rows
    val_before = (
        score_pairs(base_model, objective, held_out, pad_id=pad_id, device=device) if val_rows else {}
    )
    base_state = {k: v.cpu() for k, v in base_model.state_dict().items()}
    base_model.cpu()  # the loop builds its own model; this one only lends its weights from here on

    loader, val_batches, adapt = pair_loaders(
        train_rows, val_rows, cfg, pad_id, loaded, base_state, live, lora
    )
    lineage = preference_lineage(
        base, loaded, data_path, preference.method, template, (train_rows, val_rows, skipped)
    )
    task = Task(
        loader=loader, val_batches=val_batches, objective=objective, adapt_model=adapt, lineage=lineage
    )
    result = train(cfg, resume=resume, task=task, progress=progress)
    if live is not None:
        live.copy = None  # the frozen copy is no longer needed
    model_dir = save_final_model(result.checkpoint, cfg, lora, Path(out_dir) / "model", loaded.tokenizer_path)
    val_after = score_saved(model_dir, cfg, objective, held_out, pad_id, device) if val_rows else {}
    hf_dir = None
    if export_hf is not None:
        from lmforge.convert import export_model

        hf_dir = export_model(model_dir, export_hf, verify=True).out_dir
    reference = None
    if uses_reference:
        reference = (
            "cached" if cached else ("live: LoRA adapters off" if lora is not None else "live: frozen copy")
        )
    return PreferenceResult(
        run_dir=result.run_dir,
        model_dir=model_dir,
        method=preference.method,
        reference=reference,
        final_loss=result.final_loss,
        train_pairs=len(train_rows),
        val_pairs=len(val_rows),
        skipped=skipped,
        val_before=val_before,
        val_after=val_after,
        hf_dir=hf_dir,
    )


def _with_reference(rows: list[PairRow], base: nn.Module, pad_id: int, device: torch.device) -> list[PairRow]:
    """Rows whose reference log-probs are filled in (held-out scoring outside the loop needs no live model)."""
    if all(r.reference is not None for r in rows):
        return rows
    return cache_reference(base, rows, pad_id=pad_id, device=device, precision="fp32", batch_size=16)
