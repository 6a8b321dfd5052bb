"""Hugging Face conversion of the Mixture-of-Experts families (``MixtralForCausalLM``,
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``): which family a ``model.moe`` shape is, their
``config.json`` fields both ways, and the expert tensors. MoE experts are stacked (E, 2F, C) and (E, C, F)
tensors in lmforge and in transformers 5's modules, one tensor per expert in Hub checkpoints (and transformers
4): export writes the Hub's layout, import reads either. The rest of the conversion is ``model/hf.py``'s.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.model.hf_families import MIXTRAL, MOE_ARCHITECTURES, QWEN2_MOE, QWEN3_MOE

# The Hub's checkpoints (and transformers 4) hold one tensor per expert: (gate, up, down) names per family,
# and the router's name, relative to ``model.layers.{i}.``.
HUB_EXPERTS = {
    MIXTRAL: tuple(f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w3", "w2")),
    QWEN2_MOE: tuple(f"mlp.experts.{{e}}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")),
    QWEN3_MOE: tuple(f"mlp.experts.{{e}}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")),
}
HUB_ROUTER = {
    MIXTRAL: "block_sparse_moe.gate.weight",
    QWEN2_MOE: "mlp.gate.weight",
    QWEN3_MOE: "mlp.gate.weight",
}


def moe_architecture(cfg: ModelConfig) -> str:
    """The Mixture-of-Experts family: shared experts -> Qwen2-MoE, qk_norm -> Qwen3-MoE, else Mixtral."""
    if cfg.moe.n_shared_experts > 0:
        return QWEN2_MOE
    return QWEN3_MOE if cfg.qk_norm else MIXTRAL


def normalised_topk(cfg: ModelConfig) -> bool:
    """Whether the routing weights sum to 1 (Mixtral's router, or Qwen's with norm_topk_prob): the same
    weights either way, as the softmax over the top-k logits equals the renormalised top-k probabilities."""
    return cfg.moe.router == "topk_softmax" or cfg.moe.norm_topk_prob


def moe_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """What an MoE family cannot express of ``cfg.moe`` (nothing for a dense architecture)."""
    if arch not in MOE_ARCHITECTURES:
        return []
    moe, wrong = cfg.moe, []
    if arch == MIXTRAL and not normalised_topk(cfg):
        wrong.append(
            f"model.moe.norm_topk_prob={moe.norm_topk_prob} with router={moe.router} (Mixtral needs weights summing to 1)"
        )
    if arch == MIXTRAL and moe.first_dense_layers:
        wrong.append(f"model.moe.first_dense_layers={moe.first_dense_layers} (Mixtral: every layer is MoE)")
    if arch == QWEN2_MOE and not moe.shared_expert_gate:
        wrong.append("model.moe.shared_expert_gate=false (Qwen2-MoE gates its shared expert)")
    return wrong


def moe_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """The ``config.json`` fields of a Mixtral, Qwen2-MoE or Qwen3-MoE model."""
    moe = cfg.moe
    expert_hidden = moe.expert_hidden or cfg.hidden_dim
    if arch == MIXTRAL:  # every layer is MoE: intermediate_size is the experts'
        return {
            "num_local_experts": moe.n_experts,
            "num_experts_per_tok": moe.top_k,
            "intermediate_size": expert_hidden,
            "sliding_window": cfg.sliding_window,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "router_jitter_noise": 0.0,
        }
    family: dict[str, Any] = {
        "num_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": expert_hidden,
        "norm_topk_prob": normalised_topk(cfg),
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(moe.first_dense_layers)),
        "router_aux_loss_coef": moe.aux_loss_coef,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
    }
    if arch == QWEN2_MOE:
        shared = moe.shared_expert_hidden or moe.n_shared_experts * expert_hidden
        family.update(shared_expert_intermediate_size=shared, qkv_bias=cfg.qkv_bias)
    else:
        family["attention_bias"] = False
    return family


def moe_fields(model_type: str, hf: dict, wrong: list[str]) -> dict[str, Any]:
    """``model.moe`` (and, for Mixtral, the sliding window) of a Mixtral, Qwen2-MoE or Qwen3-MoE config."""
    n_experts = hf.get("num_local_experts") or hf.get("num_experts")  # transformers 5 saves either name
    if not n_experts or not hf.get("num_experts_per_tok"):
        wrong.append("no num_local_experts/num_experts or num_experts_per_tok")
    if model_type == "mixtral":
        moe = {"n_experts": n_experts, "router": "topk_softmax"}
        moe.update(top_k=hf.get("num_experts_per_tok", 2), aux_loss_coef=hf.get("router_aux_loss_coef", 0.0))
        return {"sliding_window": hf.get("sliding_window"), "moe": moe}
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        wrong.append(f"mlp_only_layers={dense} (lmforge keeps only the first k layers dense)")
    if hf.get("decoder_sparse_step", 1) != 1:
        wrong.append(
            f"decoder_sparse_step={hf['decoder_sparse_step']} (lmforge: every layer after the dense ones is MoE)"
        )
    moe = {
        "n_experts": n_experts,
        "top_k": hf.get("num_experts_per_tok"),
        "expert_hidden": hf.get("moe_intermediate_size"),
        "first_dense_layers": len(dense),
        "router": "softmax_topk",
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
        "aux_loss_coef": hf.get("router_aux_loss_coef", 0.0),
    }
    if model_type == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size") or 0
        if shared < 1:
            wrong.append(f"shared_expert_intermediate_size={shared} (Qwen2-MoE always has a shared expert)")
        moe.update(n_shared_experts=1, shared_expert_hidden=shared, shared_expert_gate=True)
    return {"moe": moe}


def moe_layer_indices(cfg: ModelConfig) -> range:
    return range(cfg.moe.first_dense_layers, cfg.n_layers) if cfg.moe.enabled else range(0)


def to_hub_experts(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Stacked expert tensors (transformers 5's modules) -> one tensor per expert under the Hub's names."""
    state = dict(state)
    gate_name, up_name, down_name = HUB_EXPERTS[arch]
    for i in moe_layer_indices(cfg):
        prefix = f"model.layers.{i}."
        gate_up = state.pop(f"{prefix}mlp.experts.gate_up_proj")  # (E, 2F, C)
        down = state.pop(f"{prefix}mlp.experts.down_proj")  # (E, C, F)
        hidden = down.shape[-1]
        for e in range(gate_up.shape[0]):
            state[prefix + gate_name.format(e=e)] = gate_up[e, :hidden].contiguous()  # (F, C)
            state[prefix + up_name.format(e=e)] = gate_up[e, hidden:].contiguous()  # (F, C)
            state[prefix + down_name.format(e=e)] = down[e].contiguous()  # (C, F)
        state[prefix + HUB_ROUTER[arch]] = state.pop(f"{prefix}mlp.gate.weight")
    return state


