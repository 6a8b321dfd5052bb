"""GGUF export: the file read back with gguf's own reader equals the model (tensors after llama.cpp's rotary
permutation, hyper-parameters, tokenizer), refusals, and, where ``llama-cpp-python`` is installed, llama.cpp
tokenizes and generates exactly as lmforge does.

The llama.cpp tests skip with the reason where the binding is absent, also under CI: it compiles C++ on
install, and the issue allows CI to skip them.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import convert
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.config import Config, ModelConfig, TrainConfig
from lmforge.data.tokenizer import train_bpe, train_char
from lmforge.errors import ExportError
from lmforge.model import gguf as lmgguf
from lmforge.model.transformer import build_model
from lmforge.shapes import MoEConfig
from tests.conftest import require_module

gguf = require_module("gguf", "gguf")

SAMPLE = [
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see!\n",
    "机器学习是人工智能的一个分支。我们喜欢中文。\n",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "Emoji: 🚀🔥 héllo wörld ✨ 👍🏽\n",
]
MIXED = "Hello wörld 你好世界 🚀 def f(x):\n    return x**2  # it's 3.14\n\n  spaces   and\ttabs"


def bpe_tokenizer(tmp_path: Path, vocab_size: int = 320) -> Path:
    tokenizer = train_bpe(SAMPLE * 20, vocab_size)
    return tokenizer.save(tmp_path / "tok" / "tokenizer.json")


def tiny(vocab_size: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab_size, max_seq_len=64, n_layers=2, d_model=64, n_heads=4, ffn_hidden=96)
    return ModelConfig(**{**base, **overrides})


GPT2_SWITCHES = dict(position="learned", ffn="gelu", norm="layernorm", bias=True)


def make_run(tmp_path: Path, cfg: ModelConfig, tokenizer: Path | None, **files: str):
    model = build_model(cfg, seed=1).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norms and biases (initialised at 1 and 0, they would hide mix-ups)
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
        tokenizer_file=tokenizer,
        extra_files=files or None,
    )
    return model, run


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in numpy (C) order, dequantised where quantised."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.array(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))
    return out


def field(reader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


# -- the rotary permutation against a closed form ----------------------------------------------------------


def rope(x: torch.Tensor, interleaved: bool, theta: float = 10000.0) -> torch.Tensor:
    """RoPE on (T, hd): Hugging Face's half-split pairs (i, i + hd/2) or llama.cpp's interleaved pairs."""
    T, hd = x.shape
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd/2)
    cos, sin = angle.cos(), angle.sin()
    a, b = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, : hd // 2], x[:, hd // 2 :])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], dim=-1).reshape(T, hd) if interleaved else torch.cat([ra, rb], dim=-1)


def test_permute_rotary_turns_half_split_rope_into_interleaved_rope():
    generator = torch.Generator().manual_seed(0)
    heads, hd, C = 3, 8, 12
    wq = torch.randn(heads * hd, C, generator=generator, dtype=torch.float64)
    wk = torch.randn(heads * hd, C, generator=generator, dtype=torch.float64)
    x = torch.randn(5, C, generator=generator, dtype=torch.float64)
    pq, pk = lmgguf.permute_rotary(wq, heads), lmgguf.permute_rotary(wk, heads)
    for h in range(heads):
        rows = slice(h * hd, (h + 1) * hd)
        ours = rope(x @ wq[rows].T, False) @ rope(x @ wk[rows].T, False).T  # (T, T) attention scores
        theirs = rope(x @ pq[rows].T, True) @ rope(x @ pk[rows].T, True).T
        torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(lmgguf.unpermute_rotary(pq, heads), wq)


# -- the file read back with gguf's reader -----------------------------------------------------------------

CASES = {
    "llama-mha-untied": dict(tie_embeddings=False, norm_eps=1e-6),
    "llama-gqa-tied": dict(n_kv_heads=2, rope_theta=500.0),
    "llama-head-size": dict(n_kv_heads=2, head_size=8),
    "llama-mqa-bias": dict(n_kv_heads=1, bias=True, tie_embeddings=False),
    "gpt2-untied": dict(**GPT2_SWITCHES, tie_embeddings=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tensors_read_back_equal_ours(tmp_path, name):
    cfg = tiny(300, **CASES[name])
    model, run = make_run(tmp_path, cfg, None)
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", verify=False)
    tensors = read_tensors(out)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    llama = cfg.position == "rope"
    for i in range(cfg.n_layers):
        if llama:
            for proj, heads, short in (("q", cfg.n_heads, "q"), ("k", cfg.kv_heads, "k")):
                back = lmgguf.unpermute_rotary(
                    torch.from_numpy(tensors[f"blk.{i}.attn_{short}.weight"]), heads
                )
                torch.testing.assert_close(
                    back, ours[f"layers.{i}.self_attn.{proj}_proj.weight"], rtol=0, atol=0
                )
                if cfg.bias:  # a bias is rotated with its weight's rows
                    back = lmgguf.unpermute_rotary(
                        torch.from_numpy(tensors[f"blk.{i}.attn_{short}.bias"]), heads
                    )
                    torch.testing.assert_close(
                        back, ours[f"layers.{i}.self_attn.{proj}_proj.bias"], rtol=0, atol=0
                    )
            if cfg.bias:
                for short, module in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                                      ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                                      ("ffn_down", "mlp.down_proj")):  # fmt: skip
                    assert np.array_equal(tensors[f"blk.{i}.{short}.bias"], ours[f"layers.{i}.{module}.bias"])
            assert np.array_equal(
                tensors[f"blk.{i}.attn_v.weight"], ours[f"layers.{i}.self_attn.v_proj.weight"]
            )
            assert np.array_equal(
                tensors[f"blk.{i}.ffn_gate.weight"], ours[f"layers.{i}.mlp.gate_proj.weight"]
            )
        else:
            qkv = torch.cat([ours[f"layers.{i}.self_attn.{m}_proj.weight"] for m in "qkv"])
            assert np.array_equal(tensors[f"blk.{i}.attn_qkv.weight"], qkv.numpy())
            assert np.array_equal(
                tensors[f"blk.{i}.attn_norm.bias"], ours[f"layers.{i}.input_layernorm.bias"]
            )
        assert np.array_equal(
            tensors[f"blk.{i}.attn_output.weight"], ours[f"layers.{i}.self_attn.o_proj.weight"]
        )
        assert np.array_equal(tensors[f"blk.{i}.ffn_down.weight"], ours[f"layers.{i}.mlp.down_proj.weight"])
        assert np.array_equal(tensors[f"blk.{i}.ffn_up.weight"], ours[f"layers.{i}.mlp.up_proj.weight"])
        assert np.array_equal(
            tensors[f"blk.{i}.attn_norm.weight"], ours[f"layers.{i}.input_layernorm.weight"]
        )
        assert np.array_equal(
            tensors[f"blk.{i}.ffn_norm.weight"], ours[f"layers.{i}.post_attention_layernorm.weight"]
        )
    assert np.array_equal(tensors["token_embd.weight"], ours["embed_tokens.weight"])
    assert np.array_equal(tensors["output_norm.weight"], ours["norm.weight"])
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)  # tied: llama.cpp reuses token_embd
    if not cfg.tie_embeddings:
        assert np.array_equal(tensors["output.weight"], ours["lm_head.weight"])
    n_params = sum(v.numel() for k, v in ours.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    assert sum(t.size for t in tensors.values()) == n_params  # nothing lost, nothing invented


@pytest.mark.parametrize("dtype, atol", [("f16", 1e-3), ("q8_0", 2e-3)])
def test_f16_and_q8_0_round_to_ours(tmp_path, dtype, atol):
    cfg = tiny(300, n_kv_heads=2)
    model, run = make_run(tmp_path, cfg, None)
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", dtype=dtype, verify=False)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay f32
    assert types["blk.0.ffn_down.weight"] == dtype.upper()
    assert field(reader, "general.file_type") == {"f16": 1, "q8_0": 7}[dtype]
    tensors = read_tensors(out)
    np.testing.assert_allclose(
        tensors["blk.1.ffn_up.weight"], model.state_dict()["layers.1.mlp.up_proj.weight"].numpy(), atol=atol
    )


def test_metadata_and_tokenizer(tmp_path):
    tokenizer = bpe_tokenizer(tmp_path)
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
    config = json.dumps({"chat_template": template})
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    cfg = tiny(len(vocab) + 2 + 6, n_kv_heads=2, rope_theta=500.0, norm_eps=1e-6, max_seq_len=48)
    _, run = make_run(tmp_path, cfg, tokenizer, **{"tokenizer_config.json": config})
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", verify=False)
    reader = gguf.GGUFReader(out)
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 48,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": template,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(500.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tok = json.loads(tokenizer.read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size  # padded to the model's embedding rows
    assert all(tokens[i] == t for t, i in {**tok["model"]["vocab"], **ids}.items())
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field(reader, "tokenizer.ggml.merges") == merges
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[ids["<|endoftext|>"]] == lmgguf.CONTROL and types[ids["<|pad|>"]] == lmgguf.CONTROL
    assert types[tok["model"]["vocab"]["a"]] == lmgguf.NORMAL
    assert field(reader, "tokenizer.ggml.eos_token_id") == ids["<|endoftext|>"]
    assert field(reader, "tokenizer.ggml.padding_token_id") == ids["<|pad|>"]


# -- refusals and the command ------------------------------------------------------------------------------


def test_refusals_name_the_switch(tmp_path):
    _, run = make_run(tmp_path / "a", tiny(300, position="sinusoidal"), None)
    with pytest.raises(ExportError, match="position=sinusoidal"):
        convert.export_model(run, tmp_path / "a.gguf", format="gguf", verify=False)
    _, run = make_run(tmp_path / "b", tiny(300, ffn="gelu"), None)
    with pytest.raises(ExportError, match="model.ffn=gelu"):
        convert.export_model(run, tmp_path / "b.gguf", format="gguf", verify=False)
    char = train_char(SAMPLE, 300).save(tmp_path / "char" / "tokenizer.json")
    _, run = make_run(tmp_path / "c", tiny(300), char)
    with pytest.raises(ExportError, match="data.tokenizer=bpe"):
        convert.export_model(run, tmp_path / "c.gguf", format="gguf", verify=False)
    with pytest.raises(ExportError, match="q4"):
        convert.export_model(run, tmp_path / "d.gguf", format="gguf", dtype="q4")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


def test_a_failed_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    _, run = make_run(tmp_path / "run", tiny(300), None)
    (tmp_path / "kept").mkdir()

    def fail(path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lmgguf, "write_gguf", fail)
    with pytest.raises(OSError, match="No space left"):
        convert.export_model(
            run, tmp_path / "kept" / "new" / "deeper" / "m.gguf", format="gguf", verify=False
        )
    assert list((tmp_path / "kept").iterdir()) == []  # the folder that was there stays, the new ones went


def test_cli_export_gguf(tmp_path, capsys):
    tokenizer = bpe_tokenizer(tmp_path)
    model, run = make_run(tmp_path, tiny(330), tokenizer)
    out = tmp_path / "out" / "model.gguf"
    args = ["export", str(run), str(out), "--format", "gguf", "--dtype", "q8_0"]
    assert main([*args, "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert "gguf llama q8_0" in printed and "not verified (--no-verify)" in printed
    assert gguf.GGUFReader(out).get_field("general.architecture").contents() == "llama"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    tensors = read_tensors(out)  # the file holds the run's weights, q8_0-rounded
    ours = model.state_dict()
    np.testing.assert_allclose(tensors["token_embd.weight"], ours["embed_tokens.weight"].numpy(), atol=2e-3)
    np.testing.assert_allclose(
        tensors["blk.1.ffn_down.weight"], ours["layers.1.mlp.down_proj.weight"].numpy(), atol=2e-3
    )


# -- llama.cpp itself (llama-cpp-python) -------------------------------------------------------------------


def require_llama_cpp():
    """The binding (skips in a user's clone without it, fails under CI, whose set-up builds it)."""
    return require_module("llama_cpp", "gguf", hint=" (it compiles llama.cpp: a few minutes)")


def trained_model(tmp_path: Path, **overrides):
    """A tiny Llama trained for a few seconds on SAMPLE, so its greedy choices are confident (few near-ties
    for f16 rounding to flip), with its byte-level BPE tokenizer; (model, run folder, tokenizer)."""
    from lmforge.data.tokenizer import load_tokenizer

    tokenizer_path = bpe_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tokenizer_path)
    cfg = tiny(tokenizer.vocab_size, **overrides)
    model = build_model(cfg, seed=0)
    ids = torch.tensor(tokenizer.encode("".join(SAMPLE) * 4))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 33] for s in starts.tolist()])  # (B, 33)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    run = tmp_path / "run"
    save_checkpoint(
        run / "checkpoints" / "step_00000060",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
        tokenizer_file=tokenizer_path,
    )
    return model, run, tokenizer


