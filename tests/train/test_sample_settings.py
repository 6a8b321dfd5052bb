"""Sample settings are checked before training: ``train.sample_tokens=0`` used to pass validation, train to
the last step and then fail in the sampler, before the final checkpoint and model card were written."""

from __future__ import annotations

import pytest

from lmforge.config import load_config
from lmforge.errors import ConfigError


def test_zero_sample_tokens_is_refused_before_training():
    with pytest.raises(
        ConfigError,
        match=r"train.sample_tokens=0 must be >= 1 \(for no samples set train.sample_prompts=\[\]\)",
    ):
        load_config(None, ["train.sample_tokens=0"])


def test_no_prompts_need_no_sample_tokens():
    cfg = load_config(None, ["train.sample_prompts=[]", "train.sample_tokens=0"])
    assert cfg.train.sample_prompts == [] and cfg.train.sample_tokens == 0
