"""Parameter counts by arithmetic against models built on the meta device, and what keeps `model info` instant."""

import dataclasses
import json
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.config import PRESETS
from lmforge.model.info import count_params, model_flops_per_token
from lmforge.model.transformer import build_model

LLAMA2_7B_PARAMS = 6_738_415_616  # meta-llama/Llama-2-7b-hf
GPT2_SMALL_PARAMS = 124_439_808  # openai-community/gpt2


def test_7b_on_meta_has_the_llama2_parameter_count():
    model = build_model(PRESETS["7b"], device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == LLAMA2_7B_PARAMS
    assert count_params(PRESETS["7b"]) == LLAMA2_7B_PARAMS


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_params_agrees_with_the_built_model(name):
    cfg = PRESETS[name]
    model = build_model(cfg, device="meta")
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    if name == "gpt2-124m":
        assert count_params(cfg) == GPT2_SMALL_PARAMS


@pytest.mark.parametrize(
    "switches", [dict(bias=True), dict(bias=True, ffn="gelu", norm="layernorm", n_kv_heads=1)]
)
def test_count_params_with_biases_and_gqa(switches):
    cfg = dataclasses.replace(PRESETS["tiny"], tie_embeddings=False, **switches)
    assert count_params(cfg) == sum(p.numel() for p in build_model(cfg, device="meta").parameters())


def test_flops_per_token_is_6n_plus_attention():
    cfg = PRESETS["7b"]
    embedding = cfg.vocab_size * cfg.d_model  # the untied input embedding is a lookup, not a matmul
    expected = 6 * (LLAMA2_7B_PARAMS - embedding) + 12 * 32 * 4096 * 2048
    assert model_flops_per_token(cfg, 2048) == expected


def test_model_info_json(capsys):
    assert main(["model", "info", "7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == LLAMA2_7B_PARAMS
    assert info["bytes_bf16"] == 2 * LLAMA2_7B_PARAMS


def test_model_info_7b_needs_neither_torch_nor_the_model():
    # What keeps it instant, as behaviour: a fresh process imports neither torch nor the model code, so
    # nothing is built or allocated. The time itself is measured in benchmarks/model_info_startup.py.
    code = (
        "import sys; from lmforge.cli import main; code = main(['model', 'info', '7b']); "
        "loaded = sorted(m for m in ('torch', 'lmforge.model.transformer') if m in sys.modules); "
        "assert not loaded, f'model info imported {loaded}'; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "6,738,415,616" in done.stdout