def test_llama_cpp_tokenizes_like_lmforge(tmp_path):
    llama_cpp = require_llama_cpp()
    _, run, tokenizer = trained_model(tmp_path)
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", verify=False)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in [MIXED, *SAMPLE, "<|endoftext|> is text here", "  leading spaces\n\n\nnewlines"]:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert theirs == tokenizer.encode(text), text
        assert llm.detokenize(theirs).decode("utf-8") == text
    llm.close()


@pytest.mark.parametrize("shape", [{}, {"n_kv_heads": 2}], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_equals_lmforge_generate(tmp_path, shape, dtype):
    require_llama_cpp()
    from lmforge.infer.generate import SamplingConfig, generate_ids

    model, run, tokenizer = trained_model(tmp_path, **shape)
    out = tmp_path / "model.gguf"
    report = convert.export_model(run, out, format="gguf", dtype=dtype)  # verifies itself with llama.cpp
    assert "llama.cpp" in report.verify_note and report.max_abs_diff is not None
    if dtype == "f32":
        assert report.max_abs_diff <= lmgguf.VERIFY_TOLERANCE
    prompt = tokenizer.encode("def add(a, b):\n")
    new_tokens = 24
    ours = generate_ids(
        model,
        [prompt],
        SamplingConfig(max_new_tokens=new_tokens, temperature=0.0),
        device=torch.device("cpu"),
    ).tokens[0]
    llm = lmgguf.open_llama_cpp(out, len(prompt) + new_tokens)
    _, theirs = lmgguf.llama_cpp_greedy(llm, prompt, new_tokens)
    llm.close()
    assert theirs == ours


LLAMA_CPP_CASES = {
    **CASES,
    "gpt2-tied": dict(**GPT2_SWITCHES, tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(LLAMA_CPP_CASES))
def test_every_exportable_shape_runs_in_llama_cpp(tmp_path, name):
    """The export's own check (f32: same greedy tokens, logits within 1e-3) on random weights, every shape."""
    require_llama_cpp()
    cfg = tiny(300, **LLAMA_CPP_CASES[name])
    _, run = make_run(tmp_path, cfg, None)
    report = convert.export_model(run, tmp_path / "model.gguf", format="gguf")
    assert report.architecture == f"gguf {'llama' if cfg.position == 'rope' else 'gpt2'} f32"
    assert report.max_abs_diff is not None and report.max_abs_diff <= lmgguf.VERIFY_TOLERANCE


def test_q8_0_only_where_rows_split_into_whole_blocks(tmp_path):
    """llama.cpp's rule: q8_0 quantises each row in blocks of 32 values, so a matrix is q8_0 only where its
    row length (the nn.Linear input size) is a multiple of 32; the others fall back to f16."""
    cfg = tiny(300, d_model=48, n_heads=4, ffn_hidden=64)  # rows of 48 values, except ffn_down's 64
    model, run = make_run(tmp_path, cfg, None)
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", dtype="q8_0", verify=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    ours = model.state_dict()
    for i in range(cfg.n_layers):
        for name, key in (
            ("attn_v", "self_attn.v_proj"),
            ("ffn_gate", "mlp.gate_proj"),
            ("ffn_down", "mlp.down_proj"),
        ):
            rows = ours[f"layers.{i}.{key}.weight"].shape[1]
            assert types[f"blk.{i}.{name}.weight"] == ("Q8_0" if rows % 32 == 0 else "F16"), (i, name)
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["token_embd.weight"] == "F16"
    tensors = read_tensors(out)
    np.testing.assert_allclose(
        tensors["blk.1.ffn_down.weight"], ours["layers.1.mlp.down_proj.weight"].numpy(), atol=2e-3
    )
    np.testing.assert_allclose(
        tensors["blk.1.ffn_gate.weight"], ours["layers.1.mlp.gate_proj.weight"].numpy(), atol=1e-3
    )


def test_metadata_of_narrow_heads_and_of_gpt2(tmp_path):
    # 4 heads of 8 = 32 < d_model 64 (pruned heads): llama.cpp needs the head size written out
    _, run = make_run(tmp_path / "a", tiny(300, n_kv_heads=2, head_size=8), None)
    convert.export_model(run, tmp_path / "a.gguf", format="gguf", verify=False)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert field(reader, "llama.rope.dimension_count") == 8
    assert field(reader, "llama.attention.key_length") == 8
    assert field(reader, "llama.attention.value_length") == 8
    assert field(reader, "llama.embedding_length") == 64
    # GPT-2: a LayerNorm epsilon under its own key, no RMS epsilon, no rope
    _, run = make_run(tmp_path / "b", tiny(300, **GPT2_SWITCHES, norm_eps=1e-4, max_seq_len=40), None)
    convert.export_model(run, tmp_path / "b.gguf", format="gguf", verify=False)
    reader = gguf.GGUFReader(tmp_path / "b.gguf")
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-4)
    assert reader.get_field("gpt2.attention.layer_norm_rms_epsilon") is None
    assert reader.get_field("gpt2.rope.dimension_count") is None
    assert (field(reader, "gpt2.context_length"), field(reader, "gpt2.attention.head_count")) == (40, 4)


def byte_level_json(tmp_path: Path) -> dict:
    return json.loads(bpe_tokenizer(tmp_path).read_text())


def test_vocab_fills_the_embedding_exactly_or_is_refused(tmp_path):
    tok = byte_level_json(tmp_path)
    size = len({*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])})  # ids 0..size-1
    ids = {"eos": 0, "pad": None}
    exact = lmgguf.gguf_vocab(tok, ids, size, "tok")  # a tokenizer exactly as large as the embedding
    assert len(exact.tokens) == size and lmgguf.UNUSED not in exact.token_types
    with pytest.raises(ExportError, match=f"ids up to {size - 1}, but model.vocab_size={size - 1}"):
        lmgguf.gguf_vocab(tok, ids, size - 1, "tok")
    padded = lmgguf.gguf_vocab(tok, ids, size + 3, "tok")
    assert padded.tokens[:size] == exact.tokens
    assert padded.token_types[size:] == [lmgguf.UNUSED] * 3  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED = 5
    assert lmgguf.UNUSED == 5 and lmgguf.USER_DEFINED == 4


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t["pre_tokenizer"].update(add_prefix_space=True),
        lambda t: t["model"].update(byte_fallback=True),
        lambda t: t.update(normalizer={"type": "NFC"}),
        lambda t: t["pre_tokenizer"].update(use_regex=False),
    ],
    ids=["add_prefix_space", "byte_fallback", "normalizer", "no_regex"],
)
def test_byte_level_variants_llama_cpp_splits_differently_are_refused(tmp_path, edit):
    tok = byte_level_json(tmp_path)
    lmgguf.gguf_vocab(tok, {}, 400, "tok")  # the plain byte-level BPE passes
    edit(tok)
    with pytest.raises(ExportError, match="data.tokenizer=bpe"):
        lmgguf.gguf_vocab(tok, {}, 400, "tok")


