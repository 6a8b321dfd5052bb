"""Planning Mixture-of-Experts models: expert state split by EP, the all-to-all, EP in the layout search."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lmforge.cli import main
from lmforge.config import PRESETS, Config, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from lmforge.errors import ConfigError
from lmforge.model.info import model_flops_per_token
from lmforge.plan.hardware import INTERCONNECTS, KNOWN_HARDWARE
from lmforge.plan.memory import Layout, memory_breakdown, param_counts
from lmforge.plan.planner import Cluster, Workload, all_to_all_bytes, plan_cluster, step_timing
from lmforge.plan.training import plan_training

H100 = KNOWN_HARDWARE["H100-80GB"]
# 2 layers, d 64, 4 heads, 4 routed experts of hidden 32 (top-2), untied vocabulary of 512.
SMALL = ModelConfig(
    vocab_size=512, max_seq_len=128, n_layers=2, d_model=64, n_heads=4, ffn_hidden=128, tie_embeddings=False,
    moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32),
)  # fmt: skip
# By hand: attention 4 x 64 x 64 + two norms of 64; router 4 x 64; routed 4 x 3 x 64 x 32.
BLOCK_SHARED = 4 * 64 * 64 + 2 * 64 + 4 * 64  # 16,768
BLOCK_EXPERTS = 4 * 3 * 64 * 32  # 24,576
TOTAL = 2 * (BLOCK_SHARED + BLOCK_EXPERTS) + 2 * 512 * 64 + 64  # 148,288
EXPERTS = 2 * BLOCK_EXPERTS  # 49,152


def test_small_moe_counts_by_hand():
    params = param_counts(SMALL)
    assert (params.total, params.experts) == (TOTAL, EXPERTS) == (148_288, 49_152)
    assert params.active == TOTAL - 2 * 2 * 3 * 64 * 32  # two of four experts in each of two layers
    assert params.gathered_block(1) == BLOCK_SHARED + BLOCK_EXPERTS
    assert params.gathered_block(2) == BLOCK_SHARED + BLOCK_EXPERTS // 2  # FSDP gathers only local experts


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_state_is_divided_by_ep_and_the_rest_is_replicated_under_ddp(ep):
    layout = Layout(strategy="ddp", world_size=4, ep=ep, micro_batch=1, seq_len=64, device_kind="cuda")
    memory = memory_breakdown(SMALL, layout)
    state = (TOTAL - EXPERTS) + EXPERTS / ep  # parameters one process holds
    assert memory.weights == int(4 * state)  # fp32 master weights
    assert memory.optimizer == int(8 * state)  # two fp32 AdamW moments


def test_under_fsdp_the_ranks_holding_the_same_experts_shard_them_too():
    for ep in (1, 2, 4):
        layout = Layout(strategy="fsdp", world_size=8, ep=ep, micro_batch=1, seq_len=64, device_kind="cuda")
        assert memory_breakdown(SMALL, layout).weights == int(4 * TOTAL / 8)  # ep x (dp / ep) = all ranks


def test_all_to_all_bytes_by_hand():
    # moe-1t on one rank: micro-batch 2 x seq 4096 tokens, top-8, d 7168, bf16, EP 64:
    # 8,192 x 8 copies of 7,168 x 2 bytes = 939,524,096 bytes, of which 63/64 leave the rank.
    assert all_to_all_bytes(8192, 8, 7168, 2, 64) == 924_844_032
    assert all_to_all_bytes(8192, 8, 7168, 2, 1) == 0


def test_all_to_all_time_inside_a_node_and_across_nodes():
    cfg = PRESETS["mixtral-8x7b"]
    tokens, nbytes = 4096, 4096 * 2 * 4096 * 2  # micro-batch 1 x seq 4096, top-2, d 4096, bf16
    # Inside one node (EP 8 of 8 GPUs): NVLink at 80% of 450 GB/s plus 10 us, 4 times per MoE layer
    # (dispatch and combine, forward and backward), 32 MoE layers.
    one_node = Layout(strategy="fsdp", world_size=8, ep=8, micro_batch=1, seq_len=tokens)
    t = step_timing(cfg, one_node, Cluster(hardware=H100, gpus=8))
    assert t.all_to_all_s == pytest.approx(4 * 32 * (nbytes * 7 / 8 / (450e9 * 0.8) + 10e-6))
    # EP 16 across two nodes: 7 of 15 peers over NVLink, 8 over InfiniBand (50 GB/s per GPU), at once.
    ib = INTERCONNECTS["infiniband"]
    two_nodes = dataclasses.replace(one_node, world_size=16, ep=16, activation_checkpointing=True)
    t = step_timing(cfg, two_nodes, Cluster(hardware=H100, gpus=16, interconnect=ib))
    sent = nbytes * 15 / 16
    across = sent * 8 / 15 / (50e9 * 0.8)
    assert across > sent * 7 / 15 / (450e9 * 0.8)
    assert t.all_to_all_s == pytest.approx(6 * 32 * (across + 20e-6))  # + the recomputed forward's two
    assert t.all_to_all_s <= t.communication_s


def test_compute_and_mfu_follow_the_active_parameters():
    cfg = PRESETS["mixtral-8x7b"]
    report = plan_cluster(
        cfg, Cluster(hardware=H100, gpus=64), Workload(seq_len=4096, global_batch_tokens=4_000_000)
    )
    assert report.active_parameters == 12_879_925_248
    assert report.flops_per_token == model_flops_per_token(cfg, 4096)  # 6 x active (no lookups) + attention
    t = report.chosen.timing
    assert t.mfu == pytest.approx(report.flops_per_token * t.tokens_per_s_per_gpu / H100.peak_flops)
    # 20 tokens per active parameter when --tokens is not given
    assert report.total_tokens == 20 * 12_879_925_248


def test_expert_parallelism_is_chosen_when_the_experts_do_not_fit_otherwise():
    cfg = PRESETS["moe-1t"]
    cluster = Cluster(hardware=H100, gpus=512)
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000, total_tokens=10**12)
    without = plan_cluster(cfg, cluster, workload, ep_degrees=(1,))
    assert without.chosen is None  # one FSDP block gathers all 384 experts: 17B parameters
    report = plan_cluster(cfg, cluster, workload)
    assert report.chosen is not None and report.chosen.layout.ep > 1
    assert not any(c.fits for c in report.candidates if c.layout.ep == 1)
    assert {c.layout.ep for c in report.candidates} == {1, 2, 4, 8, 16, 32, 64, 128}  # divide 512 and 384
    assert cfg.moe.n_experts % report.chosen.layout.ep == 0


def test_an_invalid_expert_parallel_degree_is_a_clear_error():
    cluster = Cluster(hardware=H100, gpus=12)
    workload = Workload(seq_len=4096, global_batch_tokens=4_000_000)
    with pytest.raises(ConfigError, match=r"--ep 3 must divide model.moe.n_experts=8 .*valid here: 1, 2, 4"):
        plan_cluster(PRESETS["mixtral-8x7b"], cluster, workload, ep_degrees=(3,))
    with pytest.raises(ConfigError, match="needs a Mixture-of-Experts model"):
        plan_cluster(PRESETS["7b"], cluster, workload, ep_degrees=(2,))
    train = TrainConfig(seq_len=64, micro_batch=1)
    bad = Config(model=SMALL, train=train, parallel=ParallelConfig(ep=3))
    with pytest.raises(ConfigError, match=r"parallel.ep=3 must divide model.moe.n_experts=4"):
        plan_training(bad, device_kind="cpu", world_size=6, device_memory_bytes=None)


def test_plan_training_keeps_the_configured_expert_parallel_degree():
    cfg = Config(model=SMALL, train=TrainConfig(seq_len=64, micro_batch=2), parallel=ParallelConfig(ep=2))
    plan = plan_training(cfg, device_kind="cpu", world_size=4, device_memory_bytes=None)
    assert plan.ep == 2 and "EP=2" in plan.describe()


def test_plan_cli_prints_the_expert_parallel_degree(capsys):
    args = ["plan", "--model", "mixtral-8x7b", "--gpus", "64", "--seq", "4096", "--tokens", "1T"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "12,879,925,248 active per token" in text and "expert-parallel " in text
    assert main([*args, "--ep", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["ep"] for c in out["candidates"]} == {8} and out["chosen"]["ep"] == 8
    assert out["active_parameters"] == 12_879_925_248
