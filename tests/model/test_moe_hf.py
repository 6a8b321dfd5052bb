"""Mixture-of-Experts Hugging Face interop: Mixtral, Qwen2-MoE (a sigmoid-gated shared expert, weights not
renormalised) and Qwen3-MoE (qk_norm, renormalised weights) with logits parity both ways and the same experts
chosen for every token, on random weights of odd shapes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge import convert
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.errors import ExportError
from lmforge.model import hf
from lmforge.model.moe import MoEFeedForward, route
from lmforge.model.transformer import build_model
from lmforge.shapes import MoEConfig
from tests.conftest import require_transformers

transformers = require_transformers()

PARITY = 1e-4
VOCAB = 61
ATTENTION = dict(vocab_size=VOCAB, max_seq_len=64, d_model=60, n_heads=6, n_kv_heads=2, ffn_hidden=36)
CASES = {
    "mixtral": ModelConfig(
        **ATTENTION,
        n_layers=2,
        tie_embeddings=False,
        moe=MoEConfig(n_experts=5, top_k=2, router="topk_softmax"),
    ),
    "qwen2-moe": ModelConfig(
        **ATTENTION,
        n_layers=3,
        qkv_bias=True,
        tie_embeddings=False,
        moe=MoEConfig(
            n_experts=6,
            top_k=3,
            expert_hidden=20,
            n_shared_experts=1,
            shared_expert_hidden=28,
            shared_expert_gate=True,
            router="softmax_topk",
            norm_topk_prob=False,
            first_dense_layers=1,
        ),
    ),
    "qwen3-moe": ModelConfig(
        **ATTENTION,
        n_layers=2,
        qk_norm=True,
        tie_embeddings=True,
        moe=MoEConfig(n_experts=7, top_k=2, expert_hidden=18, router="softmax_topk", norm_topk_prob=True),
    ),
}
ARCHITECTURES = {"mixtral": hf.MIXTRAL, "qwen2-moe": hf.QWEN2_MOE, "qwen3-moe": hf.QWEN3_MOE}


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def sharpen(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases, and decisive routers (initialisation leaves them near uniform)."""
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "norm" in name or "bias" in name:
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
        if name.endswith("mlp.gate.weight"):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def our_choices(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """The experts each token goes to, per MoE layer, sorted: (N, K) each."""
    seen = []
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    hooks = [
        layer.gate.register_forward_hook(
            lambda module, args, out, layer=layer: seen.append(
                route(
                    out,
                    top_k=layer.moe.top_k,
                    router=layer.moe.router,
                    norm_topk_prob=layer.moe.norm_topk_prob,
                )[1]
            )
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return [c.sort(dim=-1).values for c in seen]


def their_choices(hf_model, idx: torch.Tensor) -> list[torch.Tensor]:
    """The experts transformers' routers pick (their third output), per MoE layer, sorted."""
    seen = []
    routers = [m for name, m in hf_model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "top_k")]
    hooks = [r.register_forward_hook(lambda module, args, out: seen.append(out[2])) for r in routers]
    with torch.no_grad():
        hf_model(input_ids=idx)
    for h in hooks:
        h.remove()
    return [c.sort(dim=-1).values for c in seen]


@torch.no_grad()
def max_diff(ours, theirs, idx: torch.Tensor) -> float:
    return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())


def assert_same_routing(ours, theirs, idx):
    a, b = our_choices(ours, idx), their_choices(theirs, idx)
    assert len(a) == len(b) > 0
    for mine, yours in zip(a, b, strict=True):
        assert torch.equal(mine, yours)


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_the_same_logits_and_experts(tmp_path, name):
    cfg = CASES[name]
    model = build_model(cfg, seed=1).eval()
    sharpen(model)
    run = tmp_path / "run" / "checkpoints" / "step_00000001"
    save_checkpoint(
        run, model_state=model.state_dict(), config=Config(model=cfg, train=TrainConfig(seq_len=32))
    )
    report = convert.export_model(run, tmp_path / "hf")
    assert report.architecture == ARCHITECTURES[name]
    assert report.max_abs_diff is not None and report.max_abs_diff <= PARITY
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    last = cfg.n_layers - 1
    gate = "w1" if name == "mixtral" else "gate_proj"
    moe = "block_sparse_moe" if name == "mixtral" else "mlp"
    assert (
        f"model.layers.{last}.{moe}.experts.{cfg.moe.n_experts - 1}.{gate}.weight" in saved
    )  # the Hub layout
    assert not any("gate_up_proj" in k or "expert_bias" in k for k in saved)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[name]]
    # transformers' default grouped-matmul experts refuse qwen3-moe's 18-wide experts (not 16-byte rows)
    plain = {"experts_implementation": "eager"} if name == "qwen3-moe" else {}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, **plain)
    theirs.eval()
    assert type(theirs).__name__ == ARCHITECTURES[name]
    assert max_diff(model, theirs, probe()) <= PARITY
    assert_same_routing(model, theirs, probe())


