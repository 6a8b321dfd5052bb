"""Configuration: YAML + dotted overrides -> one validated Config, and every bad case's message."""

import dataclasses

import pytest

from lmforge.config import PRESETS, Config, load_config, parse_number, save_config
from lmforge.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_preset_and_overrides_resolve_in_order(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\n  n_layers: 6\ntrain:\n  lr: 3.0e-4\n  steps: 2k\n")
    cfg = load_config(path, ["model.d_model=256", "train.lr=1e-3", "data.sources=[a.txt, b.txt]"])
    assert cfg.model.n_layers == 6  # the file wins over the preset
    assert cfg.model.d_model == 256  # the override wins over the preset
    assert cfg.model.vocab_size == PRESETS["tiny"].vocab_size  # untouched preset values stay
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # '1e-3' is a YAML string, coerced
    assert cfg.train.steps == 2000
    assert cfg.data.sources == ["a.txt", "b.txt"]


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["model.preset=7b", "train.precision=bf16", "data.mixture={a: 0.7, b: 0.3}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_parse_number_suffixes():
    assert parse_number("4M") == 4e6 and parse_number("1_000") == 1000 and parse_number("3e-4") == 3e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layer=4"], "unknown config key 'model.n_layer' (did you mean 'n_layers'?)"),
        (["trian.lr=1"], "unknown config section 'trian' in override 'trian.lr=1' (did you mean 'train'?)"),
        (["model.n_layers=four"], "model.n_layers='four' must be an integer"),
        (["model.n_layers=3.5"], "model.n_layers=3.5 must be an integer"),
        (["train.lr=fast"], "train.lr='fast' must be a number"),
        (["model.tie_embeddings=maybe"], "model.tie_embeddings='maybe' must be true or false"),
        (["model.position=ropee"], "model.position='ropee' must be one of 'rope', 'learned', 'sinusoidal' (did you mean 'rope'?)"),
        (["model.n_kv_heads=many"], "model.n_kv_heads='many' is not a valid int | None"),
        (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 is not divisible by model.n_heads=3"),
        (["model.n_heads=6", "model.n_kv_heads=4", "model.d_model=96"], "model.n_heads=6 is not divisible by model.n_kv_heads=4"),
        (["model.preset=gpt3"], "unknown preset model.preset='gpt3'"),
        (["train.lr"], "override 'train.lr' must look like section.key=value (e.g. train.lr=3e-4)"),
        (["lr=3e-4"], "override key 'lr' must be section.key (e.g. model.n_layers=8)"),
        (["model.n_layers=0"], "model.n_layers=0 must be >= 1"),
        (["train.min_lr=1", "train.lr=0.1"], "train.min_lr=1.0 must be in [0, train.lr=0.1]"),
    ],
)  # fmt: skip
def test_bad_overrides_say_what_and_why(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.d_model=100", "model.n_heads=3", "train.steps=0", "data.val_fraction=2"])
    text = str(info.value)
    assert text.startswith("invalid config:")
    for part in ("model.d_model=100", "train.steps=0", "data.val_fraction=2"):
        assert part in text


def test_malformed_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: 4\n  d_model: [128\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4:\d+: malformed YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model:\n  preset: tiny\n  dmodel: 64\n",
            "unknown config key 'model.dmodel' (did you mean 'd_model'?)",
        ),
        ("- a\n- b\n", "a config file must hold a mapping of sections, got list"),
        ("model: 5\n", "model must be a mapping, got int"),
        ("modle:\n  n_layers: 2\n", "unknown config key 'modle' (did you mean 'model'?)"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.n_layers = 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.head_size=0", "model.head_size=0 must be >= 1"),
        ("model.n_kv_heads=0", "model.n_kv_heads=0 must be >= 1"),
        ("model.d_model=36", "model.position=rope needs an even head dimension, got 9"),
        ("model.ffn_hidden=0", "model.ffn_hidden=0 must be >= 1"),
        ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
        ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
        ("model.norm_eps=-1e-5", "model.norm_eps=-1e-05 must be > 0"),
        ("model.init_std=0", "model.init_std=0.0 must be > 0"),
        ("data.val_fraction=1", "data.val_fraction=1.0 must be in [0, 1)"),
        ("data.vocab_size=1", "data.vocab_size=1 must be >= 2"),
        ("data.workers=0", "data.workers=0 must be >= 1"),
        ("data.near_dedup_threshold=0", "data.near_dedup_threshold=0.0 must be in (0, 1]"),
        ("data.max_repeated_line_fraction=1.5", "data.max_repeated_line_fraction=1.5 must be in (0, 1]"),
        ("data.min_chars=20000000", "data.min_chars=20000000 is larger than data.max_chars=10000000"),
        ("data.text_chunk_chars=-1", "data.text_chunk_chars=-1 must be >= 0"),
        ("data.shard_tokens=0", "data.shard_tokens=0 must be >= 1"),
        ("train.micro_batch=0", "train.micro_batch=0 must be >= 1"),
        ("train.global_batch_tokens=0", "train.global_batch_tokens=0 must be >= 1"),
        ("train.lr=0", "train.lr=0.0 must be > 0"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1 must be >= 0"),
        ("train.decay_fraction=2", "train.decay_fraction=2.0 must be in [0, 1]"),
        ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0 (0 disables clipping)"),
        ("train.beta2=1", "train.beta1=0.9 and train.beta2=1.0 must be in [0, 1)"),
        ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
        ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
        ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be > 0"),
        ("parallel.world_size=0", "parallel.world_size=0 must be >= 1"),
        ("parallel.device_memory_gib=0", "parallel.device_memory_gib=0.0 must be > 0"),
        ("eval.every=-1", "eval.every=-1 must be >= 0"),
        ("eval.limit=0", "eval.limit=0 must be >= 1"),
    ],
)
def test_every_range_check_names_the_key_and_the_bound(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
