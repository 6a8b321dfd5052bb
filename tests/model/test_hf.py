"""Hugging Face interop: logits parity with `transformers` in both directions, refusals and bad folders."""

import json
from pathlib import Path

import pytest
import torch

from lmforge import convert
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.errors import CheckpointError, ExportError
from lmforge.model import hf
from lmforge.model.transformer import build_model
from tests.conftest import require_transformers

transformers = require_transformers()

PARITY = 1e-4  # max |logits difference| required by the issue (fp32, random weights)
VOCAB = 61


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    return ModelConfig(**{**base, **overrides})


GPT2_SWITCHES = dict(position="learned", ffn="gelu", norm="layernorm", bias=True)
CASES = {
    "llama-mha-untied": tiny(tie_embeddings=False, norm_eps=1e-6),
    "llama-gqa-tied": tiny(n_kv_heads=2, tie_embeddings=True, rope_theta=500.0),
    "llama-mqa-bias-untied": tiny(n_kv_heads=1, bias=True, tie_embeddings=False),
    "llama-head-size": tiny(n_kv_heads=2, head_size=8),  # attention narrower than d_model (pruned heads)
    "gpt2-tied": tiny(**GPT2_SWITCHES, tie_embeddings=True),
    "gpt2-untied": tiny(**GPT2_SWITCHES, tie_embeddings=False),
}


