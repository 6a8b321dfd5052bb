"""`lmforge train` end to end on a tiny prepared corpus: the run folder, bad input rejected before the first
step (naming both sides), and exact resume after SIGKILL."""

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.prepare import prepare_data

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A char-level corpus of ~40k characters: Shakespeare when the shared data is there, else generated."""
    root = tmp_path_factory.mktemp("corpus")
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    else:
        rng = random.Random(0)
        words = ["the", "king", "shall", "speak", "and", "we", "will", "hear", "him", "now"]
        lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(600)]
        text = "\n\n".join("\n".join(lines[i : i + 5]) for i in range(0, 600, 5))  # 120 paragraphs
    parts = text.split("\n\n")
    for i in range(8):  # several documents so both splits get some
        (root / f"doc{i}.txt").write_text("\n\n".join(parts[i::8]), encoding="utf-8")
    out = root / "prepared"
    prepare_data(
        DataConfig(tokenizer="char", val_fraction=0.25, seed=1), [str(root / "*.txt")], out, progress=False
    )
    return out


def args(prepared: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"data.prepared={prepared}",
        "model.preset=tiny",
        "model.n_layers=2",
        "model.d_model=64",
        "model.ffn_hidden=128",
        f"train.out_dir={run}",
        "train.steps=24",
        "train.seq_len=32",
        "train.micro_batch=4",
        "train.warmup_steps=4",
        "train.log_every=1",
        "train.eval_every=8",
        "train.eval_batches=2",
        "train.ckpt_every=3",
        "train.sample_tokens=20",
        "train.sample_prompts=[ROMEO]",
        "train.device=cpu",
        *extra,
        "--no-progress",
    ]


def test_train_leaves_a_complete_run_folder(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(prepared, run, "train.keep_last=2")) == 0
    out = capsys.readouterr().out
    assert "--- sample ---\nROMEO" in out
    for name in ("config.yaml", "metrics.jsonl", "samples.txt", "loss.png", "MODEL_CARD.md"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step_00000021", "step_00000024"]  # keep_last=2
    final = run / "checkpoints" / "step_00000024"
    assert {"model.safetensors", "config.yaml", "train_state.pt", "tokenizer.json", "MODEL_CARD.md"} <= {
        p.name for p in final.iterdir()
    }
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 25))
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "memory_gb", "tokens"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16, 24]
    card = (run / "MODEL_CARD.md").read_text()
    assert "tokens seen: 3,072" in card and "final validation loss" in card
    # the plot verb overlays runs
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000


def test_a_second_run_into_the_same_folder_needs_resume(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(prepared, run, "train.steps=3")) == 0
    assert main(args(prepared, run, "train.steps=3")) == 2
    assert "--resume auto" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.micro_batch=5000"], ["train.micro_batch x (train.seq_len + 1)", "holds only"]),
        (["train.seq_len=512"], ["train.seq_len=512", "model.max_seq_len=256"]),
        (["model.vocab_size=20"], ["model.vocab_size=20", "the data's tokenizer", "ids"]),
        (["model.preset=tinny"], ["model.preset='tinny'", "did you mean 'tiny'"]),
    ],
)
def test_bad_input_fails_before_the_first_step(prepared, tmp_path, capsys, overrides, expected):
    run = tmp_path / "run"
    assert main(args(prepared, run, *overrides)) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, (piece, err)
    assert not (run / "metrics.jsonl").exists()


def test_unwritable_run_folder_is_reported_before_training(prepared, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(args(prepared, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert "train.out_dir=" in err and "not writable" in err


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_auto_is_exact(prepared, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(args(prepared, whole, "model.dropout=0.1")) == 0
    kill_after = random.Random(24).randint(4, 20)  # seeded: 16, after the checkpoint at 15 and before 18
    command = [sys.executable, "-m", "lmforge.cli", *args(prepared, killed, "model.dropout=0.1")]
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kill_at_step.py")), str(kill_after), *command[3:]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, f"not killed at step {kill_after}: {proc.stderr[-2000:]}"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == kill_after  # it died right where it announced, not later
    resumed = subprocess.run([*command, "--resume=auto"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr, resumed.stderr

    def last_loss(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))
        return [r["loss"] for r in records if "loss" in r][-1]

    assert last_loss(killed) == last_loss(whole), f"killed after step {kill_after}"
    a = load_file(whole / "checkpoints" / "step_00000024" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_00000024" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (killed after step {kill_after})"


def test_demo_yaml_is_the_built_in_demo():
    import yaml

    from lmforge.config import load_config
    from lmforge.train.demo import DEMO

    root = Path(__file__).resolve().parents[2]
    assert yaml.safe_load((root / "configs" / "demo.yaml").read_text()) == DEMO
    shakespeare = load_config(root / "configs" / "shakespeare-char.yaml")
    assert (shakespeare.model.n_layers, shakespeare.model.d_model, shakespeare.train.steps) == (4, 128, 2000)


def test_prepared_cache_folders_are_named_readably_and_keyed_by_settings(tmp_path):
    from lmforge.config import config_from_dict
    from lmforge.train.data import prepared_dir_for

    cfg = config_from_dict({})
    stdlib = prepared_dir_for(cfg, ["/usr/lib/python3.11/*.py"], tmp_path)
    assert stdlib.parent == tmp_path / "prepared" and stdlib.name.startswith("python3.11-")  # no '*' in it
    assert prepared_dir_for(cfg, ["my texts/a b.txt"], tmp_path).name.startswith("a_b.txt-")
    assert prepared_dir_for(cfg, ["**/*.txt"], tmp_path).name.startswith("data-")
    other = config_from_dict({"data": {"vocab_size": 2048}})
    assert (
        prepared_dir_for(other, ["/usr/lib/python3.11/*.py"], tmp_path) != stdlib
    )  # settings are in the key


def test_a_weighted_mixture_of_prepared_folders_trains(prepared, tmp_path, capsys):
    second = tmp_path / "second"
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"d{i}.txt").write_text(f"all the world's a stage {i}\n" * 200, encoding="utf-8")
    tokenizer = str(prepared / "tokenizer.json")  # a mixture shares one tokenizer
    prepare_data(DataConfig(tokenizer=tokenizer, val_fraction=0.25, seed=1), [str(tmp_path / "src")], second,
                 progress=False)  # fmt: skip
    config = tmp_path / "mix.yaml"
    config.write_text(f"data:\n  mixture:\n    {prepared}: 0.7\n    {second}: 0.3\n", encoding="utf-8")
    run = tmp_path / "run"
    argv = args(prepared, run, "train.steps=6", "train.ckpt_every=6", "train.eval_every=6")
    argv.remove(f"data.prepared={prepared}")
    assert main([argv[0], str(config), *argv[1:]]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert any("val_loss" in r for r in records)

    # The run's data path (config -> prepared folders and weights -> loader), drawn for 2,000 windows: each
    # window is told apart by its text (the second corpus uses only the characters of its one line), and the
    # share of the first is 0.7 within 4 standard deviations of a seeded binomial draw, sqrt(0.21 / n).
    from lmforge.config import load_config
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.distributed.parallelize import World
    from lmforge.train.data import build_loader, resolve_data

    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = load_config(config, argv[1:-1])  # the same overrides, without --no-progress
    data = resolve_data(cfg, loader=None, world=world, cache_dir=tmp_path / "cache", progress=False)
    loader = build_loader(data, data.config, world)
    decode = load_tokenizer(prepared / "tokenizer.json").decode
    stage = set("all the world's a stage 0123\n")
    from_second = n = 0
    for _ in range(500):
        for window in loader.next_batch().inputs.tolist():
            from_second += set(decode(window)) <= stage
            n += 1
    share = (n - from_second) / n
    assert n == 2000 and abs(share - 0.7) <= 4 * (0.7 * 0.3 / n) ** 0.5, f"share of the 0.7 dataset: {share}"
    state = torch.load(run / "checkpoints" / "step_00000006" / "train_state.pt", weights_only=True)["loader"]
    assert sum(state["counts"]) == 6 * 4 and abs(state["counts"][0] - 0.7 * 24) <= 4 * (24 * 0.21) ** 0.5

    capsys.readouterr()
    config.write_text(f"data:\n  mixture:\n    {prepared}: 0.7\n    {tmp_path / 'nothing'}: 0.3\n")
    assert main([argv[0], str(config), *argv[1:]]) == 2
    assert "which is not a prepared folder (no meta.json)" in capsys.readouterr().err


def test_no_training_data_is_named(tmp_path, capsys):
    assert main(["train", "data.sources=[]", f"train.out_dir={tmp_path / 'run'}", "--no-progress"]) == 2
    assert "no training data: set data.sources" in capsys.readouterr().err


def test_first_run_preparation_prints_a_few_plain_lines_without_a_terminal(tmp_path, capsys):
    # The demo prepares its data on the first run; with output to a file or pipe (no progress bar) it used to
    # print nothing for minutes. Now: a few plain lines, whose figures are the prepared folder's own.
    from lmforge.config import config_from_dict
    from lmforge.distributed.parallelize import World
    from lmforge.train.data import resolve_data

    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"to be or not to be, line {i}\n" * (20 + i), encoding="utf-8")
    (tmp_path / "doc6.txt").write_text("short", encoding="utf-8")  # under data.min_chars: dropped
    cfg = config_from_dict(
        {
            "data": {
                "sources": [str(tmp_path / "*.txt")],
                "tokenizer": "bpe",
                "vocab_size": 300,
                "min_chars": 20,
            }
        }
    )
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = resolve_data(cfg, loader=None, world=world, cache_dir=tmp_path / "cache", progress=None)
    lines = capsys.readouterr().err.splitlines()  # capsys's stderr is not a terminal
    folder = Path(next(iter(data.datasets)))
    meta = json.loads((folder / "meta.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    assert len(lines) == 4 and all(line.startswith("data: ") for line in lines)
    assert lines[0] == f"data: preparing {tmp_path / '*.txt'} into {folder} (once: later runs reuse it)"
    read, kept = report["stages"]["read"]["docs_in"], report["stages"]["near_dedup"]["docs_out"]
    assert (read, kept, meta["documents"]) == (7, 6, 6)
    assert lines[1] == "data: cleaned 7 documents, kept 6"
    assert lines[2] == f"data: trained a bpe tokenizer of {meta['vocab_size']} tokens"
    assert lines[3].startswith(f"data: prepared 6 documents, {meta['tokens']:,} tokens in ")
    resolve_data(cfg, loader=None, world=world, cache_dir=tmp_path / "cache", progress=None)
    assert capsys.readouterr().err == ""  # prepared already: nothing to say