# -- every family llama.cpp runs: Qwen2, Qwen3, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE, muP -----------------

FAMILIES = {  # name: (lmforge switches, llama.cpp's architecture)
    "qwen2": (dict(qkv_bias=True, n_kv_heads=2, tie_embeddings=True), "qwen2"),
    "qwen3": (dict(qk_norm=True, n_kv_heads=2, head_size=24, tie_embeddings=False), "qwen3"),
    "mistral": (dict(sliding_window=24, n_kv_heads=2, tie_embeddings=False), "llama"),
    "mixtral": (
        dict(n_kv_heads=2, tie_embeddings=False, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=40)),
        "llama",
    ),
    "qwen2-moe": (
        dict(
            n_kv_heads=2,
            qkv_bias=True,
            tie_embeddings=True,  # llama.cpp's qwen2moe requires output.weight: written although tied
            moe=MoEConfig(
                n_experts=4,
                top_k=2,
                expert_hidden=40,
                n_shared_experts=1,
                shared_expert_hidden=56,
                shared_expert_gate=True,
                router="softmax_topk",
            ),
        ),
        "qwen2moe",
    ),
    "qwen3-moe": (
        dict(
            n_kv_heads=2,
            qk_norm=True,
            tie_embeddings=False,
            moe=MoEConfig(n_experts=5, top_k=3, expert_hidden=40, router="softmax_topk", norm_topk_prob=True),
        ),
        "qwen3moe",
    ),
    # muP at width multiplier 2, tied: the export folds the multipliers in (the head becomes its own tensor)
    "mup": (dict(n_kv_heads=2, mup=True, mup_base_width=32, tie_embeddings=True), "llama"),
}