def from_hub_experts(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str, where: str
) -> dict[str, torch.Tensor]:
    """One tensor per expert under the Hub's names -> the stacked tensors of transformers 5's modules (a
    folder already holding stacked tensors passes through)."""
    hf_state = dict(hf_state)
    gate_name, up_name, down_name = HUB_EXPERTS[arch]
    for i in moe_layer_indices(cfg):
        prefix = f"model.layers.{i}."
        if prefix + HUB_ROUTER[arch] in hf_state:
            hf_state[f"{prefix}mlp.gate.weight"] = hf_state.pop(prefix + HUB_ROUTER[arch])
        if f"{prefix}mlp.experts.gate_up_proj" in hf_state:
            continue
        names = [
            [prefix + n.format(e=e) for n in (gate_name, up_name, down_name)]
            for e in range(cfg.moe.n_experts)
        ]
        missing = [n for row in names for n in row if n not in hf_state]
        if missing:
            raise CheckpointError(
                f"{where}: no tensor {missing[0]!r} (the config implies {cfg.moe.n_experts} experts)"
            )
        hf_state[f"{prefix}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([hf_state.pop(gate), hf_state.pop(up)]) for gate, up, _ in names]
        )  # (E, 2F, C)
        hf_state[f"{prefix}mlp.experts.down_proj"] = torch.stack([hf_state.pop(down) for *_, down in names])
    return hf_state
