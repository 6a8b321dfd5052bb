"""The one helper every test that needs ../shared/data or transformers goes through: skip in a user's clone,
fail under CI."""

import sys
from pathlib import Path

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


SKIPPING_SUITE = """
import pytest

def test_runs():
    pass

def test_needs_a_widget():
    pytest.skip("the widget is not installed")
"""


def _run_skipping_suite(pytester, monkeypatch, ci):
    pytester.makeconftest("pytest_plugins = ['tests.skip_report']")
    pytester.makepyfile(test_widget=SKIPPING_SUITE)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_the_skip_report_lists_each_skip_with_its_reason_and_passes_outside_ci(pytester, monkeypatch):
    result = _run_skipping_suite(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["*skips*", "SKIPPED test_widget.py::test_needs_a_widget: the widget is not installed"]
    )


def test_a_skip_under_ci_fails_the_run_and_says_why(pytester, monkeypatch):
    result = _run_skipping_suite(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_widget.py::test_needs_a_widget: *", "1 skipped under CI*"])


def test_no_skip_says_so(pytester, monkeypatch):
    pytester.makeconftest("pytest_plugins = ['tests.skip_report']")
    pytester.makepyfile(test_fine="def test_runs():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["no test skipped"])


def test_a_missing_optional_module_skips_outside_ci_and_fails_under_ci(monkeypatch):
    monkeypatch.setitem(sys.modules, "widgetlib", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(
        pytest.skip.Exception, match=r"widgetlib is not installed .*pip install -e '\.\[serve\]'"
    ):
        conftest.require_module("widgetlib", "serve")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="widgetlib is not installed.*CI is set"):
        conftest.require_module("widgetlib", "serve")


def test_no_test_file_uses_importorskip_or_a_bare_skip():
    """Every optional requirement goes through tests/conftest.py's one rule (skip in a clone, fail in CI)."""
    here = Path(__file__).resolve().parent
    offenders = []
    for path in here.rglob("*.py"):
        if path.name in ("conftest.py", "test_requirements.py") and path.parent == here:
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("importorskip(", "pytest.skip("):
            if needle in text:
                offenders.append(f"{path.relative_to(here)}: {needle}")
    assert not offenders, offenders
