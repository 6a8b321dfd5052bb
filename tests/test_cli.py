"""The CLI: errors are one line on stderr and exit code 2 without a traceback; --debug shows the traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError


@pytest.mark.parametrize(
    "argv, message",
    [
        (["model", "info", "7bb"], "'7bb' is neither a preset (did you mean '7b'?) nor a config file"),
        (["model", "info", "tiny", "model.n_layer=3"], "(did you mean 'n_layers'?)"),
        (
            ["model", "info", "tiny", "model.d_model=130"],
            "invalid config: model.d_model=130 is not divisible by model.n_heads=4",
        ),
        (["model", "info", "missing.yaml"], "missing.yaml: config file not found"),
        (["import", "no/such/folder", "out"], "no/such/folder: no such Hugging Face model folder"),
        (["export", "no/such/run", "out"], "no/such/run: no such checkpoint or run folder"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith(f"lmforge {argv[0]}: error: ") and message in captured.err
    assert not (tmp_path / "out").exists()


def test_malformed_yaml_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: [2\n")
    assert main(["model", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:3:1: malformed YAML" in err


def test_debug_raises_instead(capsys):
    with pytest.raises(ConfigError, match="did you mean '7b'"):
        main(["--debug", "model", "info", "7bb"])


def test_debug_shows_the_traceback_in_a_real_process():
    plain = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "model", "info", "7bb"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    debug = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "--debug", "model", "info", "7bb"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "lmforge.errors.ConfigError" in debug.stderr


def test_model_info_prints_the_numbers(capsys):
    assert main(["model", "info", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "position=learned" in out


def test_overrides_after_options_are_still_overrides(capsys):
    assert main(["model", "info", "tiny", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)["parameters"]
    assert main(["model", "info", "tiny", "--json", "model.n_layers=3"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] < full
    with pytest.raises(SystemExit):  # anything else unknown is still refused by argparse
        main(["model", "info", "tiny", "--json", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_a_mistyped_option_is_named_with_a_suggestion_in_the_verbs_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "some/model", "--tasks", "hellaswag.jsonl"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: lmforge eval")
    assert "unrecognized arguments: --tasks hellaswag.jsonl (--tasks: did you mean --task?)" in err
    with pytest.raises(SystemExit):  # a verb with verbs of its own
        main(["model", "info", "tiny", "--jsn"])
    assert "(--jsn: did you mean --json?)" in capsys.readouterr().err


@pytest.fixture
def checkpoint(tmp_path):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import Config, ModelConfig
    from lmforge.model.transformer import build_model

    cfg = ModelConfig(vocab_size=64, max_seq_len=16, n_layers=1, d_model=32, n_heads=2)
    model = build_model(cfg, seed=0)
    return save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), config=Config(model=cfg))


def one_line_error(capsys, verb: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith(f"lmforge {verb}: error: ")
    return captured.err.removeprefix(f"lmforge {verb}: error: ").strip()


def test_gguf_export_without_gguf_is_one_line_with_the_extra_and_creates_nothing(
    checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if it were not installed
    out = tmp_path / "new" / "folder" / "model.gguf"
    assert main(["export", str(checkpoint), str(out), "--format", "gguf", "--no-verify"]) == 2
    assert (
        one_line_error(capsys, "export") == "GGUF export needs the gguf package: pip install 'lmforge[gguf]'"
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_export_to_an_unwritable_place_is_one_line_naming_the_path(checkpoint, capsys):
    assert main(["export", str(checkpoint), "/proc/x", "--no-verify"]) == 2
    message = one_line_error(capsys, "export")
    assert message.startswith("/proc/x: ") and "tmp" not in message  # the path the user gave, and why
    with pytest.raises(OSError):
        main(["--debug", "export", str(checkpoint), "/proc/x", "--no-verify"])


def test_os_errors_of_other_verbs_are_one_line_with_the_path_and_reason(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    script = blocker / "job.sh"  # a file's child can never be written, not even by root
    assert main(["launch", "--slurm", str(script)]) == 2
    assert one_line_error(capsys, "launch") == f"{script}: Not a directory"
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert main(["plot", str(run), "--out", str(blocker / "loss.png")]) == 2
    assert one_line_error(capsys, "plot").startswith(f"{blocker}")


def test_import_help_names_every_family_the_importer_reads(capsys):
    from lmforge.errors import LMForgeError
    from lmforge.model.hf import model_config_from_hf

    with pytest.raises(SystemExit) as exit_:
        main(["import", "--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    listed = (
        help_text.split("read a Hugging Face folder (")[1].split(")")[0].replace(" and ", ", ").split(", ")
    )
    assert listed == ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "gpt2"]

    def refusal(model_type: str) -> str:  # what the importer says of a bare config.json of this type
        try:
            model_config_from_hf({"model_type": model_type})
        except LMForgeError as exc:
            return str(exc)
        return ""

    for model_type in listed:  # each listed family gets past the architecture check (to the missing fields)
        assert "unsupported architecture" not in refusal(model_type), model_type
    assert (
        f"unsupported architecture 'falcon' (lmforge imports {', '.join(listed[:-1])} and gpt2)"
        in refusal("falcon")
    )
