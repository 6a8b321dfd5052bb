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
