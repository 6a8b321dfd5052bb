"""Make a model cheaper: unstructured magnitude pruning, and structured pruning of attention heads and
feed-forward channels that really shrinks the weight matrices (and the config).

Shape legend: C d_model, H query heads, Hkv key/value heads, g = H / Hkv heads per group, hd head
dimension, F feed-forward width.

Only the projection matrices inside the blocks are pruned; embeddings, the head and norms are kept.
Importance is weight magnitude: for a head, the squared norm of its query rows and output-projection
columns (plus its key/value rows when it owns them); for a feed-forward channel, the norm of its output
column times the norms of its input rows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer, build_model
from lmforge.tune.sparsity import prunable_weights, sparsity

# -- unstructured ------------------------------------------------------------------------------------------


@torch.no_grad()
def magnitude_prune(
    model: Transformer, amount: float, *, scope: Literal["global", "layer"] = "global"
) -> dict[str, torch.Tensor]:
    """Zero exactly round(amount x n) weights of smallest magnitude, over all prunable weights together
    (``global``) or within each matrix (``layer``). Returns the keep-masks (True = kept) by name."""
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"sparsity={amount} must be in [0, 1)")
    weights = prunable_weights(model)
    masks = {}
    if scope == "layer":
        for name, p in weights.items():
            masks[name] = _keep_mask(p.abs().flatten(), round(amount * p.numel())).view_as(p)
    elif scope == "global":
        flat = torch.cat([p.abs().flatten().float() for p in weights.values()])
        keep = _keep_mask(flat, round(amount * flat.numel()))
        at = 0
        for name, p in weights.items():
            masks[name] = keep[at : at + p.numel()].view_as(p)
            at += p.numel()
    else:
        raise ConfigError(f"scope={scope!r} must be 'global' or 'layer'")
    for name, p in weights.items():
        p.mul_(masks[name].to(p.dtype))
    return masks


def _keep_mask(magnitudes: torch.Tensor, n_prune: int) -> torch.Tensor:
    """True everywhere except the ``n_prune`` smallest entries (exactly that many, ties broken by index)."""
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if n_prune > 0:
        keep[torch.topk(magnitudes, n_prune, largest=False, sorted=False).indices] = False
    return keep


# -- structured --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructuredPlan:
    """What structured pruning keeps: per layer, the query-head indices and feed-forward channel indices."""

    heads: list[list[int]]
    channels: list[list[int]]
    config: ModelConfig


def _head_importance(layer: nn.Module, cfg: ModelConfig, owns_kv: bool) -> torch.Tensor:
    hd = cfg.head_dim
    attn = layer.self_attn
    q = attn.q_proj.weight.view(cfg.n_heads, hd, -1).pow(2).sum(dim=(1, 2))  # (H,)
    o = attn.o_proj.weight.view(cfg.d_model, cfg.n_heads, hd).pow(2).sum(dim=(0, 2))  # (H,)
    score = q + o
    if owns_kv:
        score = score + attn.k_proj.weight.view(cfg.n_heads, hd, -1).pow(2).sum(dim=(1, 2))
        score = score + attn.v_proj.weight.view(cfg.n_heads, hd, -1).pow(2).sum(dim=(1, 2))
    return score


def _channel_importance(layer: nn.Module, cfg: ModelConfig) -> torch.Tensor:
    mlp = layer.mlp
    score = mlp.up_proj.weight.norm(dim=1)  # (F,)
    if cfg.ffn == "swiglu":
        score = score + mlp.gate_proj.weight.norm(dim=1)
    return score * mlp.down_proj.weight.norm(dim=0)


def plan_structured(model: Transformer, *, heads: float = 0.0, channels: float = 0.0) -> StructuredPlan:
    """Choose, in every layer, the most important heads and channels to keep. ``heads`` and ``channels``
    are the fractions to remove; every layer loses the same number (the config has one shape for all).
    With grouped-query attention the same number of query heads goes from every key/value group."""
    cfg = model.cfg
    if not (0.0 <= heads < 1.0 and 0.0 <= channels < 1.0):
        raise ConfigError(f"head fraction {heads} and channel fraction {channels} must be in [0, 1)")
    group = cfg.n_heads // cfg.kv_heads
    owns_kv = group == 1
    if owns_kv:
        keep_heads = cfg.n_heads - round(heads * cfg.n_heads)
        per_group = 1
    else:
        per_group = group - round(heads * group)
        keep_heads = per_group * cfg.kv_heads
    if keep_heads < 1 or per_group < 1:
        raise ConfigError(f"removing {heads:.0%} of {cfg.n_heads} heads leaves none in a key/value group")
    keep_channels = cfg.hidden_dim - round(channels * cfg.hidden_dim)
    if keep_channels < 1:
        raise ConfigError(f"removing {channels:.0%} of {cfg.hidden_dim} feed-forward channels leaves none")
    head_keep, channel_keep = [], []
    with torch.no_grad():
        for layer in model.layers:
            score = _head_importance(layer, cfg, owns_kv)
            if owns_kv:
                kept = torch.topk(score, keep_heads).indices
            else:  # the best per_group heads of every group of g query heads
                best = torch.topk(score.view(cfg.kv_heads, group), per_group, dim=1).indices  # (Hkv, kept)
                kept = (best + torch.arange(cfg.kv_heads).unsqueeze(1) * group).flatten()
            head_keep.append(sorted(kept.tolist()))
            channel_keep.append(
                sorted(torch.topk(_channel_importance(layer, cfg), keep_channels).indices.tolist())
            )
    n_kv_heads = cfg.n_kv_heads
    if owns_kv and n_kv_heads is not None:
        n_kv_heads = keep_heads  # multi-head attention: each removed head takes its key and value along
    new_cfg = dataclasses.replace(
        cfg,
        n_heads=keep_heads,
        n_kv_heads=n_kv_heads,
        head_size=cfg.head_dim if keep_heads != cfg.n_heads else cfg.head_size,
        ffn_hidden=keep_channels,
    )
    return StructuredPlan(heads=head_keep, channels=channel_keep, config=new_cfg)


def _rows(weight: torch.Tensor, heads: list[int], hd: int) -> torch.Tensor:
    index = torch.tensor([h * hd + i for h in heads for i in range(hd)], device=weight.device)
    return weight.index_select(0, index)


@torch.no_grad()
def apply_structured(model: Transformer, plan: StructuredPlan) -> Transformer:
    """A new, smaller Transformer holding the kept heads and channels of ``model``."""
    cfg, new_cfg = model.cfg, plan.config
    hd = cfg.head_dim
    owns_kv = cfg.n_heads == cfg.kv_heads
    device = next(model.parameters()).device
    small = build_model(new_cfg, device="meta")
    small.to_empty(device=device)
    small.tie_weights()
    state = {}
    for name, tensor in model.state_dict().items():
        if not name.startswith("layers."):
            state[name] = tensor
    for i, (layer, heads, channels) in enumerate(zip(model.layers, plan.heads, plan.channels)):
        attn, mlp, prefix = layer.self_attn, layer.mlp, f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for key, value in getattr(layer, norm).state_dict().items():
                state[f"{prefix}{norm}.{key}"] = value
        state[prefix + "self_attn.q_proj.weight"] = _rows(attn.q_proj.weight, heads, hd)
        kv_heads = heads if owns_kv else list(range(cfg.kv_heads))
        state[prefix + "self_attn.k_proj.weight"] = _rows(attn.k_proj.weight, kv_heads, hd)
        state[prefix + "self_attn.v_proj.weight"] = _rows(attn.v_proj.weight, kv_heads, hd)
        state[prefix + "self_attn.o_proj.weight"] = _rows(attn.o_proj.weight.t(), heads, hd).t().contiguous()
        if cfg.bias or cfg.qkv_bias:
            state[prefix + "self_attn.q_proj.bias"] = _rows(attn.q_proj.bias.unsqueeze(1), heads, hd).squeeze(
                1
            )
            state[prefix + "self_attn.k_proj.bias"] = _rows(
                attn.k_proj.bias.unsqueeze(1), kv_heads, hd
            ).squeeze(1)
            state[prefix + "self_attn.v_proj.bias"] = _rows(
                attn.v_proj.bias.unsqueeze(1), kv_heads, hd
            ).squeeze(1)
        if cfg.bias:
            state[prefix + "self_attn.o_proj.bias"] = attn.o_proj.bias
        if cfg.qk_norm:  # one weight per head dimension, shared by every head: kept whole
            state[prefix + "self_attn.q_norm.weight"] = attn.q_norm.weight
            state[prefix + "self_attn.k_norm.weight"] = attn.k_norm.weight
        index = torch.tensor(channels, device=device)
        for proj in ("gate_proj", "up_proj"):
            if hasattr(mlp, proj):
                state[f"{prefix}mlp.{proj}.weight"] = getattr(mlp, proj).weight.index_select(0, index)
                if cfg.bias:
                    state[f"{prefix}mlp.{proj}.bias"] = getattr(mlp, proj).bias.index_select(0, index)
        state[prefix + "mlp.down_proj.weight"] = mlp.down_proj.weight.index_select(1, index)
        if cfg.bias:
            state[prefix + "mlp.down_proj.bias"] = mlp.down_proj.bias
    missing, unexpected = small.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and new_cfg.tie_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    small.init_buffers()
    return small.train(model.training)


def structured_prune(model: Transformer, *, heads: float = 0.0, channels: float = 0.0) -> Transformer:
    return apply_structured(model, plan_structured(model, heads=heads, channels=channels))


# -- a checkpoint in, a smaller checkpoint out (and a recovery fine-tune) ----------------------------------


def prune_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    amount: float = 0.0,
    scope: Literal["global", "layer"] = "global",
    heads: float = 0.0,
    channels: float = 0.0,
    eval_text: str | Path | None = None,
    eval_tokens: int = 20_000,
    device: torch.device | None = None,
) -> dict:
    """Prune a run, checkpoint or Hugging Face folder and save an lmforge checkpoint at ``out``: first
    heads/channels (structured), then ``amount`` of the remaining projection weights by magnitude.
    With ``eval_text``, perplexity before and after (first ``eval_tokens`` tokens). Returns the report,
    which is also saved beside the weights as ``prune_report.json``."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.infer.evaluate import score_file
    from lmforge.infer.loading import load_for_inference

    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"sparsity={amount} must be in [0, 1)")
    if amount == 0.0 and heads == 0.0 and channels == 0.0:
        raise ConfigError("nothing to prune: give a sparsity, a head fraction or a channel fraction")
    if eval_text is not None and not Path(eval_text).is_file():
        raise ConfigError(f"{eval_text}: no such evaluation text file")
    device = device or torch.device("cpu")
    loaded = load_for_inference(source, device=device)
    model = loaded.model
    tokenizer = loaded.require_tokenizer() if eval_text is not None else None

    def perplexity(m: Transformer) -> float | None:
        if eval_text is None:
            return None
        return score_file(m, tokenizer, eval_text, device=device, max_tokens=eval_tokens).perplexity

    report: dict = {"source": str(loaded.directory), "parameters_before": model.num_params()}
    report["perplexity_before"] = perplexity(model)
    if heads or channels:
        model = structured_prune(model, heads=heads, channels=channels)
        report.update(
            heads_removed=heads,
            channels_removed=channels,
            n_heads=model.cfg.n_heads,
            ffn_hidden=model.cfg.hidden_dim,
        )
    if amount:
        magnitude_prune(model, amount, scope=scope)
        report.update(scope=scope, target_sparsity=amount)
    report.update(sparsity(model))
    report["parameters_after"] = model.num_params()
    report["perplexity_after"] = perplexity(model)
    config = dataclasses.replace(loaded.config, model=model.cfg)
    path = save_checkpoint(
        out,
        model_state=model.state_dict(),
        config=config,
        tokenizer_file=loaded.tokenizer_path,
        extra_files={"prune_report.json": json.dumps(report, indent=2)},
    )
    report["out"] = str(path)
    return report


