"""Hugging Face conversion at its edges, against transformers itself: what a config.json that omits a key
means (transformers' own defaults), what no family expresses, the tensors an export writes (as
``save_pretrained`` writes them) and the tensors an import accepts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import convert
from lmforge.checkpoint import load_model
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ExportError
from lmforge.model import hf
from lmforge.model.transformer import build_model
from tests.conftest import require_transformers

transformers = require_transformers()

PARITY = 1e-4
VOCAB = 61
HF_BASE = dict(
    vocab_size=VOCAB, hidden_size=60, intermediate_size=90, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def perturb(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases (initialised at 1 and 0, they would hide mix-ups)."""
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "norm" in name or "bias" in name or "ln_" in name:
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def max_diff(ours, theirs, idx: torch.Tensor) -> float:
    return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())


def test_keys_a_config_omits_take_transformers_defaults():
    llama = hf.model_config_from_hf({"model_type": "llama", **HF_BASE})
    assert llama.norm_eps == transformers.LlamaConfig().rms_norm_eps
    gpt2 = hf.model_config_from_hf(
        {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4}
    )
    reference = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    assert gpt2.tie_embeddings == reference.tie_word_embeddings
    assert (gpt2.norm_eps, gpt2.max_seq_len) == (reference.layer_norm_epsilon, reference.n_positions)
    assert gpt2.hidden_dim == 4 * 64  # GPT-2's n_inner=None


def test_yarn_without_betas_imports_as_transformers_runs_it(tmp_path):
    """Hub configs of YaRN models often give only factor and the original length (Qwen2.5's README does):
    transformers fills in beta_fast 32 and beta_slow 1; the import must build the same rotary frequencies."""
    # head_dim 32 and a 4096 original context: the betas move YaRN's ramp by whole dimensions here
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
    }
    shape = {**HF_BASE, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    config = transformers.Qwen2Config(
        **{**shape, "max_position_embeddings": 16384}, rope_parameters=rope, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(saved.get(key), dict):
            for beta in ("beta_fast", "beta_slow"):
                saved[key].pop(beta, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(saved))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    perturb(reference)
    reference.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(saved))
    model, _, _ = load_model(convert.import_model(tmp_path / "hf", tmp_path / "ck").checkpoint)
    assert model.cfg.rope_scaling == "yarn"
    assert max_diff(model.eval(), reference, probe()) <= PARITY


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_per_layer_sliding_windows_are_refused_on_import(model_type):
    config = {"model_type": model_type, **HF_BASE, "use_sliding_window": True, "sliding_window": 8}
    with pytest.raises(ExportError, match="use_sliding_window=true"):
        hf.model_config_from_hf(config)
    config["use_sliding_window"] = (
        False  # the window given but unused: full attention, as transformers runs it
    )
    assert hf.model_config_from_hf(config).sliding_window is None


def test_a_llama_with_every_bias_exports_as_llama_with_the_same_logits():
    cfg = ModelConfig(
        vocab_size=VOCAB, n_layers=2, d_model=60, n_heads=6, ffn_hidden=90, bias=True, qkv_bias=True
    )
    model = build_model(cfg, seed=1).eval()
    perturb(model)
    assert (
        hf.architecture_for(cfg) == hf.LLAMA
    )  # biases on every projection: Llama's attention_bias + mlp_bias
    theirs = hf.to_hf_model(model)
    assert max_diff(model, theirs, probe()) <= PARITY


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_writes_the_tensors_save_pretrained_writes(tmp_path, tied):
    cfg = ModelConfig(vocab_size=VOCAB, n_layers=2, d_model=60, n_heads=6, n_kv_heads=2, ffn_hidden=90,
                      tie_embeddings=tied)  # fmt: skip
    model = build_model(cfg, seed=1).eval()
    config = transformers.LlamaConfig(**HF_BASE, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    theirs = load_file(tmp_path / "hf" / "model.safetensors")
    ours = hf.to_hf_state_dict(model)
    assert set(ours) == set(theirs)  # tied: no lm_head.weight, as transformers leaves it out
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


def test_import_refuses_tensors_the_config_does_not_explain(tmp_path):
    config = transformers.LlamaConfig(**HF_BASE, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(3, 60)  # e.g. a family lmforge misreads
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not explain: model.layers.1.mlp.extra_proj.weight"):
        convert.import_model(tmp_path / "hf", tmp_path / "ck")
