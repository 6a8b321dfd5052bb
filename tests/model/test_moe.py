"""The Mixture-of-Experts feed-forward (model/moe.py) against a naive reference written independently: one
token at a time, the softmax and the top-k by hand in float64, each chosen expert run as its own SwiGLU."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.model.fused import apply_fused_blocks
from lmforge.model.moe import GroupedExperts, MoEFeedForward, moe_layers, router_loss
from lmforge.model.transformer import FeedForward, build_model
from lmforge.shapes import MoEConfig

VOCAB = 53


def tiny(**moe) -> ModelConfig:
    """Odd shapes: d_model 36, 7 experts of hidden 20, a dense first layer."""
    settings = dict(n_experts=7, top_k=2, expert_hidden=20, first_dense_layers=1)
    return ModelConfig(
        vocab_size=VOCAB,
        max_seq_len=16,
        n_layers=3,
        d_model=36,
        n_heads=3,
        ffn_hidden=44,
        moe=MoEConfig(**{**settings, **moe}),
    )


def layer_of(cfg: ModelConfig, dtype=torch.float32) -> MoEFeedForward:
    model = build_model(cfg, seed=2).to(dtype)
    layer = model.layers[1].mlp
    assert isinstance(layer, MoEFeedForward)
    with torch.no_grad():  # spread the router: initialisation leaves the choice nearly random
        layer.gate.weight.mul_(20)
    return layer


def swiglu(x, gate_w, up_w, down_w):
    return (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


@torch.no_grad()
def reference(layer: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]], int]:
    """Per-token output (N, C) in float64, each token's chosen experts, and the dropped assignments."""
    moe = layer.moe
    E, K = moe.n_experts, moe.top_k
    x = x.reshape(-1, x.shape[-1]).double()
    W = layer.gate.weight.double()
    gate_up, down = layer.experts.gate_up_proj.double(), layer.experts.down_proj.double()
    F_ = down.shape[-1]
    bias = layer.expert_bias.double().tolist() if moe.bias_update_rate > 0 else [0.0] * E
    N = x.shape[0]
    choices, weights = [], []
    for n in range(N):
        logits = [float(W[e] @ x[n]) for e in range(E)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [v / sum(exps) for v in exps]
        chosen = sorted(range(E), key=lambda e: -(probs[e] + bias[e]))[:K]
        if moe.router == "topk_softmax":
            w = [math.exp(logits[e] - top) for e in chosen]
            w = [v / sum(w) for v in w]
        else:
            w = [probs[e] for e in chosen]
            if moe.norm_topk_prob:
                w = [v / sum(w) for v in w]
        choices.append(chosen)
        weights.append(w)
    capacity = math.ceil(moe.capacity_factor * N * K / E) if moe.capacity_factor else N * K
    taken = [0] * E
    keep = [[False] * K for _ in range(N)]
    for slot in range(K):  # first choices have priority over second choices
        for n in range(N):
            e = choices[n][slot]
            if taken[e] < capacity:
                taken[e] += 1
                keep[n][slot] = True
    out = torch.zeros_like(x)
    for n in range(N):
        for slot, e in enumerate(choices[n]):
            if keep[n][slot]:
                y = swiglu(x[n], gate_up[e, :F_], gate_up[e, F_:], down[e])
                out[n] += weights[n][slot] * y
        if layer.shared_expert is not None:
            s = layer.shared_expert
            y = swiglu(
                x[n], s.gate_proj.weight.double(), s.up_proj.weight.double(), s.down_proj.weight.double()
            )
            if layer.shared_expert_gate is not None:
                y = y * torch.sigmoid(layer.shared_expert_gate.weight.double()[0] @ x[n])
            out[n] += y
    dropped = sum(not k for row in keep for k in row)
    return out, choices, dropped


def inputs(cfg: ModelConfig, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(seed)).to(dtype)


CASES = {
    "mixtral": dict(router="topk_softmax"),
    "qwen2-moe": dict(
        router="softmax_topk", n_shared_experts=1, shared_expert_hidden=28, shared_expert_gate=True
    ),
    "qwen3-moe": dict(router="softmax_topk", norm_topk_prob=True, top_k=3),
    "deepseek-shared": dict(router="softmax_topk", norm_topk_prob=True, n_shared_experts=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["grouped_mm", "loop"])
def test_matches_the_per_token_reference(case, dtype):
    cfg = tiny(**CASES[case])
    layer = layer_of(cfg, dtype).train()
    x = inputs(cfg, dtype)
    out = layer(x)
    expected, _, dropped = reference(layer, x)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert (out.reshape(-1, x.shape[-1]).double() - expected).abs().max() < tol
    stats = layer.last_stats
    assert int(stats.dropped) == dropped == 0
    assert int(stats.tokens_per_expert.sum()) == x.shape[0] * x.shape[1] * layer.moe.top_k


def test_capacity_drops_the_same_assignments_as_the_reference():
    layer = layer_of(tiny(capacity_factor=0.6)).train()
    x = inputs(tiny(), seed=4)
    out = layer(x)
    expected, _, dropped = reference(layer, x)
    assert dropped > 0
    assert int(layer.last_stats.dropped) == dropped
    assert (out.reshape(-1, x.shape[-1]).double() - expected).abs().max() < 2e-5
    dropless, _, _ = reference(layer_of(tiny()), x)  # the same weights without the limit
    assert (layer.eval()(x).reshape(-1, x.shape[-1]).double() - dropless).abs().max() < 2e-5  # eval: dropless


def test_expert_bias_steers_the_choice_but_not_the_weights():
    layer = layer_of(tiny(router="softmax_topk", bias_update_rate=0.01)).train()
    x = inputs(tiny())
    _, before, _ = reference(layer, x)
    with torch.no_grad():
        layer.expert_bias[5] = 10.0  # every token now picks expert 5
    out = layer(x)
    expected, after, _ = reference(layer, x)
    assert all(5 in chosen for chosen in after) and after != before
    assert (out.reshape(-1, x.shape[-1]).double() - expected).abs().max() < 2e-5
    assert int(layer.last_stats.tokens_per_expert[5]) == x.shape[0] * x.shape[1]


def test_bias_update_moves_towards_balance_by_the_sign_rule():
    layer = layer_of(tiny(bias_update_rate=0.25))
    layer.update_expert_bias(torch.tensor([10, 0, 3, 3, 3, 2, 7]))  # mean 4
    assert layer.expert_bias.tolist() == [-0.25, 0.25, 0.25, 0.25, 0.25, 0.25, -0.25]
    still = layer_of(tiny())  # rate 0: balancing by bias is off
    still.update_expert_bias(torch.tensor([10, 0, 3, 3, 3, 2, 7]))
    assert still.expert_bias.abs().sum() == 0
    assert "layers.1.mlp.expert_bias" in build_model(tiny(), seed=0).state_dict()  # saved in checkpoints


def test_balancing_losses_match_their_formulas_and_reach_the_router():
    cfg = tiny(aux_loss_coef=0.01, z_loss_coef=0.001)
    layer = layer_of(cfg).train()
    x = inputs(cfg)
    layer(x)
    stats = layer.last_stats
    logits = x.reshape(-1, cfg.d_model).double() @ layer.gate.weight.detach().double().T  # (N, E)
    probs = torch.softmax(logits, -1)
    _, choices, _ = reference(layer, x)
    N, E = logits.shape[0], cfg.moe.n_experts
    counts = torch.zeros(E, dtype=torch.float64)
    for chosen in choices:
        counts[chosen] += 1
    aux = E * ((counts / N) * probs.mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.equal(stats.tokens_per_expert, counts.long())
    assert abs(float(stats.aux_loss) - float(aux)) < 1e-5
    assert abs(float(stats.z_loss) - float(z)) < 1e-4 * float(z)
    assert abs(float(stats.loss.detach()) - (0.01 * float(aux) + 0.001 * float(z))) < 1e-5
    stats.loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0
    assert router_loss([layer]) is stats.loss or torch.equal(router_loss([layer]), stats.loss)
    layer.eval()
    layer.last_stats = None
    layer(x)
    assert layer.last_stats is None  # evaluation leaves no stats


@pytest.mark.parametrize("aux_coef, z_coef", [(0.01, 0.0), (0.0, 0.001)], ids=["aux-only", "z-only"])
def test_each_balancing_term_alone_reaches_the_router_with_its_autograd_gradient(aux_coef, z_coef):
    """The router's gradient from ``router_loss`` against autograd of the formulas in float64 (the choice,
    a step function, is held fixed): either coefficient alone is enough for the term to be trained."""
    cfg = tiny(aux_loss_coef=aux_coef, z_loss_coef=z_coef)
    layer = layer_of(cfg).train()
    x = inputs(cfg)
    layer(x)
    loss = router_loss([layer])
    assert loss is not None
    loss.backward()
    W = layer.gate.weight.detach().double().requires_grad_()
    logits = x.reshape(-1, cfg.d_model).double() @ W.T  # (N, E)
    _, choices, _ = reference(layer, x)
    N, E = logits.shape[0], cfg.moe.n_experts
    counts = torch.zeros(E, dtype=torch.float64)
    for chosen in choices:
        counts[chosen] += 1
    aux = E * ((counts / N) * torch.softmax(logits, -1).mean(0)).sum()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    expected = aux_coef * aux + z_coef * z
    expected.backward()
    assert W.grad.abs().max() > 0
    torch.testing.assert_close(layer.gate.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-9)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_a_no_grad_pass_in_training_mode_keeps_the_stats_of_the_training_forward():
    cfg = tiny(aux_loss_coef=0.01)
    layer = layer_of(cfg).train()
    layer(inputs(cfg))
    stats = layer.last_stats
    with torch.no_grad():  # a probe or a frozen reference, still in training mode
        layer(inputs(cfg, seed=9))
    assert layer.last_stats is stats and stats.loss.requires_grad


class TwoRankDispatcher:
    """Expert parallelism over two pretend ranks in one process: this layer keeps experts [0:split], the
    "other rank" holds the rest and computes its share here, as an all-to-all dispatcher would remotely."""

    def __init__(self, remote: GroupedExperts, split: int):
        self.remote, self.split = remote, split

    def dispatch(self, tokens, counts):
        local_rows = int(counts[: self.split].sum())
        remote_out = self.remote(tokens[local_rows:], counts[self.split :])
        return tokens[:local_rows], counts[: self.split], remote_out

    def combine(self, outputs, handle):
        return torch.cat([outputs, handle])


def test_a_swapped_dispatcher_runs_a_subset_of_experts_per_rank():
    cfg = tiny(router="softmax_topk", n_shared_experts=1)
    layer = layer_of(cfg).train()
    x = inputs(cfg)
    whole = layer(x)
    split = 3
    full = layer.experts
    local, remote = GroupedExperts(split, cfg.d_model, 20), GroupedExperts(7 - split, cfg.d_model, 20)
    with torch.no_grad():
        local.gate_up_proj.copy_(full.gate_up_proj[:split])
        local.down_proj.copy_(full.down_proj[:split])
        remote.gate_up_proj.copy_(full.gate_up_proj[split:])
        remote.down_proj.copy_(full.down_proj[split:])
    layer.experts, layer.dispatcher = local, TwoRankDispatcher(remote, split)
    assert torch.allclose(layer(x), whole, atol=1e-6)


def test_the_model_switch_first_dense_layers_and_fused_blocks():
    cfg = tiny(n_shared_experts=1)
    model = build_model(cfg, seed=0).train()
    assert type(model.layers[0].mlp) is FeedForward
    assert [type(b.mlp) for b in model.layers[1:]] == [MoEFeedForward, MoEFeedForward]
    assert len(moe_layers(model)) == 2
    assert apply_fused_blocks(model) == 1  # only the dense block; the MoE blocks stay plain
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = model(idx)
    F.cross_entropy(logits.reshape(-1, VOCAB), idx.reshape(-1)).backward()
    experts = model.layers[2].mlp.experts
    assert experts.gate_up_proj.grad.abs().amax(dim=(1, 2)).gt(0).sum() >= 2
    assert model.layers[2].mlp.experts.down_proj.std() < model.layers[2].mlp.experts.gate_up_proj.std()


def test_decoding_with_a_kv_cache_matches_the_full_forward():
    from lmforge.model.transformer import KVCache

    cfg = tiny(router="softmax_topk", n_shared_experts=1, capacity_factor=0.5)  # eval: no capacity limit
    model = build_model(cfg, seed=3).eval()
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = KVCache.empty(cfg, 2, 16, device=torch.device("cpu"), dtype=torch.float32)
        steps = [model(idx[:, :6], cache=cache)] + [
            model(idx[:, t : t + 1], cache=cache) for t in range(6, 10)
        ]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_moe_needs_swiglu_experts():
    gelu = ModelConfig(
        vocab_size=VOCAB, n_layers=1, d_model=36, n_heads=3, ffn="gelu", moe=MoEConfig(n_experts=4)
    )
    assert any("needs model.ffn=swiglu" in p for p in gelu.problems())
    assert not tiny().problems()
