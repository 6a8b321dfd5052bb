"""Hugging Face conversion: lmforge models to and from ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``MistralForCausalLM``, ``GPT2LMHeadModel`` and the Mixture-of-Experts
``MixtralForCausalLM``, ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM``.

Everything goes through two explicit tables (``LLAMA_KEYS``, shared by the Llama-shaped families, and
``GPT2_KEYS``) that pair lmforge parameter names with Hugging Face ones, and two config translations
(``hf_config`` and ``model_config_from_hf``). One table serves both directions. The architecture follows from
the model's switches (``qk_norm`` -> Qwen3, ``qkv_bias`` -> Qwen2, ``sliding_window`` -> Mistral, otherwise
Llama; with ``model.moe``: shared experts -> Qwen2-MoE, qk_norm -> Qwen3-MoE, otherwise Mixtral); a model
that no architecture can express is refused, naming the switch. MoE experts are stacked (E, 2F, C) and
(E, C, F) tensors in lmforge and in transformers 5's modules, one tensor per expert in Hub checkpoints
(and transformers 4): export writes the Hub's layout, import reads either.
Reading and writing whole folders (checkpoints, weight files, tokenizer) is ``lmforge.convert``'s job.

Shape legend: C d_model, F feed-forward hidden, V vocabulary, H heads, Hkv key/value heads, hd head dimension.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lmforge.config import ModelConfig, build
from lmforge.errors import CheckpointError, ConfigError, ExportError
from lmforge.model.hf_families import (
    GPT2,
    LLAMA,
    MISTRAL,
    MIXTRAL,
    MODEL_TYPES,
    MOE_ARCHITECTURES,
    QWEN2,
    QWEN2_MOE,
    QWEN3,
    QWEN3_MOE,
    family_list,
)
from lmforge.model.hf_moe import (
    from_hub_experts,
    moe_architecture,
    moe_config,
    moe_fields,
    moe_problems,
    to_hub_experts,
)
from lmforge.model.mup import fold_mup
from lmforge.model.transformer import Transformer

VERIFY_TOLERANCE = 1e-3  # max |logits difference| accepted by export's self-check (fp32)


class KeyRow(NamedTuple):
    """One Hugging Face tensor and the lmforge tensors it is made of. ``{i}`` stands for the layer index.

    ``how``: ``copy``; ``transpose`` (GPT-2's Conv1D stores (in, out), nn.Linear (out, in)); ``fuse_t`` (GPT-2's
    c_attn: q, k, v weights concatenated on the output side, then transposed); ``fuse`` (q, k, v biases
    concatenated).
    """

    hf: str
    ours: tuple[str, ...]
    how: str = "copy"


def _llama_row(name: str) -> KeyRow:
    return KeyRow(f"model.{name}", (name,))


LLAMA_KEYS: tuple[KeyRow, ...] = (
    _llama_row("embed_tokens.weight"),
    *(
        _llama_row(f"layers.{{i}}.{module}.{kind}")
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        for kind in ("weight", "bias")
    ),
    _llama_row("layers.{i}.self_attn.q_norm.weight"),  # qk_norm (Qwen3)
    _llama_row("layers.{i}.self_attn.k_norm.weight"),
    _llama_row("layers.{i}.input_layernorm.weight"),
    _llama_row("layers.{i}.post_attention_layernorm.weight"),
    _llama_row("norm.weight"),
    KeyRow("lm_head.weight", ("lm_head.weight",)),
)

_QKV = ("layers.{i}.self_attn.q_proj", "layers.{i}.self_attn.k_proj", "layers.{i}.self_attn.v_proj")
GPT2_KEYS: tuple[KeyRow, ...] = (
    KeyRow("transformer.wte.weight", ("embed_tokens.weight",)),
    KeyRow("transformer.wpe.weight", ("embed_positions.weight",)),
    KeyRow("transformer.h.{i}.ln_1.weight", ("layers.{i}.input_layernorm.weight",)),
    KeyRow("transformer.h.{i}.ln_1.bias", ("layers.{i}.input_layernorm.bias",)),
    KeyRow("transformer.h.{i}.attn.c_attn.weight", tuple(f"{m}.weight" for m in _QKV), "fuse_t"),
    KeyRow("transformer.h.{i}.attn.c_attn.bias", tuple(f"{m}.bias" for m in _QKV), "fuse"),
    KeyRow("transformer.h.{i}.attn.c_proj.weight", ("layers.{i}.self_attn.o_proj.weight",), "transpose"),
    KeyRow("transformer.h.{i}.attn.c_proj.bias", ("layers.{i}.self_attn.o_proj.bias",)),
    KeyRow("transformer.h.{i}.ln_2.weight", ("layers.{i}.post_attention_layernorm.weight",)),
    KeyRow("transformer.h.{i}.ln_2.bias", ("layers.{i}.post_attention_layernorm.bias",)),
    KeyRow("transformer.h.{i}.mlp.c_fc.weight", ("layers.{i}.mlp.up_proj.weight",), "transpose"),
    KeyRow("transformer.h.{i}.mlp.c_fc.bias", ("layers.{i}.mlp.up_proj.bias",)),
    KeyRow("transformer.h.{i}.mlp.c_proj.weight", ("layers.{i}.mlp.down_proj.weight",), "transpose"),
    KeyRow("transformer.h.{i}.mlp.c_proj.bias", ("layers.{i}.mlp.down_proj.bias",)),
    KeyRow("transformer.ln_f.weight", ("norm.weight",)),
    KeyRow("transformer.ln_f.bias", ("norm.bias",)),
    KeyRow("lm_head.weight", ("lm_head.weight",)),
)

# Mixture-of-Experts layers under transformers 5's module names (the dense layers keep the Llama rows).
MOE_KEYS: tuple[KeyRow, ...] = (
    *LLAMA_KEYS,
    _llama_row("layers.{i}.mlp.gate.weight"),  # the router
    _llama_row("layers.{i}.mlp.experts.gate_up_proj"),  # (E, 2F, C): each expert's gate rows, then up rows
    _llama_row("layers.{i}.mlp.experts.down_proj"),  # (E, C, F)
    *(
        _llama_row(f"layers.{{i}}.mlp.shared_expert.{m}.weight")
        for m in ("gate_proj", "up_proj", "down_proj")
    ),
    _llama_row("layers.{i}.mlp.shared_expert_gate.weight"),
)

KEY_TABLES = {
    LLAMA: LLAMA_KEYS,
    QWEN2: LLAMA_KEYS,
    QWEN3: LLAMA_KEYS,
    MISTRAL: LLAMA_KEYS,
    MIXTRAL: MOE_KEYS,
    QWEN2_MOE: MOE_KEYS,
    QWEN3_MOE: MOE_KEYS,
    GPT2: GPT2_KEYS,
}

# Tensors some Hugging Face folders carry that are not weights (causal-mask and RoPE buffers of old versions).
_IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _expand(table: tuple[KeyRow, ...], n_layers: int) -> list[KeyRow]:
    rows = []
    for row in table:
        layers = range(n_layers) if "{i}" in row.hf else [None]
        for i in layers:
            if i is None:
                rows.append(row)
            else:
                rows.append(KeyRow(row.hf.format(i=i), tuple(k.format(i=i) for k in row.ours), row.how))
    return rows


# -- which architecture ------------------------------------------------------------------------------------


def _rope_architecture(cfg: ModelConfig) -> str:
    """The Llama-shaped family whose math matches the attention switches (each family adds one idea)."""
    if cfg.qk_norm:
        return QWEN3
    if cfg.qkv_bias and not cfg.bias:
        return QWEN2
    if cfg.sliding_window is not None:
        return MISTRAL
    return LLAMA


def architecture_for(cfg: ModelConfig) -> str:
    """The Hugging Face architecture for this model shape, or an ExportError naming the switch."""
    if cfg.mup_width_mult != 1.0:
        raise ExportError(
            f"model.mup=true at d_model={cfg.d_model}, mup_base_width={cfg.mup_base_width}: fold muP's "
            "multipliers into the weights first (lmforge.model.mup.fold_mup; lmforge export does it)"
        )
    if cfg.position == "rope":
        arch = moe_architecture(cfg) if cfg.moe.enabled else _rope_architecture(cfg)
        name = arch.removesuffix("ForCausalLM")
        needs: dict[str, Any] = {"ffn": "swiglu", "norm": "rmsnorm"}
        if arch != LLAMA:
            needs["bias"] = False  # Qwen and Mistral have no biases on o_proj and the feed-forward
        if arch in (QWEN2, QWEN3, QWEN2_MOE, QWEN3_MOE):
            needs["sliding_window"] = None  # Qwen's per-layer windows are not expressed here
        if arch in (QWEN3, QWEN3_MOE, MIXTRAL):
            needs["qkv_bias"] = False
        if arch == QWEN2_MOE:
            needs["qk_norm"] = False
        wrong = [
            f"model.{k}={getattr(cfg, k)} ({name} needs {v})"
            for k, v in needs.items()
            if getattr(cfg, k) != v
        ]
        wrong += moe_problems(cfg, arch)
        if wrong:
            raise ExportError(
                f"cannot export: these switches map to {name}, which cannot express " + "; ".join(wrong)
            )
        return arch
    if cfg.position == "learned":
        needs = {"ffn": "gelu", "norm": "layernorm", "bias": True, "qkv_bias": False, "qk_norm": False}
        wrong = [
            f"model.{k}={getattr(cfg, k)} (GPT-2 needs {v})" for k, v in needs.items() if getattr(cfg, k) != v
        ]
        if cfg.kv_heads != cfg.n_heads:
            wrong.append(f"model.n_kv_heads={cfg.kv_heads} (GPT-2 has no grouped-query attention)")
        if cfg.head_dim * cfg.n_heads != cfg.d_model:
            wrong.append(f"model.head_size={cfg.head_dim} (GPT-2 needs d_model / n_heads)")
        if cfg.sliding_window is not None:
            wrong.append(f"model.sliding_window={cfg.sliding_window} (GPT-2 attends to every position)")
        if wrong:
            raise ExportError(
                "cannot export: position=learned maps to GPT-2, which cannot express " + "; ".join(wrong)
            )
        return GPT2
    raise ExportError(
        f"cannot export: model.position={cfg.position} has no Hugging Face equivalent "
        "(Llama uses rope, GPT-2 uses learned positions)"
    )


# -- config translation ------------------------------------------------------------------------------------


def hf_config(
    cfg: ModelConfig, *, token_ids: dict[str, int | None] | None = None, dtype: str = "float32"
) -> dict:
    """The ``config.json`` of the Hugging Face model equivalent to ``cfg``."""
    ids = {f"{k}_token_id": v for k, v in (token_ids or {}).items()}
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **ids}
    common = {"vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std, "use_cache": True}
    common.update(tie_word_embeddings=cfg.tie_embeddings, torch_dtype=dtype, **ids)
    arch = architecture_for(cfg)
    if arch != GPT2:
        family: dict[str, Any] = {}
        if arch == LLAMA:
            family = {"attention_bias": cfg.bias, "mlp_bias": cfg.bias}
        elif arch in (QWEN2, QWEN3):
            family = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
            if arch == QWEN3:
                family["attention_bias"] = False
        elif arch == MISTRAL:
            family = {"sliding_window": cfg.sliding_window}
        else:
            family = moe_config(cfg, arch)
        scaling = rope_scaling_dict(cfg)
        return {
            "architectures": [arch],
            "model_type": MODEL_TYPES[arch],
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.hidden_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            # rope_theta and rope_scaling for transformers 4.x, rope_parameters for 5.x; all say the same.
            "rope_theta": cfg.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})},
            "attention_dropout": cfg.dropout,
            **family,
            **common,
        }
    return {
        "architectures": [GPT2],
        "model_type": "gpt2",
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_dim,
        "activation_function": "gelu_new",  # the tanh approximation, as lmforge's gelu
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        **common,
    }


def rope_scaling_dict(cfg: ModelConfig) -> dict[str, Any] | None:
    """Hugging Face's ``rope_scaling`` for ``cfg.rope_scaling`` (None for plain RoPE)."""
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        return {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    if cfg.rope_scaling == "yarn":
        return {
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "beta_fast": cfg.rope_beta_fast,
            "beta_slow": cfg.rope_beta_slow,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return None


def _rope_scaling_fields(rope: dict, wrong: list[str]) -> dict[str, Any]:
    """lmforge's rope_scaling fields from Hugging Face's ``rope_parameters`` / ``rope_scaling``."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        return {"rope_scaling": "linear", "rope_factor": float(rope.get("factor", 1.0))}
    if rope_type == "llama3":
        return {
            "rope_scaling": "llama3",
            "rope_factor": float(rope.get("factor", 1.0)),
            "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "rope_original_max_len": rope.get("original_max_position_embeddings"),
        }
    if rope_type == "yarn":
        unusual = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None]
        if rope.get("truncate", True) is not True:
            unusual.append("truncate")
        if unusual:
            wrong.append(
                f"yarn with {', '.join(unusual)} (lmforge implements YaRN's default attention factor)"
            )
        return {
            "rope_scaling": "yarn",
            "rope_factor": float(rope.get("factor", 1.0)),
            "rope_beta_fast": float(rope.get("beta_fast") or 32.0),
            "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
            "rope_original_max_len": rope.get("original_max_position_embeddings"),
        }
    wrong.append(f"rope type {rope_type!r} (lmforge implements default, linear, llama3 and yarn)")
    return {}


def hf_tokenizer_config(
    special_tokens: dict[str, str | None], max_seq_len: int, chat_template: str | None
) -> dict[str, Any]:
    """``tokenizer_config.json`` for a ``tokenizer.json``: its class, context, special tokens ("bos", "eos",
    "pad" -> text) and the chat template (the key transformers' ``apply_chat_template`` reads)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    config.update({f"{k}_token": v for k, v in special_tokens.items() if v is not None})
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _require(hf: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")


def _model_type(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type is None:
        archs = hf.get("architectures") or []
        model_type = MODEL_TYPES.get(archs[0] if archs else "", None)
    return str(model_type)


def _family_fields(model_type: str, hf: dict, wrong: list[str]) -> dict[str, Any]:
    """The attention switches each Llama-shaped family implies (appending to ``wrong`` what none expresses)."""
    if model_type == "llama":
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            wrong.append("attention_bias != mlp_bias (lmforge has one bias switch)")
        return {"bias": bool(hf.get("attention_bias", False))}
    if model_type in ("mistral", "mixtral"):
        return {"sliding_window": hf.get("sliding_window")}
    # Qwen2 and Qwen3: sliding windows only on some layers, which lmforge does not express
    if hf.get("use_sliding_window", False):
        wrong.append("use_sliding_window=true (per-layer sliding windows; lmforge has one window for all)")
    if model_type == "qwen2":
        return {"qkv_bias": True}
    if model_type == "qwen2_moe":
        return {"qkv_bias": bool(hf.get("qkv_bias", True))}
    if hf.get("attention_bias", False):
        wrong.append(f"attention_bias=true on {model_type} (biases on q, k, v and o)")
    return {"qk_norm": True}


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The lmforge ``ModelConfig`` equivalent to a Hugging Face Llama, Qwen2, Qwen3, Mistral, Mixtral,
    Qwen2-MoE, Qwen3-MoE or GPT-2 ``config.json``."""
    model_type = _model_type(hf)
    if model_type in ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"):
        _require(
            hf,
            ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
            where,
        )
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        wrong: list[str] = []
        if hf.get("hidden_act", "silu") != "silu":
            wrong.append(f"hidden_act={hf['hidden_act']} (lmforge's swiglu uses silu)")
        family = _family_fields(model_type, hf, wrong)
        if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
            family.update(moe_fields(model_type, hf, wrong))
        family.update(_rope_scaling_fields(rope, wrong))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            wrong.append(f"partial_rotary_factor={rope['partial_rotary_factor']}")
        if wrong:
            raise ExportError(f"{where}: cannot import this {model_type}: " + "; ".join(wrong))
        fields: dict[str, Any] = dict(
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            n_layers=hf["num_hidden_layers"],
            d_model=d,
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_size=hf.get("head_dim"),  # kept only where it differs from d_model // n_heads (below)
            ffn_hidden=hf["intermediate_size"],
            position="rope",
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            ffn="swiglu",
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **family,
        )
    elif model_type == "gpt2":
        _require(hf, ("vocab_size", "n_embd", "n_layer", "n_head"), where)
        wrong = []
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            wrong.append(f"activation_function={hf['activation_function']} (lmforge's gelu is the tanh form)")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            wrong.append("non-standard attention scaling")
        if hf.get("add_cross_attention", False):
            wrong.append("cross-attention")
        if wrong:
            raise ExportError(f"{where}: cannot import this GPT-2: " + "; ".join(wrong))
        fields = dict(
            vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("n_positions", 1024),
            n_layers=hf["n_layer"],
            d_model=hf["n_embd"],
            n_heads=hf["n_head"],
            ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
            position="learned",
            ffn="gelu",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            bias=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    else:
        raise ExportError(
            f"{where}: unsupported architecture {model_type!r} (lmforge imports {family_list()})"
        )
    fields["init_std"] = float(hf.get("initializer_range", 0.02))
    try:
        cfg = build(ModelConfig, fields, "model")  # coerces and type-checks every value
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if cfg.head_size is not None and cfg.n_heads >= 1 and cfg.head_size * cfg.n_heads == cfg.d_model:
        cfg = dataclasses.replace(cfg, head_size=None)
    problems = cfg.problems()
    if problems:
        raise CheckpointError(f"{where}: describes an impossible model: " + "; ".join(problems))
    return cfg


# -- weights -----------------------------------------------------------------------------------------------


def to_hf_state_dict(model: Transformer, *, stacked_experts: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names and layouts (a tied head is left out, as HF saves it).
    MoE experts as the Hub stores them, one tensor per expert, unless ``stacked_experts`` (transformers 5's
    modules). A trained ``expert_bias`` (DeepSeek-V3 balancing) has no place in these families: refused."""
    cfg = model.cfg
    ours = dict(model.state_dict())
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight")
    for key in [k for k in ours if k.endswith(".mlp.expert_bias")]:
        if ours.pop(key).abs().max() > 0:
            raise ExportError(
                f"cannot export: {key} is not zero (trained with model.moe.bias_update_rate > 0), and "
                "Mixtral and Qwen-MoE route without a bias; the exported model would choose other experts"
            )
    out, used = {}, set()
    for row in _expand(KEY_TABLES[architecture_for(cfg)], cfg.n_layers):
        if not all(k in ours for k in row.ours):
            continue
        tensors = [ours[k].detach() for k in row.ours]
        if row.how == "copy":
            value = tensors[0]
        elif row.how == "transpose":
            value = tensors[0].t()
        elif row.how == "fuse_t":
            value = torch.cat(tensors, dim=0).t()  # (C, (H + 2 Hkv) hd)
        else:
            value = torch.cat(tensors, dim=0)
        out[row.hf] = value.contiguous().cpu()
        used.update(row.ours)
    left = sorted(set(ours) - used)
    if left:  # a parameter the table does not know: exporting without it would silently lose weights
        raise ExportError(f"no Hugging Face name for lmforge parameters {left[:5]}")
    arch = architecture_for(cfg)
    if arch in MOE_ARCHITECTURES and not stacked_experts:
        out = to_hub_experts(out, cfg, arch)
    return out


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str
) -> dict[str, torch.Tensor]:
    """lmforge weights for ``cfg`` from Hugging Face tensors, checking every name and shape."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    biases = [k for k in expected if k.endswith(".mlp.expert_bias")]  # no Hugging Face family has one
    for key in biases:
        expected.pop(key)
    arch = architecture_for(cfg)
    if arch in MOE_ARCHITECTURES:
        hf_state = from_hub_experts(hf_state, cfg, arch, where)
    hf_state = dict(hf_state)
    if "transformer.wte.weight" not in hf_state and "wte.weight" in hf_state:  # original GPT-2 uploads
        hf_state = {(k if k.startswith("lm_head") else f"transformer.{k}"): v for k, v in hf_state.items()}
    ours, used = {}, set()
    for row in _expand(KEY_TABLES[arch], cfg.n_layers):
        if not all(k in expected for k in row.ours):
            continue
        if row.hf not in hf_state:
            raise CheckpointError(f"{where}: no tensor {row.hf!r} (the config implies it)")
        value, used = hf_state[row.hf], used | {row.hf}
        shapes = [expected[k] for k in row.ours]
        if row.how in ("transpose", "fuse_t"):
            value = value.t()
        want = (sum(s[0] for s in shapes), *shapes[0][1:])
        if tuple(value.shape) != want:
            shown = tuple(reversed(want)) if row.how in ("transpose", "fuse_t") else want
            raise CheckpointError(
                f"{where}: {row.hf} has shape {tuple(hf_state[row.hf].shape)}, the config implies {shown}"
            )
        for key, part in zip(row.ours, value.split([s[0] for s in shapes], dim=0)):
            ours[key] = part.contiguous()
    unexpected = sorted(
        k
        for k in set(hf_state) - used
        if not k.endswith(_IGNORED_HF_SUFFIXES) and not (k == "lm_head.weight" and cfg.tie_embeddings)
    )
    if unexpected:
        raise CheckpointError(f"{where}: tensors the config does not explain: {', '.join(unexpected[:5])}")
    for key in biases:
        ours[key] = torch.zeros(cfg.moe.n_experts)
    return ours


def to_hf_model(model: Transformer):
    """The equivalent ``transformers`` model in memory (same weights, eval mode), e.g. to compare generation."""
    import transformers

    model = fold_mup(model)  # muP's attention and logit multipliers, folded into the weights
    config_dict = hf_config(model.cfg)
    arch = config_dict["architectures"][0]
    hf_cfg = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    # Built for real (not on meta): its derived buffers, such as RoPE's inverse frequencies, are set at init.
    with torch.device(next(model.parameters()).device):
        hf_model = getattr(transformers, arch)(hf_cfg)
    stacked = any(k.endswith("experts.gate_up_proj") for k in hf_model.state_dict())  # transformers 5
    state = to_hf_state_dict(model, stacked_experts=stacked)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ExportError(
            f"transformers {arch} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    if model.cfg.moe.enabled and hasattr(hf_model, "set_experts_implementation"):
        hf_model.set_experts_implementation("eager")  # transformers 5's grouped path needs 16-byte rows
    return hf_model.to(next(model.parameters()).dtype).eval()


# -- verification ------------------------------------------------------------------------------------------


def probe_batch(cfg: ModelConfig) -> torch.Tensor:
    """A fixed batch of token ids (2, min(32, max_seq_len)) for comparing logits."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, min(32, cfg.max_seq_len)), generator=generator)


def max_logits_diff(model: Transformer, hf_model, idx: torch.Tensor) -> float:
    """Max |logits difference| between an lmforge model and a transformers model on ``idx`` (B, T), fp32."""
    with torch.no_grad():
        ours = model.float()(idx)  # (B, T, V)
        theirs = hf_model.float()(input_ids=idx).logits  # (B, T, V)
    return float((ours - theirs).abs().max())


def verify_with_transformers(model: Transformer, folder: Path) -> tuple[float | None, str]:
    """Reload an exported ``folder`` with transformers and compare its logits with ``model``'s on a fixed batch:
    (max |difference|, a note). An ExportError beyond ``VERIFY_TOLERANCE``; (None, why) without transformers."""
    try:
        import transformers
    except ImportError:
        return None, "not verified: transformers is not installed (pip install 'lmforge[hf]')"
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise in a command's output
    try:
        # MoE experts through transformers' plain per-expert loop: its grouped-matmul path (the default in 5.x)
        # refuses widths that are not a multiple of 16 bytes, which small models have
        moe = {"experts_implementation": "eager"} if model.cfg.moe.enabled else {}
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, **moe
        ).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    diff = max_logits_diff(model, hf_model, probe_batch(model.cfg))
    note = f"transformers {transformers.__version__} reloads it; max |logits difference| = {diff:.2e}"
    if not diff <= VERIFY_TOLERANCE:
        raise ExportError(f"export check failed: {note} exceeds {VERIFY_TOLERANCE:g} (nothing written)")
    return diff, note
