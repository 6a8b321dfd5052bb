"""muP transfer of the tuned config to a wider model, and the best config the report writes."""

from __future__ import annotations

import pytest
import yaml

from lmforge.auto.report import best_row, format_table, write_report
from lmforge.auto.space import parse_space
from lmforge.auto.sweep import SweepSpec, TrialRow
from lmforge.auto.transfer import transfer_config
from lmforge.config import config_from_dict, load_config
from lmforge.errors import ConfigError

TUNED = {"model": {"preset": "tiny", "mup": True}, "train": {"lr": 0.01, "warmup_steps": 7}}


def test_the_tiny_preset_at_four_times_the_width():
    # tiny: d_model 128, 4 heads of 32, ffn_hidden 384 (lmforge.shapes.TINY).
    out = config_from_dict(transfer_config(TUNED, 512))
    assert (out.model.d_model, out.model.n_heads, out.model.head_dim) == (512, 16, 32)
    assert out.model.ffn_hidden == 384 * 4
    assert out.model.mup and out.model.mup_base_width == 128  # the width the hyperparameters were tuned at
    assert (out.train.lr, out.train.warmup_steps) == (0.01, 7)  # the tuned hyperparameters, unchanged
    assert out.model.n_layers == 4 and out.model.vocab_size == 2048  # depth and vocabulary kept
    assert TUNED["model"] == {"preset": "tiny", "mup": True}  # the input is not modified


def test_grouped_query_heads_keep_their_grouping_and_an_explicit_base_width_is_kept():
    tuned = {"model": {"d_model": 96, "n_heads": 6, "n_kv_heads": 2, "mup": True, "mup_base_width": 48}}
    out = config_from_dict(transfer_config(tuned, 256 - 64))  # 192: 12 heads of 16
    assert (out.model.n_heads, out.model.kv_heads, out.model.head_dim) == (12, 4, 16)
    assert out.model.mup_base_width == 48
    assert out.model.ffn_hidden is None and out.model.hidden_dim == 512  # derived from d_model by the model


def test_moe_expert_widths_scale_with_the_model():
    moe = {"n_experts": 4, "expert_hidden": 96, "shared_expert_hidden": 40}
    tuned = {"model": {"preset": "tiny", "mup": True, "moe": moe}}
    out = config_from_dict(transfer_config(tuned, 256)).model.moe
    assert (out.expert_hidden, out.shared_expert_hidden) == (192, 80)


def test_widths_of_a_fractional_scale_are_rounded_to_the_nearest():
    # 96 -> 128 is a scale of 4/3: ffn 101 -> 134.67 -> 135, experts 50 -> 66.67 -> 67, 20 -> 26.67 -> 27
    moe = {"n_experts": 2, "expert_hidden": 50, "shared_expert_hidden": 20}
    tuned = {"model": {"d_model": 96, "n_heads": 6, "ffn_hidden": 101, "mup": True, "moe": moe}}
    out = config_from_dict(transfer_config(tuned, 128)).model
    assert (out.d_model, out.n_heads, out.ffn_hidden) == (128, 8, 135)
    assert (out.moe.expert_hidden, out.moe.shared_expert_hidden) == (67, 27)


@pytest.mark.parametrize(
    ("data", "width", "expected"),
    [
        ({"model": {"preset": "tiny"}}, 512, "needs model.mup=true"),
        (TUNED, 500, "not a multiple of the head dimension 32"),
        (TUNED, 0, "--transfer-width=0 must be >= 1"),
        (TUNED, -64, "--transfer-width=-64 must be >= 1"),
        (
            {"model": {"d_model": 96, "n_heads": 6, "n_kv_heads": 2, "mup": True}},
            64,
            "query heads per key-value",
        ),
        ({**TUNED, "parallel": {"tp": 4}}, 96, "parallel.tp=4 must divide"),
    ],
)
def test_impossible_transfers_say_why(data, width, expected):
    with pytest.raises(ConfigError, match=expected):
        transfer_config(data, width)


def rows() -> list[TrialRow]:
    def row(number, state, value, lr, layers):
        params = {"train.lr": lr, "model.n_layers": layers}
        return TrialRow(number, state, value, params, 3.0, 12, "", None, [(4, value + 1), (12, value)])

    return [
        row(0, "COMPLETE", 2.5, 0.001, 2),
        row(1, "PRUNED", 2.0, 0.02, 4),  # a pruned trial's last value is never "best"
        row(2, "COMPLETE", 2.25, 0.004, 4),
        row(3, "COMPLETE", 2.25, 0.008, 2),  # a tie goes to the earlier trial
        TrialRow(4, "FAIL", None, {"train.lr": 0.05, "model.n_layers": 2}, 1.0, 0, "exit code 2: boom", None),
    ]


def test_best_row_takes_complete_trials_only():
    assert best_row(rows(), "minimize").number == 2
    assert best_row(rows(), "maximize").number == 0
    assert best_row(rows()[1:2], "minimize") is None


def test_the_report_writes_a_best_config_ready_for_train(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(TUNED))
    spec = SweepSpec(
        config=str(config),
        space=tuple(parse_space(["train.lr=loguniform(1e-4,1e-1)", "model.n_layers=choice(2,4)"])),
        trials=5,
        out_dir=str(tmp_path / "sweep"),
    )
    (tmp_path / "sweep").mkdir()
    files = write_report(spec, TUNED, rows(), transfer_widths=(256,))
    best = load_config(files["best"])
    assert (best.train.lr, best.model.n_layers, best.train.warmup_steps) == (0.004, 4, 7)
    assert files["best"].read_text().startswith("# best of the sweep: trial 2, val_loss 2.25\n")
    wide = load_config(files["best_d256"])
    assert (wide.model.d_model, wide.model.n_heads, wide.model.mup_base_width) == (256, 8, 128)
    assert (wide.train.lr, wide.model.n_layers) == (0.004, 4)
    csv_lines = files["table"].read_text().splitlines()
    assert csv_lines[0] == "number,state,val_loss,last_step,seconds,train.lr,model.n_layers,reason"
    assert csv_lines[5].startswith("4,FAIL,,0,1.0,0.05,2,exit code 2: boom")
    for name in ("history_plot", "params_plot", "curves_plot"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(rows(), spec.space, "val_loss").splitlines()
    assert table[0].split() == [
        "#",
        "state",
        "val_loss",
        "steps",
        "seconds",
        "train.lr",
        "model.n_layers",
        "note",
    ]
    assert table[3].split()[:6] == ["2", "complete", "2.2500", "12", "3.0", "0.004"]
