"""MoE parameter accounting (total, active, routed experts, FLOPs) against transformers models on ``meta``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import (
    Llama4ForCausalLM,
    Llama4TextConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lmforge.cli import main
from lmforge.config import PRESETS, ModelConfig, MoEConfig
from lmforge.model.info import (
    count_active_params,
    count_expert_params,
    count_params,
    describe,
    model_flops_per_token,
)

MIXTRAL_8X7B_PARAMS = 46_702_792_704  # mistralai/Mixtral-8x7B-v0.1


def meta_count(model_class, config) -> int:
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def mixtral_config(cfg, **changes) -> MixtralConfig:
    values = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
        tie_word_embeddings=cfg.tie_embeddings,
    )  # fmt: skip
    return MixtralConfig(**(values | changes))


def qwen2_moe_config(cfg) -> Qwen2MoeConfig:
    return Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden_dim,
        moe_intermediate_size=cfg.moe.expert_hidden, shared_expert_intermediate_size=cfg.moe.shared_expert_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        num_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k, qkv_bias=cfg.qkv_bias,
        mlp_only_layers=list(range(cfg.moe.first_dense_layers)), tie_word_embeddings=cfg.tie_embeddings,
    )  # fmt: skip


def test_mixtral_8x7b_has_the_published_count():
    cfg = PRESETS["mixtral-8x7b"]
    assert count_params(cfg) == MIXTRAL_8X7B_PARAMS
    assert meta_count(MixtralForCausalLM, mixtral_config(cfg)) == MIXTRAL_8X7B_PARAMS


def test_active_parameters_are_a_model_with_only_top_k_experts_plus_the_full_router():
    # A Mixtral with top_k experts per layer holds exactly what one token uses, except that the router
    # still scores all n_experts: L x (E - k) x d more.
    cfg = PRESETS["mixtral-8x7b"]
    k, E = cfg.moe.top_k, cfg.moe.n_experts
    only_k = meta_count(MixtralForCausalLM, mixtral_config(cfg, num_local_experts=k))
    assert count_active_params(cfg) == only_k + cfg.n_layers * (E - k) * cfg.d_model == 12_879_925_248
    one_expert = 3 * 4096 * 14336
    assert count_expert_params(cfg) == 32 * 8 * one_expert == 45_097_156_608


def test_qwen_moe_presets_match_transformers():
    qwen15 = PRESETS["qwen1.5-moe-a2.7b"]
    assert count_params(qwen15) == meta_count(Qwen2MoeForCausalLM, qwen2_moe_config(qwen15)) == 14_315_784_192
    q3 = PRESETS["qwen3-30b-a3b"]
    hf = Qwen3MoeConfig(
        vocab_size=q3.vocab_size, hidden_size=q3.d_model, intermediate_size=q3.hidden_dim,
        moe_intermediate_size=q3.moe.expert_hidden, num_hidden_layers=q3.n_layers,
        num_attention_heads=q3.n_heads, num_key_value_heads=q3.kv_heads, head_dim=q3.head_dim,
        num_experts=q3.moe.n_experts, num_experts_per_tok=q3.moe.top_k, mlp_only_layers=[],
        tie_word_embeddings=False,
    )  # fmt: skip
    assert count_params(q3) == meta_count(Qwen3MoeForCausalLM, hf) == 30_532_122_624


def test_first_dense_layers_shared_gate_and_biases_on_a_small_qwen2_moe():
    cfg = dataclasses.replace(
        PRESETS["tiny"], n_layers=3, qkv_bias=True, tie_embeddings=False, ffn_hidden=320,
        moe=MoEConfig(n_experts=6, top_k=2, n_shared_experts=2, expert_hidden=96, shared_expert_hidden=192,
                      shared_expert_gate=True, first_dense_layers=1),
    )  # fmt: skip
    assert count_params(cfg) == meta_count(Qwen2MoeForCausalLM, qwen2_moe_config(cfg))
    # By hand: one token uses the dense layer, then per MoE layer the router, 2 of 6 experts and the shared part.
    d = 128
    assert count_params(cfg) - count_active_params(cfg) == 2 * (6 - 2) * 3 * d * 96


def test_the_1t_shape_matches_a_llama4_model_of_the_same_structure():
    # Llama 4's text model has our block exactly (GQA, no q/k norm weights, routed SwiGLU experts, a [E, d]
    # router, one shared SwiGLU, dense layers where it is told): it counts the moe-1t shape independently.
    cfg = PRESETS["moe-1t"]
    hf = Llama4TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.moe.expert_hidden,
        intermediate_size_mlp=cfg.hidden_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, num_local_experts=cfg.moe.n_experts,
        num_experts_per_tok=cfg.moe.top_k, moe_layers=list(range(cfg.moe.first_dense_layers, cfg.n_layers)),
        tie_word_embeddings=False,
    )  # fmt: skip
    assert count_params(cfg) == meta_count(Llama4ForCausalLM, hf) == 1_028_298_994_688
    assert count_active_params(cfg) == 34_752_263_168


def test_flops_per_token_follow_the_active_parameters():
    cfg = PRESETS["mixtral-8x7b"]
    embedding = cfg.vocab_size * cfg.d_model  # untied input embedding: a lookup
    assert model_flops_per_token(cfg, 4096) == 6 * (12_879_925_248 - embedding) + 12 * 32 * 32 * 128 * 4096
    dense = dataclasses.replace(cfg, moe=MoEConfig())
    assert count_active_params(dense) == count_params(dense)


def test_model_info_shows_total_active_and_expert_share(capsys):
    assert main(["model", "info", "mixtral-8x7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == MIXTRAL_8X7B_PARAMS
    assert info["active_parameters"] == 12_879_925_248
    assert info["expert_share"] == pytest.approx(45_097_156_608 / MIXTRAL_8X7B_PARAMS)
    assert describe(PRESETS["7b"])["expert_parameters"] == 0
    assert main(["model", "info", "moe-1t"]) == 0
    text = capsys.readouterr().out
    assert "1,028,298,994,688" in text and "34,752,263,168" in text and "98.7% of the total" in text


def test_the_shared_block_follows_the_models_feed_forward_kind_by_hand():
    # GPT-2-style switches: the routed experts stay SwiGLU without biases; the shared block is the model's
    # own feed-forward (GELU, with biases), as model/transformer.py builds it.
    cfg = ModelConfig(
        vocab_size=512, max_seq_len=64, n_layers=3, d_model=64, n_heads=4, ffn_hidden=160,
        tie_embeddings=False, ffn="gelu", norm="layernorm", bias=True,
        moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, expert_hidden=24),
    )  # fmt: skip
    attention = 4 * 64 * 64 + 4 * 64  # q, k, v, o and their biases
    norms = 2 * 2 * 64  # two LayerNorms (weight and bias)
    router, routed = 4 * 64, 4 * 3 * 64 * 24
    shared = 2 * 64 * 24 + 24 + 64  # GELU up and down with biases
    block = attention + norms + router + routed + shared
    assert count_params(cfg) == 3 * block + 2 * 512 * 64 + 2 * 64 == 181_896
    assert count_params(cfg) - count_active_params(cfg) == 3 * 2 * 3 * 64 * 24
