"""A Mixture-of-Experts model through the training loop: its balancing losses reach the gradient, its load is
logged and plotted, the DeepSeek-V3 bias moves and is saved, and a resumed run ends bit for bit where an
uninterrupted one does (bias included); activation checkpointing and compile change nothing."""

import copy
import json

import torch
import torch.nn.functional as F
from memory_loader import loaders, tiny_config
from safetensors.torch import load_file

from lmforge.distributed.parallelize import World, apply_activation_checkpointing
from lmforge.model.moe import moe_layers
from lmforge.model.transformer import build_model
from lmforge.train.experts import ExpertLoad
from lmforge.train.loop import forward_backward, train

CPU = torch.device("cpu")
WORLD = World(rank=0, world_size=1, local_rank=0, device=CPU)
MOE = (
    "model.moe.n_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=24",
    "model.moe.first_dense_layers=1",
    "model.moe.aux_loss_coef=0.01",
    "model.moe.z_loss_coef=0.001",
    "model.moe.bias_update_rate=0.001",
    "model.moe.router=softmax_topk",
    "model.moe.n_shared_experts=1",
)


def test_a_tiny_moe_learns_and_logs_its_expert_load(tmp_path):
    loader, val = loaders()
    result = train(tiny_config(tmp_path / "run", *MOE), loader=loader, val_batches=val, progress=False)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"]
    assert result.val_loss < 0.6 * steps[0]["loss"]
    for r in steps:
        assert r["moe_load_max_mean"] >= 1.0 and r["moe_load_max_mean/layer1"] == r["moe_load_max_mean"]
        assert r["moe_dropped_frac"] == 0.0 and 1.0 < r["moe_aux_loss"] < 4.0  # top_k=2: 2 when balanced
        assert sum(r["moe_tokens_per_expert"][0]) == 4 * 16 * 2  # micro-batch 4 x 16 tokens x top-2
    assert (result.run_dir / "expert_load.png").is_file()
    saved = load_file(result.checkpoint / "model.safetensors")
    bias = saved["layers.1.mlp.expert_bias"]
    steps_taken = bias / 0.001  # each update moves every bias by -1, 0 or +1 times the rate
    assert bias.abs().sum() > 0 and torch.allclose(steps_taken, steps_taken.round(), atol=1e-3)


def test_resume_with_moe_is_exact_bias_included(tmp_path):
    extra = (*MOE, "train.steps=12", "train.ckpt_every=5", "train.eval_every=6")
    loader, val = loaders()
    whole = train(tiny_config(tmp_path / "whole", *extra), loader=loader, val_batches=val, progress=False)
    loader, val = loaders()
    first = train(
        tiny_config(tmp_path / "split", *extra, "train.time_limit_minutes=1e-9"),
        loader=loader,
        val_batches=val,
        progress=False,
    )
    assert first.step == 1
    loader, val = loaders()
    rest = train(
        tiny_config(tmp_path / "split", *extra), resume="auto", loader=loader, val_batches=val, progress=False
    )
    assert rest.final_loss == whole.final_loss
    a = load_file(whole.checkpoint / "model.safetensors")
    b = load_file(rest.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and "layers.1.mlp.expert_bias" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def moe_model():
    cfg = tiny_config("unused", *MOE).model
    return build_model(cfg, seed=0).train()


def test_forward_backward_adds_the_balancing_losses_per_micro_batch_share():
    loader, _ = loaders()
    batches = [loader.next_batch() for _ in range(2)]
    model = moe_model()
    load = ExpertLoad(moe_layers(model))
    loss = forward_backward(
        model, batches, device=CPU, precision="fp32", scaler=None, world=WORLD, expert_load=load
    )

    reference = moe_model()  # equal micro-batches: the mean of (cross-entropy + coefficients x router losses)
    router = moe_layers(reference)[0]
    seen = []
    router.gate.register_forward_hook(lambda module, args, out: seen.append(out))
    full, ce = 0.0, 0.0
    for batch in batches:
        logits = reference(batch.inputs)
        router_logits = seen[-1]  # (N, E)
        fraction = router.last_stats.tokens_per_expert / router_logits.shape[0]
        aux = 4 * (fraction * torch.softmax(router_logits, -1).mean(0)).sum()
        z = torch.logsumexp(router_logits, -1).pow(2).mean()
        ce_b = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        full = full + (ce_b + 0.01 * aux + 0.001 * z) / 2
        ce += float(ce_b.detach()) / 2
    full.backward()
    assert abs(float(loss) - ce) < 1e-5  # the returned loss is the objective's alone
    for name, p in reference.named_parameters():
        assert torch.allclose(model.get_parameter(name).grad, p.grad, atol=1e-7, rtol=1e-5), name
    assert load.forwards == 2 and int(load.tokens[0].sum()) == 2 * 4 * 16 * 2


def test_activation_checkpointing_and_compile_give_the_same_gradients():
    loader, _ = loaders()
    batch = loader.next_batch()

    def grads(model):
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1))
        (loss + moe_layers(model)[0].last_stats.loss).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    base = moe_model()
    reference = grads(copy.deepcopy(base))
    checkpointed = copy.deepcopy(base)
    apply_activation_checkpointing(checkpointed.layers)
    compiled = copy.deepcopy(base)
    for block in compiled.layers:
        block.compile(backend="eager")  # dynamo's tracing (side effects, the grouped matmul), no codegen
    for model in (checkpointed, compiled):
        got = grads(model)
        for name, ref in reference.items():
            assert torch.allclose(got[name], ref, atol=1e-7), name
