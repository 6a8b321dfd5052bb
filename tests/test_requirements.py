"""The one helper every test that needs ../shared/data or transformers goes through: skip in a user's clone,
fail under CI."""

import sys

import pytest

from tests import conftest
from tests.conftest import require_shared_data, require_transformers


@pytest.mark.parametrize("ci", [None, "", "0", "false"])
def test_absent_shared_data_skips_with_the_path_outside_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=r"no_such_corpus\.txt is absent .*shared data folder"):
        require_shared_data("no_such_corpus.txt")


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_absent_shared_data_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=r"no_such_corpus\.txt is absent .*CI is set"):
        require_shared_data("no_such_corpus.txt")


def test_a_whole_missing_shared_folder_is_reported_by_its_path(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "shared" / "data")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=str(tmp_path / "shared" / "data")):
        require_shared_data()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_shared_data()


def test_present_shared_data_is_returned(monkeypatch, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "task.jsonl").write_text("{}\n")
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        assert require_shared_data() == tmp_path
        assert require_shared_data("eval/task.jsonl") == tmp_path / "eval" / "task.jsonl"


def test_missing_transformers_skips_outside_ci_and_fails_under_ci(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="transformers is not installed"):
        require_transformers()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="transformers is not installed.*CI is set"):
        require_transformers()


def test_installed_transformers_is_returned(monkeypatch):
    fake = type(sys)("transformers")
    monkeypatch.setitem(sys.modules, "transformers", fake)
    monkeypatch.setenv("CI", "true")
    assert require_transformers() is fake
