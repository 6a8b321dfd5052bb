"""muP in training: AdamW's per-layer learning rates and weight decay, the base width training exactly as
the standard model, the loop applying the groups' scales, and the coordinate check of Tensor Programs V
(activation updates stay flat with width under muP and grow without it)."""

import pytest
import torch
import torch.nn.functional as F
from memory_loader import loaders, tiny_config
from safetensors.torch import load_file

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model.transformer import build_model
from lmforge.train.loop import run_loop, train
from lmforge.train.optim import build_optimizer, lr_at, param_groups, set_lr
from lmforge.train.run import Task, setup_run

CPU = torch.device("cpu")
VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Small matmuls gain nothing from a second thread, and on a shared CPU two threads run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(width: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, max_seq_len=32, n_layers=2, d_model=width, n_heads=4, ffn_hidden=2 * width)
    return ModelConfig(**{**base, **overrides})


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(seed))


def adam_steps(model, optimizer, idx: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_mup_groups_hidden_matrices_with_lr_over_m_and_decay_times_m():
    model = build_model(tiny(128, mup=True, mup_base_width=32, tie_embeddings=False))  # m = 4
    hidden, matrices, vectors = param_groups(model, 0.1, width_mult=4.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in matrices["params"]} == {"embed_tokens.weight", "lm_head.weight"}
    assert {names[id(p)] for p in hidden["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n
    }
    assert all(p.dim() == 1 for p in vectors["params"])
    assert (hidden["lr_scale"], hidden["weight_decay"]) == (0.25, pytest.approx(0.4))
    assert (matrices["lr_scale"], matrices["weight_decay"]) == (1.0, 0.1)
    assert (vectors["lr_scale"], vectors["weight_decay"]) == (1.0, 0.0)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.1), CPU, width_mult=4.0)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25e-3, 1e-3, 1e-3]
    set_lr(optimizer, 2e-3)  # what the loop does every step
    assert [g["lr"] for g in optimizer.param_groups] == [0.5e-3, 2e-3, 2e-3]
    # the decoupled decay per step, lr * wd, is the same for every group that decays
    assert optimizer.param_groups[0]["lr"] * optimizer.param_groups[0]["weight_decay"] == pytest.approx(2e-4)


def test_one_adamw_step_moves_each_group_by_its_own_lr():
    """Adam's first step is lr * g / (|g| + eps) plus the decay lr * wd * p: hand-computed per parameter."""
    model = build_model(tiny(128, mup=True, mup_base_width=32, tie_embeddings=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd, eps = 1e-3, 0.1, 1e-8
    optimizer = build_optimizer(model, TrainConfig(lr=lr, weight_decay=wd, eps=eps), CPU, width_mult=4.0)
    adam_steps(model, optimizer, batch(), 1)
    for name, p in model.named_parameters():
        g = p.grad
        hidden = p.dim() == 2 and "proj" in name
        group_lr = lr / 4 if hidden else lr
        group_wd = (wd * 4 if hidden else wd) if p.dim() == 2 else 0.0
        expected = before[name] * (1 - group_lr * group_wd) - group_lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8, msg=name)


def test_at_the_base_width_mup_trains_exactly_as_the_standard_model():
    runs = []
    for mup in (False, True):
        cfg = tiny(64, mup=mup, mup_base_width=64)
        model = build_model(cfg, seed=0)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2), CPU, width_mult=cfg.mup_width_mult)
        adam_steps(model, optimizer, batch(), 3)
        runs.append(model.state_dict())
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name


def test_the_training_loop_gives_each_group_its_scaled_learning_rate(tmp_path):
    cfg = tiny_config(tmp_path / "run", "model.mup=true", "model.mup_base_width=16", "train.steps=4")
    train_loader, val_batches = loaders()
    run = setup_run(cfg, task=Task(loader=train_loader, val_batches=val_batches))
    try:
        assert cfg.model.mup_width_mult == 2.0
        assert [g["lr_scale"] for g in run.optimizer.param_groups] == [0.5, 1.0, 1.0]
        result = run_loop(run)
        last = lr_at(result.step - 1, cfg.train)
        assert [g["lr"] for g in run.optimizer.param_groups] == [last / 2, last, last]
    finally:
        run.close()


def test_a_mup_run_resumes_exactly(tmp_path):
    """The groups' lr_scale travels in the optimizer's state: stopped after step 1 and resumed, a muP run
    ends bit for bit where an uninterrupted one does."""
    mup = ("model.mup=true", "model.mup_base_width=16", "train.steps=6", "train.ckpt_every=3")
    train_loader, val = loaders()
    whole = train(tiny_config(tmp_path / "whole", *mup), loader=train_loader, val_batches=val, progress=False)
    train_loader, val = loaders()
    first = train(
        tiny_config(tmp_path / "split", *mup, "train.time_limit_minutes=1e-9"),
        loader=train_loader,
        val_batches=val,
        progress=False,
    )
    assert first.stopped_by == "time limit" and first.step == 1
    train_loader, val = loaders()
    rest = train(
        tiny_config(tmp_path / "split", *mup),
        resume="auto",
        loader=train_loader,
        val_batches=val,
        progress=False,
    )
    assert rest.step == whole.step == 6 and rest.final_loss == whole.final_loss
    a = load_file(whole.checkpoint / "model.safetensors")
    b = load_file(rest.checkpoint / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the coordinate check ----------------------------------------------------------------------------------


def coordinates(width: int, mup: bool) -> tuple[float, float]:
    """After 5 Adam steps at lr 1e-2 on a fixed batch: the std of the change of the logits, and the mean
    |change| of the last block's output (the residual stream), against the model at initialisation."""
    cfg = tiny(width, mup=mup, mup_base_width=64)
    model = build_model(cfg, seed=0)
    optimizer = build_optimizer(
        model, TrainConfig(lr=1e-2, weight_decay=0.0), CPU, width_mult=cfg.mup_width_mult
    )
    idx = batch()[:, :-1]
    outputs = []
    hook = model.layers[-1].register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    with torch.no_grad():
        logits_before = model(idx)
    adam_steps(model, optimizer, batch(), 5)
    with torch.no_grad():
        logits_after = model(idx)
    hook.remove()
    block_before, block_after = outputs[0], outputs[-1]
    return (logits_after - logits_before).std().item(), (block_after - block_before).abs().mean().item()


def test_coordinate_check_activations_stay_flat_with_width_under_mup_and_grow_without():
    """Tensor Programs V's coordinate check, widths 64 -> 512 (base 64). Measured (seed 0): logits change
    std ratio 512/64 = 0.94 with muP, 4.7 without; block output change ratio 1.1 with muP, 376 without."""
    torch.manual_seed(0)
    with_mup = {w: coordinates(w, True) for w in (64, 128, 256, 512)}
    standard = {w: coordinates(w, False) for w in (64, 512)}
    assert with_mup[64] == standard[64]  # at the base width muP is the standard model
    for w in (128, 256, 512):  # flat: within a factor 2 of the base width at every width
        for i in (0, 1):
            assert 0.5 < with_mup[w][i] / with_mup[64][i] < 2.0, (w, i, with_mup)
    assert standard[512][0] / standard[64][0] > 3.0, standard  # the logits' updates grow with width
    assert standard[512][1] / standard[64][1] > 20.0, standard  # and the residual stream's blow up
