"""muP's multipliers folded into the weights: the standard-parametrisation model with the same logits.

A muP model (``model.mup``, width multiplier m = d_model / mup_base_width) differs from a standard one in
its forward pass in two places only (``model/transformer.py``): attention scores scaled by 1/sqrt(hd * m)
instead of 1/sqrt(hd), and logits multiplied by 1/m. Both are linear, so both fold exactly into weights:

- the attention factor 1/sqrt(m) into the queries (``q_proj`` weight and bias; with ``qk_norm`` into
  ``q_norm``'s weight, since the norm would undo a scale applied before it). RoPE rotates linearly, so a
  scaled query rotates to the scaled rotated query;
- the logit factor 1/m into ``lm_head``. A tied head cannot take it without changing the embedding, so the
  folded model is untied (its head the embedding times 1/m).

Exporters (Hugging Face, GGUF) fold first, so ``transformers`` and llama.cpp run the model unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lmforge.model.transformer import Transformer


def fold_mup(model: Transformer) -> Transformer:
    """A new standard-parametrisation ``Transformer`` (``mup`` off) whose logits equal ``model``'s; the model
    itself is returned unchanged when it is not a muP model."""
    cfg = model.cfg
    if not cfg.mup:
        return model
    m = cfg.mup_width_mult
    new_cfg = dataclasses.replace(
        cfg, mup=False, mup_base_width=None, tie_embeddings=cfg.tie_embeddings and m == 1.0
    )
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    if m != 1.0:
        query_factor = 1.0 / math.sqrt(m)  # 1/sqrt(hd * m) = (1/sqrt(m)) * 1/sqrt(hd)
        for i in range(cfg.n_layers):
            prefix = f"layers.{i}.self_attn."
            names = (
                [prefix + "q_norm.weight"]
                if cfg.qk_norm
                else [prefix + "q_proj.weight", prefix + "q_proj.bias"]
            )
            for name in names:
                if name in state:
                    state[name] = _scaled(state[name], query_factor)
        state["lm_head.weight"] = _scaled(state["lm_head.weight"], 1.0 / m)  # a tied head: its own copy now
    first = next(model.parameters())
    with torch.device("meta"):
        folded = Transformer(new_cfg).to(first.dtype)
    folded.to_empty(device=first.device)
    folded.load_state_dict(state)
    folded.tie_weights()
    folded.init_buffers()
    return folded.train(model.training)


def _scaled(value: torch.Tensor, factor: float) -> torch.Tensor:
    return (value.double() * factor).to(value.dtype)