def probe(seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Make norm weights and biases non-trivial (initialisation leaves them at 1 and 0, hiding mix-ups)."""
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if any(n in name for n in names):
            p.add_(0.2 * torch.randn(p.shape, generator=generator))


def lmforge_run(tmp_path: Path, cfg: ModelConfig, **files: str) -> tuple[torch.nn.Module, Path]:
    model = build_model(cfg, seed=1).eval()
    perturb(model, ("norm", "bias"))
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
        **files,
    )
    return model, run


@torch.no_grad()
def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, idx: torch.Tensor) -> float:
    return float((ours(idx) - theirs(input_ids=idx).logits).abs().max())


# -- export: lmforge -> transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, name):
    cfg = CASES[name]
    model, run = lmforge_run(tmp_path, cfg)
    report = convert.export_model(run, tmp_path / "hf")
    expected_arch = "GPT2LMHeadModel" if cfg.position == "learned" else "LlamaForCausalLM"
    assert report.architecture == expected_arch
    assert report.max_abs_diff is not None and report.max_abs_diff <= PARITY
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [expected_arch]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(loaded).__name__ == expected_arch
    assert max_diff(model, loaded, probe()) <= PARITY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]  # no temporary folder left behind


@pytest.mark.parametrize("name", ["llama-gqa-tied", "gpt2-untied"])
def test_to_hf_model_in_memory(name):
    model = build_model(CASES[name], seed=2).eval()
    perturb(model, ("norm", "bias"))
    theirs = hf.to_hf_model(model)
    assert max_diff(model, theirs, probe()) <= PARITY


# -- import: transformers -> lmforge ------------------------------------------------------------------------


def hf_reference(name: str):
    """A transformers model with transformers' own initialisation, configured by hand (not by hf.py)."""
    cfg = CASES[name]
    if cfg.position == "learned":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=96,
            tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=64,
            rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            attention_bias=cfg.bias, mlp_bias=cfg.bias, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=0, eos_token_id=1,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    perturb(model, ("norm", "ln_", "bias"))
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_import_gives_the_same_logits_as_transformers(tmp_path, name):
    reference = hf_reference(name)
    reference.save_pretrained(tmp_path / "hf")
    out = convert.import_model(tmp_path / "hf", tmp_path / "ck").checkpoint
    model, config, _ = load_model(out)
    assert config.model.kv_heads == CASES[name].kv_heads
    assert config.model.tie_embeddings == CASES[name].tie_embeddings
    assert config.model.head_dim == CASES[name].head_dim
    assert max_diff(model.eval(), reference, probe()) <= PARITY


def test_import_sharded_safetensors_and_pytorch_bin(tmp_path):
    reference = hf_reference("llama-gqa-tied")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _, _ = load_model(convert.import_model(tmp_path / "sharded", tmp_path / "ck1").checkpoint)
    assert max_diff(model, reference, probe()) <= PARITY

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(reference.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _, _ = load_model(convert.import_model(tmp_path / "bin", tmp_path / "ck2").checkpoint)
    assert max_diff(model, reference, probe()) <= PARITY


def test_import_original_gpt2_key_layout(tmp_path):
    from safetensors.torch import save_file

    reference = hf_reference("gpt2-tied")
    reference.save_pretrained(tmp_path / "hf")
    # The original GPT-2 uploads name tensors without the "transformer." prefix and carry mask buffers.
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in reference.state_dict().items()}
    state.pop("lm_head.weight", None)
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    model, _, _ = load_model(convert.import_model(tmp_path / "hf", tmp_path / "ck").checkpoint)
    assert max_diff(model, reference, probe()) <= PARITY


# -- the CLI, end to end ------------------------------------------------------------------------------------


def test_cli_export_then_import_round_trip(tmp_path, capsys):
    cfg = CASES["llama-gqa-tied"]
    model, run = lmforge_run(tmp_path, cfg)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "max |logits difference|" in out
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back, config, _ = load_model(tmp_path / "back")
    assert config.model == cfg
    with torch.no_grad():
        assert (back(probe()) - model(probe())).abs().max() <= PARITY


def test_export_writes_tokenizer_and_model_card(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    cfg = tiny(vocab_size=tokenizer.get_vocab_size())
    _, run = lmforge_run(tmp_path, cfg, tokenizer_file=tmp_path / "tokenizer.json")
    (run / "MODEL_CARD.md").write_text("# a tiny model\n")
    convert.export_model(run, tmp_path / "hf", verify=False)

    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "to be, or not"
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
    assert loaded.eos_token == "<|endoftext|>" and loaded.pad_token == "<pad>"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert config["pad_token_id"] == tokenizer.token_to_id("<pad>")
    assert (tmp_path / "hf" / "README.md").read_text() == "# a tiny model\n"
    back = convert.import_model(tmp_path / "hf", tmp_path / "back").checkpoint
    assert (back / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()


# -- refusals and bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "switches, message",
    [
        (dict(position="sinusoidal"), "model.position=sinusoidal"),
        (dict(norm="layernorm"), "model.norm=layernorm"),
        (dict(ffn="gelu"), "model.ffn=gelu"),
        (dict(position="learned", ffn="gelu", bias=True), "model.norm=rmsnorm"),
        (dict(GPT2_SWITCHES, n_kv_heads=2), "model.n_kv_heads=2"),
        (dict(GPT2_SWITCHES, bias=False), "model.bias=False"),
        (dict(GPT2_SWITCHES, head_size=8), "model.head_size=8"),
    ],
)
def test_export_refuses_what_neither_architecture_expresses(tmp_path, switches, message):
    _, run = lmforge_run(tmp_path, tiny(**switches))
    with pytest.raises(ExportError, match=message):
        convert.export_model(run, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_export_check_fails_loudly_on_different_logits(tmp_path):
    model, run = lmforge_run(tmp_path, CASES["llama-mha-untied"])
    convert.export_model(run, tmp_path / "hf", verify=False)
    other = build_model(CASES["llama-mha-untied"], seed=5).eval()
    with pytest.raises(ExportError, match="exceeds"):
        hf.verify_with_transformers(other, tmp_path / "hf")
    diff, note = hf.verify_with_transformers(model, tmp_path / "hf")
    assert diff <= PARITY and "max |logits difference|" in note


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


BAD_FOLDERS = {
    "missing": (lambda f: __import__("shutil").rmtree(f), "no such Hugging Face model folder"),
    "no config": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "malformed config": (lambda f: (f / "config.json").write_text("{not json"), "malformed JSON"),
    "missing key": (lambda f: _edit_config(f, hidden_size=None), "missing hidden_size"),
    "wrong type": (lambda f: _edit_config(f, num_hidden_layers="two"), "must be an integer"),
    "unsupported": (lambda f: _edit_config(f, model_type="gemma"), "unsupported architecture 'gemma'"),
    "rope scaling": (
        lambda f: _edit_config(f, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 8.0}),
        "rope type 'dynamic'",
    ),
    "shape mismatch": (
        lambda f: _edit_config(f, intermediate_size=128),
        r"mlp.gate_proj.weight has shape \(96, 64\)",
    ),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
        "unreadable weights",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_import_rejects_bad_folders_with_one_clear_line(tmp_path, capsys, case):
    hf_reference("llama-gqa-tied").save_pretrained(tmp_path / "hf")
    damage, message = BAD_FOLDERS[case]
    damage(tmp_path / "hf")
    with pytest.raises((CheckpointError, ExportError), match=message):
        convert.import_model(tmp_path / "hf", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    capsys.readouterr()  # drop transformers' progress bars from saving the reference
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge import: error:") and "Traceback" not in err


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_export_of_lmforge_tokenizers_loads_in_auto_tokenizer(tmp_path, kind):
    from lmforge.data import tokenizer as data_tokenizer

    texts = ["To be, or not to be: that is the question. Ünïcode 中文"] * 30
    tokenizer = data_tokenizer.train_tokenizer(kind, texts, 300)
    tokenizer.save(tmp_path / "tokenizer.json")
    _, run = lmforge_run(
        tmp_path, tiny(vocab_size=tokenizer.vocab_size), tokenizer_file=tmp_path / "tokenizer.json"
    )
    convert.export_model(run, tmp_path / "hf", verify=False)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "not to be, 中文 and unseen €"
    assert loaded(text)["input_ids"] == tokenizer.encode(text)
    assert loaded.decode(tokenizer.encode(text)) == text
    assert loaded.convert_tokens_to_ids(loaded.eos_token) == tokenizer.eot_id
    assert loaded.convert_tokens_to_ids(loaded.pad_token) == tokenizer.pad_id
