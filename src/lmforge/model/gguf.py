"""GGUF conversion: lmforge models as llama.cpp reads them (its ``llama``, ``qwen2``, ``qwen3``, ``qwen2moe``,
``qwen3moe`` and ``gpt2`` architectures; Mistral and Mixtral are ``llama``, as llama.cpp's own converter writes
them).

Pure conversion, like ``model/hf.py``: the tensors (names, layouts, dtypes) and the metadata
(hyper-parameters, tokenizer) of a GGUF file, and the function that writes them with the ``gguf`` package;
the check against llama.cpp (``verify_with_llama_cpp``). Reading checkpoints and writing files atomically is
``lmforge.convert``'s job.

Two layout facts decide the tensors:
- llama.cpp's Llama rotates *interleaved* pairs of a head's dimensions (0,1), (2,3), ...; Hugging Face's and
  lmforge's RoPE rotate the two halves (i, i + hd/2). Permuting the rows of q_proj and k_proj inside each head
  (``permute_rotary``, the same permutation llama.cpp's converter applies) makes the two agree. llama.cpp's
  Qwen architectures rotate the halves ("NEOX" RoPE), as lmforge does: their q and k are written as they are.
- llama.cpp stacks a layer's experts in one tensor per projection, (E, F, C) for gate and up and (E, C, F) for
  down in numpy order: lmforge's (E, 2F, C) ``gate_up_proj`` is split in two, its ``down_proj`` is kept.

Where llama.cpp computes something else than lmforge, the export refuses, naming the switch, or (Mistral's
sliding window, which llama.cpp's ``llama`` ignores: it attends to every cached position) declares only the
context where the two agree: ``{arch}.context_length`` is the window when it is shorter than max_seq_len.
- GGUF lists a tensor's shape fastest dimension first; numpy's C order is the same bytes, so an (out, in)
  ``nn.Linear`` weight is written as it is and appears as [in, out] in the file.

Shape legend: C d_model, F feed-forward hidden, V vocabulary, H heads, Hkv key/value heads, hd head dimension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ExportError
from lmforge.model.hf import architecture_for
from lmforge.model.hf_families import GPT2, LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN2_MOE, QWEN3, QWEN3_MOE
from lmforge.model.hf_moe import normalised_topk
from lmforge.model.transformer import rope_inv_freq, scaled_rope_inv_freq

DTYPES = ("f32", "f16", "q8_0")
GPT2_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex (Hugging Face ByteLevel, use_regex)
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values

# token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

# lmforge parameter -> GGUF tensor, per architecture; "{i}" stands for the layer index.
LLAMA_TENSORS: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.o_proj.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.mlp.gate_proj.bias": "blk.{i}.ffn_gate.bias",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.up_proj.bias": "blk.{i}.ffn_up.bias",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.mlp.down_proj.bias": "blk.{i}.ffn_down.bias",
    "layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",  # qk_norm (Qwen3), (hd,)
    "layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    # Mixture of Experts: the router, the routed experts stacked (gate and up split from gate_up_proj),
    # the shared expert and its sigmoid gate (Qwen2-MoE; the gate's (1, C) weight written as (C,))
    "layers.{i}.mlp.gate.weight": "blk.{i}.ffn_gate_inp.weight",  # (E, C)
    "layers.{i}.mlp.experts.gate_proj": "blk.{i}.ffn_gate_exps.weight",  # (E, F, C)
    "layers.{i}.mlp.experts.up_proj": "blk.{i}.ffn_up_exps.weight",  # (E, F, C)
    "layers.{i}.mlp.experts.down_proj": "blk.{i}.ffn_down_exps.weight",  # (E, C, F)
    "layers.{i}.mlp.shared_expert.gate_proj.weight": "blk.{i}.ffn_gate_shexp.weight",
    "layers.{i}.mlp.shared_expert.up_proj.weight": "blk.{i}.ffn_up_shexp.weight",
    "layers.{i}.mlp.shared_expert.down_proj.weight": "blk.{i}.ffn_down_shexp.weight",
    "layers.{i}.mlp.shared_expert_gate.weight": "blk.{i}.ffn_gate_inp_shexp.weight",  # (C,)
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# GPT-2 in llama.cpp fuses q, k, v into one attn_qkv (rows q, then k, then v), nn.Linear layout.
_QKV = tuple(f"layers.{{i}}.self_attn.{m}_proj" for m in "qkv")
GPT2_TENSORS: dict[str, str] = {
    "embed_tokens.weight": "token_embd.weight",
    "embed_positions.weight": "position_embd.weight",
    "layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.input_layernorm.bias": "blk.{i}.attn_norm.bias",
    "layers.{i}.self_attn.qkv.weight": "blk.{i}.attn_qkv.weight",  # fused from _QKV
    "layers.{i}.self_attn.qkv.bias": "blk.{i}.attn_qkv.bias",
    "layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.self_attn.o_proj.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.post_attention_layernorm.bias": "blk.{i}.ffn_norm.bias",
    "layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.mlp.up_proj.bias": "blk.{i}.ffn_up.bias",
    "layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.mlp.down_proj.bias": "blk.{i}.ffn_down.bias",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}

# Hugging Face architecture -> llama.cpp's. Mistral and Mixtral are llama.cpp's ``llama`` (Mixtral with
# expert tensors); llama.cpp has no architecture of their own for text-only checkpoints.
GGUF_ARCH = {
    LLAMA: "llama",
    MISTRAL: "llama",
    MIXTRAL: "llama",
    QWEN2: "qwen2",
    QWEN3: "qwen3",
    QWEN2_MOE: "qwen2moe",
    QWEN3_MOE: "qwen3moe",
    GPT2: "gpt2",
}
NEOX_ROPE = ("qwen2", "qwen3", "qwen2moe", "qwen3moe")  # llama.cpp rotates halves there, as lmforge does
MOE_GGUF = ("qwen2moe", "qwen3moe")  # llama.cpp's own MoE architectures (Mixtral is llama with experts)


def _llama_cpp_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """What llama.cpp's ``arch`` computes differently from lmforge for ``cfg`` (llama.cpp 0.3.36's
    src/models/*.cpp): Hugging Face can express these, llama.cpp cannot."""
    wrong = []
    if arch in ("qwen2", "qwen2moe") and cfg.head_dim * cfg.n_heads != cfg.d_model:
        wrong.append(
            f"model.head_size={cfg.head_dim} (llama.cpp's {arch} sizes attention as d_model = n_heads * head size)"
        )
    if arch in MOE_GGUF and cfg.moe.first_dense_layers:
        wrong.append(
            f"model.moe.first_dense_layers={cfg.moe.first_dense_layers} (llama.cpp's {arch}: every layer is MoE)"
        )
    if arch == "qwen2moe" and normalised_topk(cfg):  # llama.cpp's qwen2moe never renormalises
        wrong.append(
            f"model.moe.norm_topk_prob={cfg.moe.norm_topk_prob} with router={cfg.moe.router} "
            "(llama.cpp's qwen2moe uses the top-k softmax probabilities as they are)"
        )
    if cfg.rope_scaling == "llama3" and arch != "llama":  # only llama.cpp's llama reads rope_freqs
        wrong.append(
            f"model.rope_scaling=llama3 (llama.cpp's {arch} has no per-frequency RoPE factors: rope_freqs)"
        )
    if arch == "qwen3moe" and not normalised_topk(cfg):  # llama.cpp's qwen3moe always renormalises
        wrong.append(
            f"model.moe.norm_topk_prob={cfg.moe.norm_topk_prob} with router={cfg.moe.router} "
            "(llama.cpp's qwen3moe renormalises the top-k weights to sum 1)"
        )
    return wrong


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name (``llama``, ``qwen2``, ``qwen3``, ``qwen2moe``, ``qwen3moe`` or ``gpt2``),
    or an ExportError naming the switch."""
    arch = GGUF_ARCH[architecture_for(cfg)]
    wrong = _llama_cpp_problems(cfg, arch)
    if wrong:
        raise ExportError(
            f"cannot export to GGUF: these switches map to llama.cpp's {arch}, which computes them "
            "differently: " + "; ".join(wrong) + " (export to a Hugging Face folder instead: --format hf)"
        )
    return arch


def exact_context(cfg: ModelConfig) -> int:
    """The longest context over which llama.cpp computes what lmforge does: ``max_seq_len``, or the sliding
    window when it is shorter (llama.cpp's ``llama`` attends to every position; a window of W positions
    changes nothing while the context holds at most W)."""
    window = cfg.sliding_window
    return cfg.max_seq_len if window is None else min(cfg.max_seq_len, window)


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from half-split RoPE pairs (i, i + hd/2) to interleaved pairs (2i, 2i + 1).

    ``weight`` is (n_heads * hd, ...) (a q/k projection weight or bias); the result has the same shape."""
    rows = weight.shape[0]
    head = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])  # (H, 2, hd/2, ...)
    return head.transpose(1, 2).reshape(weight.shape)  # (H, hd/2, 2, ...) -> rows per head interleaved


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_rotary`` (for tests and for reading GGUF files back)."""
    rows = weight.shape[0]
    head = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])  # (H, hd/2, 2, ...)
    return head.transpose(1, 2).reshape(weight.shape)


def gguf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under GGUF names and layouts, float32, in file order (a tied head is left out:
    llama.cpp reuses token_embd as the output then)."""
    arch = architecture_for(cfg)
    ours = {k: v.detach().float().cpu() for k, v in state.items()}
    if cfg.tie_embeddings:
        head = ours.pop("lm_head.weight", None)
        if GGUF_ARCH[arch] == "qwen2moe" and head is not None:  # llama.cpp's qwen2moe requires output.weight
            ours["lm_head.weight"] = head
    for key in [k for k in ours if k.endswith(".mlp.expert_bias")]:  # as the Hugging Face export
        if ours.pop(key).abs().max() > 0:
            raise ExportError(
                f"cannot export: {key} is not zero (trained with model.moe.bias_update_rate > 0), and "
                "llama.cpp's Mixtral and Qwen-MoE route without a bias; it would choose other experts"
            )
    for i in range(cfg.n_layers):
        gate_up = ours.pop(f"layers.{i}.mlp.experts.gate_up_proj", None)  # (E, 2F, C)
        if gate_up is not None:
            hidden = gate_up.shape[1] // 2
            ours[f"layers.{i}.mlp.experts.gate_proj"] = gate_up[:, :hidden]  # (E, F, C)
            ours[f"layers.{i}.mlp.experts.up_proj"] = gate_up[:, hidden:]
        shared_gate = f"layers.{i}.mlp.shared_expert_gate.weight"
        if shared_gate in ours:
            ours[shared_gate] = ours[shared_gate].reshape(-1)  # (1, C) -> (C,)
    if arch == GPT2:
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                parts = [f"{m.format(i=i)}.{kind}" for m in _QKV]
                if all(p in ours for p in parts):
                    ours[f"layers.{i}.self_attn.qkv.{kind}"] = torch.cat([ours.pop(p) for p in parts], dim=0)
    elif GGUF_ARCH[arch] not in NEOX_ROPE:
        for i in range(cfg.n_layers):
            for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
                for kind in ("weight", "bias"):
                    key = f"layers.{i}.self_attn.{proj}.{kind}"
                    if key in ours:
                        ours[key] = permute_rotary(ours[key], heads)
    out = {}
    for ours_name, gguf_name in (GPT2_TENSORS if arch == GPT2 else LLAMA_TENSORS).items():
        for i in range(cfg.n_layers) if "{i}" in ours_name else [None]:
            key = ours_name.format(i=i) if i is not None else ours_name
            if key in ours:
                out[gguf_name.format(i=i) if i is not None else gguf_name] = ours.pop(key).contiguous()
    if ours:  # a parameter the table does not know: exporting without it would silently lose weights
        raise ExportError(f"no GGUF name for lmforge parameters {sorted(ours)[:5]}")
    if cfg.rope_scaling == "llama3":
        out["rope_freqs.weight"] = rope_freq_factors(cfg)
    return out


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` (hd/2,): each RoPE frequency is divided by its factor, so the factors are
    the plain frequencies over lmforge's scaled ones (Llama 3.1's scaling: 1 for the high frequencies,
    ``rope_factor`` for the low ones, interpolated between)."""
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta) / scaled_rope_inv_freq(cfg)  # (hd/2,)


def add_rope_scaling(writer, cfg: ModelConfig) -> None:
    """The RoPE scaling keys llama.cpp reads: "linear" as a frequency scale, "yarn" with its original context
    and correction range (llama.cpp's YaRN blends and scales cos/sin as Hugging Face's does); "llama3" is
    the ``rope_freqs`` tensor instead (``gguf_state_dict``)."""
    from gguf import RopeScalingType

    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)
    elif cfg.rope_scaling == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len)
        writer.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)


def encode_tensor(name: str, value: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The bytes of one tensor as GGUF stores it in ``dtype`` (f32, f16 or q8_0) and its GGML type.

    Like llama.cpp's converter, 1-D tensors (norms, biases) stay f32, and a matrix whose rows are not a
    multiple of 32 values cannot be q8_0 and is written f16 instead."""
    from gguf import GGMLQuantizationType, quants

    array = value.numpy().astype(np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, GGMLQuantizationType.F32
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), GGMLQuantizationType.F16


# -- tokenizer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]  # by id, in byte-level spelling (as tokenizer.json stores them)
    token_types: list[int]
    merges: list[str]  # "left right", in rank order
    special_ids: dict[str, int | None]  # bos, eos, pad


def gguf_vocab(
    tokenizer_json: dict, special_ids: dict[str, int | None], vocab_size: int, where: str
) -> GGUFVocab:
    """The GGUF vocabulary of a ``tokenizers`` byte-level BPE (GPT-2 style), padded to the model's
    ``vocab_size`` with unused tokens; an ExportError for tokenizers llama.cpp would split differently."""
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    byte_level_bpe = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and tokenizer_json.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
    )
    if not byte_level_bpe:
        raise ExportError(
            f"{where}: GGUF export needs a GPT-2 style byte-level BPE tokenizer (data.tokenizer=bpe); "
            f"this one is {model.get('type')} with pre-tokenizer {pre.get('type')}, "
            "which llama.cpp would split differently"
        )
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = dict.fromkeys(id_to_token, NORMAL)
    for added in tokenizer_json.get("added_tokens") or []:
        id_to_token[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special", True) else USER_DEFINED
    top = max(id_to_token) + 1
    if top > vocab_size:
        raise ExportError(f"{where}: tokenizer has ids up to {top - 1}, but model.vocab_size={vocab_size}")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            token_types.append(types[i])
        else:  # the model's embedding rows past the tokenizer: never produced by encoding
            tokens.append(f"[PAD{i}]")
            token_types.append(UNUSED)  # not USER_DEFINED: llama.cpp would match those in any text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab(tokens=tokens, token_types=token_types, merges=merges, special_ids=special_ids)


INSTALL_HINT = "pip install 'lmforge[gguf]'"


def require_gguf() -> None:
    """An ExportError with the install hint when the ``gguf`` package (the writer) is missing, so that an
    export fails before it reads a checkpoint or creates a folder."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ExportError(f"GGUF export needs the gguf package: {INSTALL_HINT}") from None


# -- writing -----------------------------------------------------------------------------------------------


def write_gguf(
    path: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    *,
    dtype: str = "f32",
    vocab: GGUFVocab | None = None,
    chat_template: str | None = None,
    name: str = "lmforge",
) -> dict[str, str]:
    """Write ``path`` (a GGUF file) for a model; returns {GGUF tensor name: GGML type name}."""
    from gguf import GGUFWriter, LlamaFileType

    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    arch = gguf_architecture(cfg)
    tensors = gguf_state_dict(state, cfg)
    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_file_type(
        {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[
            dtype
        ]
    )
    writer.add_context_length(exact_context(cfg))  # max_seq_len, or a shorter sliding window (see the top)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    moe = cfg.moe
    expert_hidden = moe.expert_hidden or cfg.hidden_dim
    # llama.cpp's llama sizes its experts by feed_forward_length (every Mixtral layer is MoE)
    writer.add_feed_forward_length(expert_hidden if arch == "llama" and moe.enabled else cfg.hidden_dim)
    if moe.enabled:
        writer.add_expert_count(moe.n_experts)
        writer.add_expert_used_count(moe.top_k)
        if arch in MOE_GGUF:
            writer.add_expert_feed_forward_length(expert_hidden)
        if arch == "qwen2moe":
            shared = moe.shared_expert_hidden or moe.n_shared_experts * expert_hidden
            writer.add_expert_shared_feed_forward_length(shared)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch != "gpt2":
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)
        add_rope_scaling(writer, cfg)
        if cfg.head_dim * cfg.n_heads != cfg.d_model:  # pruned heads: attention narrower than d_model
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)
    if vocab is None:  # a run without tokenizer.json: llama.cpp runs token ids, but cannot tokenize text
        writer.add_tokenizer_model("none")
    else:
        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(GPT2_PRE_TOKENIZER)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        for kind, token_id in vocab.special_ids.items():
            if token_id is not None:
                getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(False)  # lmforge's tokenizer adds no token at the start of a text
        writer.add_add_eos_token(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
    types = {}
    for tensor_name, value in tensors.items():
        data, ggml_type = encode_tensor(tensor_name, value, dtype)
        writer.add_tensor(
            tensor_name, data, raw_shape=None, raw_dtype=ggml_type if data.dtype == np.uint8 else None
        )
        types[tensor_name] = ggml_type.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def read_tokenizer_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: unreadable tokenizer ({exc})") from None


# -- verification ------------------------------------------------------------------------------------------

VERIFY_TOLERANCE = 1e-3  # max |logits difference| accepted for f32 files (llama.cpp sums in another order)
VERIFY_NEW_TOKENS = 16


@dataclass(frozen=True)
class LlamaCppCheck:
    max_abs_diff: float  # max |logits difference| over the probe prompt
    agreement: (
        float  # fraction of greedy continuation tokens llama.cpp and lmforge agree on (until they part)
    )
    ours: list[int]
    theirs: list[int]


@torch.no_grad()
def greedy_ids(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """lmforge's greedy continuation of ``prompt`` (a full forward each step: the reference, not the fast
    path)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        logits = model(torch.tensor([ids[-model.cfg.max_seq_len :]]))  # (1, T, V)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def open_llama_cpp(path: Path, n_ctx: int, *, n_threads: int | None = None, f32_cache: bool = True):
    """A llama.cpp model (``llama_cpp.Llama``) on the CPU. It keeps the logits of every position
    (``logits_all``: without it llama-cpp-python stores none, and ``llama_cpp_greedy`` reads them).
    ``f32_cache``: keys and values cached in f32 (llama.cpp's default is f16, which alone moves logits
    by ~1e-3)."""
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(
        **cache,
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=n_threads,
        n_gpu_layers=0,
        seed=0,
        verbose=False,
    )


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits over ``prompt`` (T, V) and its greedy continuation (argmax, no sampler)."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    out = []
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return logits, out


def check_with_llama_cpp(model: torch.nn.Module, path: Path, prompt: list[int]) -> LlamaCppCheck:
    """Load ``path`` with llama.cpp and compare its logits on ``prompt`` and its greedy continuation with
    ``model``'s."""
    n_ctx = min(exact_context(model.cfg), len(prompt) + VERIFY_NEW_TOKENS)
    new_tokens = n_ctx - len(prompt)
    llm = open_llama_cpp(path, n_ctx)
    try:
        theirs_logits, theirs = llama_cpp_greedy(llm, prompt, new_tokens)
    finally:
        llm.close()
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt]))[0].float().numpy()  # (T, V)
    ours = greedy_ids(model, prompt, new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    return LlamaCppCheck(
        max_abs_diff=float(np.abs(ours_logits - theirs_logits).max()),
        agreement=agree / max(len(ours), 1),
        ours=ours,
        theirs=theirs,
    )


def verify_with_llama_cpp(model: torch.nn.Module, path: Path, dtype: str) -> tuple[float | None, str]:
    """The export's self-check: (max |logits difference|, a note). For f32 an ExportError when llama.cpp's
    greedy continuation differs or the logits differ beyond ``VERIFY_TOLERANCE``; f16 and q8_0 are reported
    (rounding may flip near-ties). (None, why) without the ``llama-cpp-python`` binding."""
    try:
        import llama_cpp
    except ImportError:
        return None, f"not verified: llama-cpp-python is not installed ({INSTALL_HINT})"
    generator = torch.Generator().manual_seed(0)
    length = min(16, max(1, exact_context(model.cfg) - VERIFY_NEW_TOKENS))
    prompt = torch.randint(0, model.cfg.vocab_size, (length,), generator=generator).tolist()
    check = check_with_llama_cpp(model, path, prompt)
    note = (
        f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) loads it; {dtype}: max |logits difference| = "
        f"{check.max_abs_diff:.2e}, greedy continuation agrees on {check.agreement:.0%} "
        f"of {len(check.ours)} tokens"
    )
    if dtype == "f32" and (check.agreement < 1.0 or not check.max_abs_diff <= VERIFY_TOLERANCE):
        raise ExportError(
            f"export check failed: {note} (f32 needs 100% and <= {VERIFY_TOLERANCE:g}; nothing written)"
        )
    return check.max_abs_diff, note
