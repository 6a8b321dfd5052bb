"""Mixture-of-Experts Hugging Face conversion at its edges, against transformers itself: shapes the
families' tables leave implicit (several shared experts without a size, Mixtral's top-k), config keys a
folder omits, and what no family expresses."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import ExportError
from lmforge.model import hf
from lmforge.model.transformer import build_model
from lmforge.shapes import MoEConfig
from tests.conftest import require_transformers
from tests.model.test_moe_hf import VOCAB, probe, sharpen  # the same probe batch and sharpened weights

transformers = require_transformers()

PARITY = 1e-4
ATTENTION = dict(vocab_size=VOCAB, max_seq_len=64, d_model=60, n_heads=6, n_kv_heads=2, ffn_hidden=36)
QWEN_MOE = dict(
    model_type="qwen2_moe", vocab_size=VOCAB, hidden_size=60, intermediate_size=36, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
    moe_intermediate_size=20, shared_expert_intermediate_size=28,
)  # fmt: skip


@torch.no_grad()
def max_diff(ours, theirs, idx: torch.Tensor) -> float:
    return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())


def test_two_shared_experts_without_a_size_match_transformers():
    """n_shared_experts=2 of 20 hidden each: one shared block of 40 in Qwen2-MoE's terms."""
    moe = MoEConfig(n_experts=6, top_k=2, expert_hidden=20, n_shared_experts=2, shared_expert_gate=True,
                    router="softmax_topk")  # fmt: skip
    model = build_model(ModelConfig(**ATTENTION, n_layers=2, moe=moe), seed=1).eval()
    sharpen(model)
    theirs = hf.to_hf_model(model)
    assert theirs.config.shared_expert_intermediate_size == 2 * 20
    assert sum(p.numel() for p in theirs.parameters()) == model.num_params()
    assert max_diff(model, theirs, probe()) <= PARITY


def test_mixtral_with_three_experts_per_token_matches_transformers():
    moe = MoEConfig(n_experts=5, top_k=3, router="topk_softmax")
    model = build_model(ModelConfig(**ATTENTION, n_layers=2, tie_embeddings=False, moe=moe), seed=1).eval()
    sharpen(model)
    theirs = hf.to_hf_model(model)
    assert theirs.config.num_experts_per_tok == 3
    assert max_diff(model, theirs, probe()) <= PARITY


def test_mixtral_with_dense_first_layers_is_refused():
    moe = MoEConfig(n_experts=4, router="topk_softmax", first_dense_layers=1)
    with pytest.raises(ExportError, match="first_dense_layers=1 \\(Mixtral: every layer is MoE\\)"):
        hf.architecture_for(ModelConfig(**ATTENTION, n_layers=2, moe=moe))


def test_keys_a_qwen_moe_config_omits_take_transformers_defaults():
    config = {k: v for k, v in QWEN_MOE.items() if k != "shared_expert_intermediate_size"}
    config["model_type"] = "qwen3_moe"
    cfg = hf.model_config_from_hf(config)
    assert cfg.moe.norm_topk_prob == transformers.Qwen3MoeConfig().norm_topk_prob
    assert (
        hf.model_config_from_hf(QWEN_MOE).moe.norm_topk_prob == transformers.Qwen2MoeConfig().norm_topk_prob
    )


def test_dense_layers_lmforge_cannot_place_are_refused_on_import():
    assert hf.model_config_from_hf({**QWEN_MOE, "mlp_only_layers": [1, 0]}).moe.first_dense_layers == 2
    with pytest.raises(ExportError, match=r"mlp_only_layers=\[1\]"):
        hf.model_config_from_hf({**QWEN_MOE, "mlp_only_layers": [1]})  # layer 0 MoE, layer 1 dense
    with pytest.raises(ExportError, match="decoder_sparse_step=2"):
        hf.model_config_from_hf({**QWEN_MOE, "decoder_sparse_step": 2})


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_a_hub_layout_folder_imports_back_to_the_same_model(tmp_path, family):
    """Export writes one tensor per expert (the Hub's layout, which the export test loads in transformers);
    importing that folder restacks them into the same experts: the same logits and expert tensors."""
    from lmforge import convert
    from lmforge.checkpoint import load_model, save_checkpoint
    from lmforge.config import Config, TrainConfig

    moe = (
        MoEConfig(n_experts=5, top_k=2, router="topk_softmax")
        if family == "mixtral"
        else MoEConfig(n_experts=4, top_k=2, expert_hidden=24, router="softmax_topk", norm_topk_prob=True)
    )
    cfg = ModelConfig(**ATTENTION, n_layers=2, qk_norm=family == "qwen3-moe", moe=moe)
    model = build_model(cfg, seed=1).eval()
    sharpen(model)
    run = tmp_path / "run" / "checkpoints" / "step_00000001"
    save_checkpoint(
        run, model_state=model.state_dict(), config=Config(model=cfg, train=TrainConfig(seq_len=32))
    )
    convert.export_model(run, tmp_path / "hf", verify=False)
    back, _, _ = load_model(convert.import_model(tmp_path / "hf", tmp_path / "ck").checkpoint)
    ours, theirs = model.state_dict(), back.state_dict()
    for key in (
        "layers.1.mlp.experts.gate_up_proj",
        "layers.1.mlp.experts.down_proj",
        "layers.1.mlp.gate.weight",
    ):
        assert torch.equal(theirs[key], ours[key]), key
    with torch.no_grad():
        assert torch.equal(back.eval()(probe()), model(probe()))
