import os

import pytest

from lmforge.errors import DataError
from lmforge.files import jsonl_records, write_text_atomic


def test_jsonl_records_skip_blank_lines_and_name_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": "ü"}\n', encoding="utf-8")
    assert list(jsonl_records(path, "data file")) == [({"a": 1}, f"{path}:1"), ({"b": "ü"}, f"{path}:4")]
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl:2: expected a JSON object, got list"):
        list(jsonl_records(path, "data file"))
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        list(jsonl_records(path, "data file"))
    with pytest.raises(DataError, match=r"missing.jsonl: no such task file"):
        list(jsonl_records(tmp_path / "missing.jsonl", "task file"))


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old: 1\n")
    write_text_atomic(path, "new: 2\n")
    assert path.read_text() == "new: 2\n" and os.listdir(tmp_path) == ["config.yaml"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)  # the rename never happens: the old file stays whole
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "half")
    assert path.read_text() == "new: 2\n" and os.listdir(tmp_path) == ["config.yaml"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_get_the_mode_of_any_other_new_file(tmp_path, umask):
    # safetensors writes through a private temporary file: model.safetensors came out 0600 beside 0644 files.
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config, ModelConfig
    from lmforge.convert import export_model
    from lmforge.model.transformer import build_model

    cfg = ModelConfig(vocab_size=64, max_seq_len=16, n_layers=1, d_model=32, n_heads=2)
    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_text("x")
        plain = os.stat(tmp_path / "plain").st_mode & 0o777
        ckpt = save_checkpoint(
            tmp_path / "ckpt", model_state=build_model(cfg, seed=0).state_dict(), config=Config(model=cfg)
        )
        export_model(ckpt, tmp_path / "hf", verify=False)
    finally:
        os.umask(old)
    assert plain == 0o666 & ~umask
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.glob("*/*")}
    assert {"ckpt/model.safetensors", "hf/model.safetensors", "ckpt/config.yaml", "hf/config.json"} <= set(
        modes
    )
    assert modes == dict.fromkeys(modes, plain)
