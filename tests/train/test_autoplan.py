"""``parallel.strategy: auto``: the loop asks the planner, applies its micro-batch and accumulation, logs the
plan and saves it with the run; a smaller micro-batch with accumulation trains the same steps."""

import json
import math

import pytest
import torch
import yaml

from lmforge.config import load_config
from lmforge.plan.training import plan_training
from lmforge.train.autoplan import search_micro_batch
from lmforge.train.loop import train

GIB = 2**30


def write_corpus(path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    gen = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(60):
        idx = torch.randint(0, len(words), (40,), generator=gen).tolist()
        docs.append(" ".join(words[i] for i in idx) + ".")
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def run_config(tmp_path, name, *overrides):
    corpus = write_corpus(tmp_path / "corpus.txt")
    return load_config(
        None,
        [
            f"data.sources=[{corpus}]",
            "data.tokenizer=char",
            "data.val_fraction=0.1",
            f"data.prepared={tmp_path / 'prepared'}",
            "model.n_layers=2",
            "model.d_model=32",
            "model.n_heads=2",
            "model.max_seq_len=32",
            f"train.out_dir={tmp_path / name}",
            "train.steps=4",
            "train.seq_len=16",
            "train.micro_batch=8",
            "train.eval_every=100",
            "train.ckpt_every=4",
            "train.sample_prompts=[]",
            "train.device=cpu",
            *overrides,
        ],
    )


def test_auto_shrinks_the_micro_batch_to_fit_and_trains_the_same_steps(tmp_path):
    explicit = train(run_config(tmp_path, "explicit", "parallel.strategy=single"), progress=False)

    # a memory budget between the planner's prediction for micro-batch 4 and for 8
    vocab = yaml.safe_load((tmp_path / "explicit" / "config.yaml").read_text())["model"]["vocab_size"]
    shape = [
        "train.seq_len=16",
        "model.n_layers=2",
        "model.d_model=32",
        "model.n_heads=2",
        "model.max_seq_len=32",
    ]
    predicted = {
        mb: plan_training(
            load_config(None, [*shape, f"train.micro_batch={mb}", f"model.vocab_size={vocab}"]),
            device_kind="cpu",
            world_size=1,
            device_memory_bytes=None,
        ).predicted_peak_bytes
        for mb in (4, 8)
    }
    budget_gib = (predicted[4] + predicted[8]) / 2 / GIB
    auto = train(run_config(tmp_path, "auto", f"parallel.device_memory_gib={budget_gib}"), progress=False)

    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    assert (plan["strategy"], plan["micro_batch"], plan["grad_accum"]) == ("single", 4, 2)
    assert plan["predicted_peak_bytes"] <= budget_gib * GIB
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["train"]["micro_batch"] == 4 and saved["train"]["global_batch_tokens"] == 8 * 16
    # two micro-batches of 4 are the same 8 windows and the same normalised loss as one batch of 8
    assert auto.step == explicit.step == 4
    assert math.isclose(auto.final_loss, explicit.final_loss, rel_tol=1e-5)
    assert not (tmp_path / "explicit" / "plan.json").exists()


def test_auto_keeps_a_config_that_fits(tmp_path):
    train(run_config(tmp_path, "roomy"), progress=False)
    plan = json.loads((tmp_path / "roomy" / "plan.json").read_text())
    assert (plan["strategy"], plan["micro_batch"], plan["grad_accum"]) == ("single", 8, 1)
    assert not plan["activation_checkpointing"]


def test_micro_batch_search_by_trial_leaves_weights_and_random_streams_alone():
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import build_model

    model = build_model(ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, max_seq_len=32), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    found = search_micro_batch(model, seq_len=16, vocab_size=64, precision="fp32", start=2, limit=12)
    assert found == 12  # nothing runs out of memory on this machine at these sizes
    assert torch.equal(torch.rand(3), expected_next)
    assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_micro_batch_search_recovers_from_out_of_memory(monkeypatch):
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import build_model

    model = build_model(ModelConfig(vocab_size=64, n_layers=1, d_model=16, n_heads=2, max_seq_len=32), seed=0)
    real_forward = model.forward
    tried = []

    def forward(idx, **kwargs):  # a device that holds at most 5 sequences of 16 tokens
        tried.append(idx.shape[0])
        if idx.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(idx, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    assert search_micro_batch(model, seq_len=16, vocab_size=64, precision="fp32", start=8, limit=32) == 5
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(Exception, match="micro-batch 1"):
        tried.clear()
        monkeypatch.setattr(
            model, "forward", lambda idx, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError())
        )
        search_micro_batch(model, seq_len=16, vocab_size=64, precision="fp32", start=4, limit=8)
