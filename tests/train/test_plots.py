"""The loss plot: a PNG at the default or given place; a folder without metrics.jsonl is named."""

import json

import pytest

from lmforge.errors import DataError
from lmforge.train.plots import plot_runs


def run(path, losses):
    path.mkdir()
    records = [{"step": i, "loss": loss, "tokens": 64 * i} for i, loss in enumerate(losses, 1)]
    records.append({"step": len(losses), "val_loss": losses[-1] + 0.25, "tokens": 64 * len(losses)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_one_run_plots_beside_itself_and_several_where_asked(tmp_path):
    a, b = run(tmp_path / "a", [3.0, 2.5, 2.0]), run(tmp_path / "b", [3.5, 3.0])
    assert plot_runs([a]) == a / "loss.png"
    both = plot_runs([a, b], tmp_path / "out" / "both.png")
    assert both == tmp_path / "out" / "both.png"
    for png in (a / "loss.png", both):
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["both.png"]  # no temporary left


def test_a_folder_without_metrics_is_named(tmp_path):
    run(tmp_path / "good", [1.0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no metrics.jsonl \(not an lmforge run folder\)"):
        plot_runs([tmp_path / "good", tmp_path / "empty"])