def family_run(tmp_path: Path, cfg: ModelConfig):
    """make_run's model with the final norm scaled up: logits of std ~5 instead of ~0.2, so that a layout
    slip moves them far beyond the tolerance and greedy choices are no near-ties."""
    model, run = make_run(tmp_path, cfg, None)
    with torch.no_grad():
        model.norm.weight.mul_(30.0)
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
    )
    return model, run


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_tensors_and_metadata_read_back(tmp_path, name):
    switches, arch = FAMILIES[name]
    cfg = tiny(300, **switches)
    model, run = make_run(tmp_path, cfg, None)
    out = tmp_path / "model.gguf"
    convert.export_model(run, out, format="gguf", verify=False)
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == arch
    tensors = read_tensors(out)
    if cfg.mup:  # the file holds the folded weights (muP's multipliers in them, untied), as the HF export
        from lmforge.model.mup import fold_mup

        model = fold_mup(model)
        cfg = model.cfg
        assert not cfg.tie_embeddings
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    neox = arch != "llama"  # llama.cpp's Qwen architectures rotate halves, as lmforge: no permutation
    moe = cfg.moe
    for i in range(cfg.n_layers):
        for p in ("q", "k"):
            weight = ours[f"layers.{i}.self_attn.{p}_proj.weight"]
            heads = cfg.n_heads if p == "q" else cfg.kv_heads
            expected = weight if neox else lmgguf.permute_rotary(weight, heads)
            assert np.array_equal(tensors[f"blk.{i}.attn_{p}.weight"], expected.numpy()), (i, p)
            if cfg.qkv_bias:
                assert np.array_equal(
                    tensors[f"blk.{i}.attn_{p}.bias"], ours[f"layers.{i}.self_attn.{p}_proj.bias"]
                )
            if cfg.qk_norm:
                assert np.array_equal(
                    tensors[f"blk.{i}.attn_{p}_norm.weight"], ours[f"layers.{i}.self_attn.{p}_norm.weight"]
                )
        if moe.enabled:
            gate_up, down = (
                ours[f"layers.{i}.mlp.experts.gate_up_proj"],
                ours[f"layers.{i}.mlp.experts.down_proj"],
            )
            hidden = moe.expert_hidden
            assert tensors[f"blk.{i}.ffn_gate_exps.weight"].shape == (moe.n_experts, hidden, cfg.d_model)
            for e in range(moe.n_experts):  # expert e's gate rows, then its up rows
                assert np.array_equal(tensors[f"blk.{i}.ffn_gate_exps.weight"][e], gate_up[e, :hidden])
                assert np.array_equal(tensors[f"blk.{i}.ffn_up_exps.weight"][e], gate_up[e, hidden:])
            assert np.array_equal(tensors[f"blk.{i}.ffn_down_exps.weight"], down.numpy())
            assert np.array_equal(
                tensors[f"blk.{i}.ffn_gate_inp.weight"], ours[f"layers.{i}.mlp.gate.weight"]
            )
            if moe.n_shared_experts:
                for m in ("gate", "up", "down"):
                    assert np.array_equal(
                        tensors[f"blk.{i}.ffn_{m}_shexp.weight"],
                        ours[f"layers.{i}.mlp.shared_expert.{m}_proj.weight"],
                    )
                shared_gate = ours[f"layers.{i}.mlp.shared_expert_gate.weight"]  # (1, C) -> (C,)
                assert np.array_equal(tensors[f"blk.{i}.ffn_gate_inp_shexp.weight"], shared_gate[0].numpy())
        else:
            assert np.array_equal(
                tensors[f"blk.{i}.ffn_gate.weight"], ours[f"layers.{i}.mlp.gate_proj.weight"]
            )
    assert np.array_equal(tensors["token_embd.weight"], ours["embed_tokens.weight"])
    head_written = not cfg.tie_embeddings or arch == "qwen2moe"
    assert ("output.weight" in tensors) == head_written
    if head_written:
        assert np.array_equal(tensors["output.weight"], ours["lm_head.weight"])
    n_params = sum(v.numel() for k, v in ours.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    n_params -= sum(v.numel() for k, v in ours.items() if k.endswith("expert_bias"))  # a zero buffer
    n_params += cfg.vocab_size * cfg.d_model if cfg.tie_embeddings and head_written else 0
    assert sum(t.size for t in tensors.values()) == n_params  # nothing lost, nothing invented
    expected = {
        f"{arch}.context_length": cfg.sliding_window or cfg.max_seq_len,  # Mistral: only the exact context
        f"{arch}.feed_forward_length": moe.expert_hidden
        if arch == "llama" and moe.enabled
        else cfg.hidden_dim,
        f"{arch}.attention.head_count_kv": cfg.kv_heads,
        f"{arch}.rope.dimension_count": cfg.head_dim,
    }
    if moe.enabled:
        expected |= {f"{arch}.expert_count": moe.n_experts, f"{arch}.expert_used_count": moe.top_k}
    if arch in ("qwen2moe", "qwen3moe"):
        expected[f"{arch}.expert_feed_forward_length"] = moe.expert_hidden
    if arch == "qwen2moe":
        expected[f"{arch}.expert_shared_feed_forward_length"] = moe.shared_expert_hidden
    for key, value in expected.items():
        assert field(reader, key) == value, key


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_runs_in_llama_cpp_as_in_lmforge(tmp_path, name):
    """llama.cpp's logits over a prompt and its greedy continuation equal lmforge's (its KV-cached
    ``generate``), f32; the export's own check passes too."""
    require_llama_cpp()
    from lmforge.infer.generate import SamplingConfig, generate_ids

    switches, arch = FAMILIES[name]
    cfg = tiny(300, **switches)
    model, run = family_run(tmp_path, cfg)
    out = tmp_path / "model.gguf"
    report = convert.export_model(run, out, format="gguf")  # verifies itself with llama.cpp
    assert report.architecture == f"gguf {arch} f32"
    assert report.max_abs_diff is not None and report.max_abs_diff <= lmgguf.VERIFY_TOLERANCE
    prompt = torch.randint(0, cfg.vocab_size, (8,), generator=torch.Generator().manual_seed(5)).tolist()
    new_tokens = 16  # 24 positions: inside Mistral's window of 24
    llm = lmgguf.open_llama_cpp(out, len(prompt) + new_tokens)
    theirs_logits, theirs = lmgguf.llama_cpp_greedy(llm, prompt, new_tokens)
    llm.close()
    with torch.no_grad():
        ours_logits = model(torch.tensor([prompt]))[0].numpy()  # (T, V), muP's multipliers applied
    assert ours_logits.std() > 1.0  # confident logits: a layout slip cannot hide below the tolerance
    np.testing.assert_allclose(theirs_logits, ours_logits, atol=lmgguf.VERIFY_TOLERANCE, rtol=0)
    ours = generate_ids(
        model,
        [prompt],
        SamplingConfig(max_new_tokens=new_tokens, temperature=0.0),
        device=torch.device("cpu"),
    ).tokens[0]
    assert theirs == ours


def test_mistral_window_llama_cpp_attends_to_every_position(tmp_path):
    """llama.cpp's ``llama`` has no sliding window: past the window its logits are those of the same weights
    attending to every position, not lmforge's. The file declares the window as its context length, the
    range where the two agree (llama.cpp warns when asked for more)."""
    require_llama_cpp()
    cfg = tiny(300, sliding_window=6, n_kv_heads=2, tie_embeddings=False)
    model, run = family_run(tmp_path, cfg)
    out = tmp_path / "model.gguf"
    report = convert.export_model(run, out, format="gguf")  # the self-check stays inside the window
    assert report.max_abs_diff <= lmgguf.VERIFY_TOLERANCE
    assert field(gguf.GGUFReader(out), "llama.context_length") == 6
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    llm = lmgguf.open_llama_cpp(out, len(prompt))
    theirs, _ = lmgguf.llama_cpp_greedy(llm, prompt, 0)
    llm.close()
    full = build_model(dataclasses.replace(cfg, sliding_window=None), seed=None).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        windowed = model(torch.tensor([prompt]))[0].numpy()  # (T, V)
        everything = full(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(theirs[:6], windowed[:6], atol=lmgguf.VERIFY_TOLERANCE, rtol=0)
    np.testing.assert_allclose(theirs, everything, atol=lmgguf.VERIFY_TOLERANCE, rtol=0)
    assert np.abs(theirs[6:] - windowed[6:]).max() > 0.1  # past the window: not lmforge's model


@pytest.mark.parametrize(
    "switches, match",
    [  # what Hugging Face expresses but llama.cpp computes otherwise (src/models/*.cpp of llama.cpp)
        (dict(qkv_bias=True, head_size=8), "head_size=8"),  # qwen2: attention is d_model wide
        (
            dict(
                moe=MoEConfig(
                    n_experts=4,
                    n_shared_experts=1,
                    shared_expert_gate=True,
                    router="softmax_topk",
                    norm_topk_prob=True,
                )
            ),  # fmt: skip
            "qwen2moe uses the top-k softmax probabilities as they are",
        ),
        (
            dict(
                moe=MoEConfig(
                    n_experts=4,
                    n_shared_experts=1,
                    shared_expert_gate=True,
                    router="softmax_topk",
                    first_dense_layers=1,
                )
            ),  # fmt: skip
            "first_dense_layers=1",
        ),
        (
            dict(qk_norm=True, moe=MoEConfig(n_experts=4, router="softmax_topk", norm_topk_prob=False)),
            "qwen3moe renormalises",
        ),
        (
            dict(
                qk_norm=True,
                moe=MoEConfig(n_experts=4, router="softmax_topk", norm_topk_prob=True, first_dense_layers=1),
            ),  # fmt: skip
            "qwen3moe: every layer is MoE",
        ),
    ],
    ids=[
        "qwen2-narrow-heads",
        "qwen2moe-normalised",
        "qwen2moe-dense-first",
        "qwen3moe-unnormalised",
        "qwen3moe-dense-first",
    ],  # fmt: skip
)
def test_what_llama_cpp_computes_otherwise_is_refused(tmp_path, switches, match):
    _, run = make_run(tmp_path, tiny(300, **switches), None)
    with pytest.raises(ExportError, match=match):
        convert.export_model(run, tmp_path / "m.gguf", format="gguf", verify=False)
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_trained_expert_bias_is_refused(tmp_path):
    cfg = tiny(300, moe=MoEConfig(n_experts=4, top_k=2))
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.layers[1].mlp.expert_bias[2] = 0.5  # DeepSeek-style balancing: routing llama.cpp cannot do
    with pytest.raises(ExportError, match="layers.1.mlp.expert_bias is not zero"):
        lmgguf.gguf_state_dict(model.state_dict(), cfg)


ROPE_SCALINGS = {  # long-context RoPE scaling (Hugging Face's rope_scaling), each with a short original context
    "linear": dict(rope_scaling="linear", rope_factor=4.0),
    "llama3": dict(
        rope_scaling="llama3",
        rope_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=16,
    ),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16),
}


@pytest.mark.parametrize(
    "arch_switches", [dict(n_kv_heads=2), dict(n_kv_heads=2, qkv_bias=True)], ids=["llama", "qwen2"]
)
@pytest.mark.parametrize("scaling", list(ROPE_SCALINGS))
def test_rope_scaling_runs_in_llama_cpp_as_in_lmforge(tmp_path, scaling, arch_switches):
    """llama.cpp computes the scaled RoPE as lmforge does (keys for linear and YaRN, the ``rope_freqs``
    factors for Llama 3.1's scaling, which only its ``llama`` reads: elsewhere it is refused); the same weights
    without the scaling give other logits, so a scaling the file dropped would fail here."""
    require_llama_cpp()
    cfg = tiny(300, tie_embeddings=False, **arch_switches, **ROPE_SCALINGS[scaling])
    model, run = family_run(tmp_path, cfg)
    with torch.no_grad():  # sharp attention, so that positions (what RoPE encodes) move the logits
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    save_checkpoint(
        run / "checkpoints" / "step_00000010",
        model_state=model.state_dict(),
        config=Config(model=cfg, train=TrainConfig(seq_len=32)),
    )
    out = tmp_path / "model.gguf"
    if scaling == "llama3" and arch_switches.get("qkv_bias"):
        with pytest.raises(ExportError, match="rope_scaling=llama3"):
            convert.export_model(run, out, format="gguf", verify=False)
        return
    report = convert.export_model(run, out, format="gguf")  # verifies itself with llama.cpp
    assert report.max_abs_diff <= lmgguf.VERIFY_TOLERANCE
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    llm = lmgguf.open_llama_cpp(out, len(prompt))
    theirs, _ = lmgguf.llama_cpp_greedy(llm, prompt, 0)
    llm.close()
    plain = build_model(dataclasses.replace(cfg, rope_scaling="none", rope_factor=1.0), seed=None).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()  # (T, V)
        unscaled = plain(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=lmgguf.VERIFY_TOLERANCE, rtol=0)
    assert np.abs(unscaled - ours).max() > 0.5  # the scaling matters at these positions