@pytest.mark.parametrize("name", list(CASES))
def test_to_hf_model_in_memory(name):
    model = build_model(CASES[name], seed=2).eval()
    sharpen(model)
    theirs = hf.to_hf_model(model)
    assert max_diff(model, theirs, probe()) <= PARITY
    assert_same_routing(model, theirs, probe())


def hf_reference(name: str):
    """A transformers model configured by hand (not by hf.py), with transformers' own initialisation."""
    common = dict(
        vocab_size=VOCAB, hidden_size=60, num_attention_heads=6, num_key_value_heads=2, head_dim=10,
        max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    if name == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=36, num_hidden_layers=2, num_local_experts=5, num_experts_per_tok=2,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)
    elif name == "qwen2-moe":
        config = transformers.Qwen2MoeConfig(
            **common, intermediate_size=36, num_hidden_layers=3, num_experts=6, num_experts_per_tok=3,
            moe_intermediate_size=20, shared_expert_intermediate_size=28, norm_topk_prob=False,
            mlp_only_layers=[0], tie_word_embeddings=False, qkv_bias=True,
        )  # fmt: skip
        model = transformers.Qwen2MoeForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(
            **common, intermediate_size=36, num_hidden_layers=2, num_experts=7, num_experts_per_tok=2,
            moe_intermediate_size=18, norm_topk_prob=True, tie_word_embeddings=True,
        )  # fmt: skip
        model = transformers.Qwen3MoeForCausalLM(config)
        model.set_experts_implementation("eager")  # 18-wide experts: not the 16-byte rows grouped_mm needs
    sharpen(model)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_import_gives_the_same_logits_and_experts_as_transformers(tmp_path, name):
    reference = hf_reference(name)
    reference.save_pretrained(tmp_path / "hf")
    out = convert.import_model(tmp_path / "hf", tmp_path / "ck").checkpoint
    model, config, _ = load_model(out)
    expected = CASES[name]
    for field in ("n_layers", "qk_norm", "qkv_bias", "tie_embeddings"):
        assert getattr(config.model, field) == getattr(expected, field), field
    moe = config.model.moe
    assert (moe.n_experts, moe.top_k, moe.n_shared_experts) == (
        expected.moe.n_experts,
        expected.moe.top_k,
        expected.moe.n_shared_experts,
    )
    assert moe.first_dense_layers == expected.moe.first_dense_layers
    assert max_diff(model.eval(), reference, probe()) <= PARITY
    assert_same_routing(model, reference, probe())


def test_refusals_name_what_no_family_expresses(tmp_path):
    cfg = CASES["qwen3-moe"]
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.layers[0].mlp.expert_bias[2] = 0.5
    with pytest.raises(ExportError, match="expert_bias"):
        hf.to_hf_state_dict(model)
    unnormalised = ModelConfig(**ATTENTION, n_layers=1, moe=MoEConfig(n_experts=4, router="softmax_topk"))
    with pytest.raises(ExportError, match="norm_topk_prob"):
        hf.architecture_for(unnormalised)
    with pytest.raises(ExportError, match="shared_expert_gate"):
        hf.architecture_for(
            ModelConfig(**ATTENTION, n_layers=1, moe=MoEConfig(n_experts=4, n_shared_experts=1))
        )
    from lmforge.model.gguf import gguf_architecture

    assert gguf_architecture(CASES["mixtral"]) == "llama"  # llama.cpp's llama with expert tensors
    with pytest.raises(ExportError, match="first_dense_layers=1"):  # llama.cpp: every qwen2moe layer is MoE
        gguf_architecture(CASES["qwen2-moe"])