@dataclass(frozen=True, kw_only=True)
class PruneResult:
    """What ``prune_model`` did. ``sparsity`` is ``zeros / total`` over the prunable projection weights of
    the pruned model; perplexities are None without an evaluation text, ``recovered_dir`` without
    recovery."""

    source: str
    out: Path
    parameters_before: int
    parameters_after: int
    zeros: int
    total: int
    sparsity: float
    perplexity_before: float | None
    perplexity_after: float | None
    recovered_dir: Path | None = None
    perplexity_recovered: float | None = None


def prune_model(
    source: str | Path,
    out: str | Path,
    *,
    amount: float = 0.0,
    scope: Literal["global", "layer"] = "global",
    heads: float = 0.0,
    channels: float = 0.0,
    eval_text: str | Path | None = None,
    eval_tokens: int = 20_000,
    recover: str | Path | None = None,
    recover_steps: int = 100,
    device: torch.device | None = None,
    progress: bool | None = None,
) -> PruneResult:
    """Prune ``source`` into ``out`` (see ``prune_checkpoint``); with ``recover`` (SFT JSONL), fine-tune the
    pruned model for ``recover_steps`` steps into ``OUT-recovered`` with its zeros kept at zero, and with
    ``eval_text`` also score the recovered model."""
    from lmforge.errors import DataError

    if recover is not None and not Path(recover).is_file():  # before any weights are pruned or written
        raise DataError(f"{recover}: no such recovery data file")
    report = prune_checkpoint(
        source,
        out,
        amount=amount,
        scope=scope,
        heads=heads,
        channels=channels,
        eval_text=eval_text,
        eval_tokens=eval_tokens,
        device=device,
    )
    result = PruneResult(
        source=report["source"],
        out=Path(report["out"]),
        parameters_before=report["parameters_before"],
        parameters_after=report["parameters_after"],
        zeros=report["zeros"],
        total=report["total"],
        sparsity=report["sparsity"],
        perplexity_before=report["perplexity_before"],
        perplexity_after=report["perplexity_after"],
    )
    if recover is None:
        return result
    from lmforge.infer.evaluate import score_file
    from lmforge.infer.loading import load_for_inference
    from lmforge.tune.sft import finetune

    out = Path(out)
    tuned = finetune(
        out,
        recover,
        out_dir=out.with_name(out.name + "-recovered"),
        overrides=[f"train.steps={recover_steps}"],
        keep_sparsity=True,
        progress=progress,
    )
    perplexity = None
    if eval_text is not None:
        device = device or torch.device("cpu")
        loaded = load_for_inference(tuned.model_dir, device=device)
        tokenizer = loaded.require_tokenizer()
        perplexity = score_file(
            loaded.model, tokenizer, eval_text, device=device, max_tokens=eval_tokens
        ).perplexity
    return dataclasses.replace(result, recovered_dir=tuned.model_dir, perplexity_recovered=perplexity)
