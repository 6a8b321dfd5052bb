"""Pure functions from (model config, hardware, cluster, batch) to a plan: strategy, micro-batch, time, cost.

For each candidate layout (DDP, FSDP, with activation checkpointing, with CPU offload, with tensor
parallelism) the planner finds the largest micro-batch that fits the device's memory (memory.py), then
predicts the step time from three parts:
  compute        training FLOPs (plus the recomputed forward under checkpointing) at the device's bf16
                 peak times an achievable fraction (``Hardware.compute_efficiency``)
  memory-bound   element-wise kernels, as three passes over the saved activations at the memory bandwidth
  communication  ring collectives over the slowest link the ring crosses (NVLink inside a node, the
                 interconnect between nodes) at 80% of its bandwidth plus a latency per collective; FSDP's
                 all-gathers and reduce-scatters overlap with compute, DDP's all-reduce with the backward
The fastest layout that fits is the plan. ``plan.training`` applies the same model to ``lmforge train``.
Each layout's run also gets its energy and emissions (``plan.energy``): board power at the step's busy
fraction (compute and memory-bound time over the whole step), node overhead, PUE and grid intensity.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.model.info import (
    count_active_params,
    count_params,
    model_flops_per_token,
    moe_layers,
    moe_params,
)
from lmforge.plan.energy import EnergyEstimate, EnergySettings, run_energy
from lmforge.plan.hardware import GIB, INTERCONNECTS, Hardware, Interconnect
from lmforge.plan.memory import Layout, MemoryBreakdown, memory_breakdown, param_counts

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens ~ 20 x parameters
LINK_EFFICIENCY = 0.8  # achieved / nominal bandwidth of NCCL ring collectives
PREFER_SIMPLER = 1.05  # a more complex layout is chosen only when predicted >5% faster
ALLOCATOR_SLACK = 0.05  # CUDA caching-allocator fragmentation, as a fraction of the tensor peak


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The machines a run gets: ``gpus`` devices of one kind, ``gpus_per_node`` to a node."""

    hardware: Hardware
    gpus: int = 1
    gpus_per_node: int = 8
    interconnect: Interconnect = INTERCONNECTS["infiniband"]
    price_per_gpu_hour: float | None = None
    energy: EnergySettings = EnergySettings()

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What to train: sequence length, tokens per optimizer step, total tokens (None: compute-optimal)."""

    seq_len: int
    global_batch_tokens: int
    total_tokens: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"


@dataclass(frozen=True, kw_only=True)
class Corrections:
    """Measured / predicted ratios from a probe run: they scale the memory model and the step time."""

    memory_scale: float = 1.0
    time_scale: float = 1.0


@dataclass(frozen=True)
class Timing:
    """Seconds per optimizer step and what they are made of."""

    compute_s: float
    memory_bound_s: float
    communication_s: float  # exposed (not hidden behind compute)
    offload_s: float
    optimizer_s: float
    step_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    all_to_all_s: float = 0.0  # MoE dispatch and combine under expert parallelism (in communication_s)

    @property
    def utilisation(self) -> float:
        """The fraction of the step the device computes (matmuls and element-wise kernels): what its power
        draw follows. Exposed communication, offload copies and the optimizer count as waiting."""
        return (self.compute_s + self.memory_bound_s) / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"utilisation": self.utilisation}


@dataclass(frozen=True)
class Candidate:
    """One layout: the micro-batch it can run, its memory at that micro-batch, and its speed if it fits."""

    name: str
    layout: Layout
    memory: MemoryBreakdown
    capacity_bytes: int
    memory_scale: float
    timing: Timing | None

    @property
    def predicted_bytes(self) -> int:
        return int(self.memory.total * self.memory_scale)

    @property
    def fits(self) -> bool:
        return self.timing is not None

    @property
    def over_bytes(self) -> int:
        return max(0, self.predicted_bytes - self.capacity_bytes)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "strategy": self.layout.strategy,
            "tp": self.layout.tp,
            "ep": self.layout.ep,
            "activation_checkpointing": self.layout.activation_checkpointing,
            "cpu_offload": self.layout.cpu_offload,
            "micro_batch": self.layout.micro_batch,
            "grad_accum": self.layout.grad_accum,
            "fits": self.fits,
            "memory": self.memory.to_dict()
            | {"predicted": self.predicted_bytes, "capacity": self.capacity_bytes},
            "over_bytes": self.over_bytes,
            "timing": self.timing.to_dict() if self.timing else None,
        }


@dataclass(frozen=True)
class Report:
    """Everything ``lmforge plan`` prints: the candidates, the chosen one, and the run's totals."""

    model: ModelConfig
    cluster: Cluster
    workload: Workload
    parameters: int
    flops_per_token: float
    sequences_per_step: int  # the global batch actually used (rounded to what the layout can split)
    candidates: list[Candidate]
    chosen: Candidate | None
    total_tokens: int
    chinchilla_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return math.ceil(self.total_tokens / (self.sequences_per_step * self.workload.seq_len))

    @property
    def wall_seconds(self) -> float | None:
        return self.chosen.timing.step_s * self.steps if self.chosen else None

    @property
    def gpu_hours(self) -> float | None:
        return self.wall_seconds * self.cluster.gpus / 3600 if self.chosen else None

    @property
    def cost(self) -> float | None:
        if self.chosen is None or self.cluster.price_per_gpu_hour is None:
            return None
        return self.gpu_hours * self.cluster.price_per_gpu_hour

    def steps_of(self, candidate: Candidate) -> int:
        """Optimizer steps to the run's tokens with ``candidate``'s global batch."""
        lay = candidate.layout
        return math.ceil(self.total_tokens / (lay.micro_batch * lay.grad_accum * lay.dp * lay.seq_len))

    def energy_of(self, candidate: Candidate) -> EnergyEstimate | None:
        """The run's energy and emissions with ``candidate``; None when it does not fit or the hardware
        table has no power figure for the device."""
        hw = self.cluster.hardware
        if candidate.timing is None or hw.power_watts <= 0:
            return None
        seconds = self.steps_of(candidate) * candidate.timing.step_s
        return run_energy(
            hw.power_watts, candidate.timing.utilisation, self.cluster.gpus, seconds, self.cluster.energy
        )

    @property
    def energy(self) -> EnergyEstimate | None:
        return self.energy_of(self.chosen) if self.chosen is not None else None

    def shortfall(self) -> str:
        """Why nothing fits, and by how much the leanest layout is over."""
        leanest = min(self.candidates, key=lambda c: c.predicted_bytes)
        hw = self.cluster.hardware
        over = leanest.over_bytes
        if over == 0:  # the GPUs would hold it, the CPUs cannot hold the offloaded state
            host_need = leanest.memory.host_bytes * min(self.cluster.gpus, self.cluster.gpus_per_node)
            on_gpu = [c for c in self.candidates if not c.layout.cpu_offload]
            text = (
                f"{self.model.preset or 'this model'} ({self.parameters / 1e9:.2f}B parameters, seq "
                f"{self.workload.seq_len}) does not fit {self.cluster.gpus} x {hw.name}: {leanest.name} fits "
                f"the GPU ({leanest.predicted_bytes / GIB:.1f} of {leanest.capacity_bytes / GIB:.1f} GiB at "
                f"micro-batch 1) but its offloaded state needs {host_need / GIB:.0f} GiB of CPU memory per node "
                f"(have {hw.host_memory_gib:.0f} GiB)"
            )
            if on_gpu:
                best = min(on_gpu, key=lambda c: c.predicted_bytes)
                text += (
                    f"; without offload the leanest, {best.name}, needs {best.predicted_bytes / GIB:.1f} GiB "
                    f"per GPU (over by {best.over_bytes / GIB:.1f} GiB)"
                )
            return text + "; use more GPUs, a shorter sequence or a larger device"
        text = (
            f"{self.model.preset or 'this model'} ({self.parameters / 1e9:.2f}B parameters, seq "
            f"{self.workload.seq_len}) does not fit {self.cluster.gpus} x {hw.name} even with {leanest.name} "
            f"at micro-batch 1: it needs {leanest.predicted_bytes / GIB:.1f} GiB per GPU, a {hw.name} has "
            f"{leanest.capacity_bytes / GIB:.1f} GiB, over by {over / GIB:.1f} GiB "
            f"({100 * over / leanest.capacity_bytes:.0f}%)"
        )
        host_need = leanest.memory.host_bytes * min(self.cluster.gpus, self.cluster.gpus_per_node)
        if leanest.layout.cpu_offload and host_need > hw.host_memory_gib * GIB:
            text += (
                f"; its offloaded state also needs {host_need / GIB:.0f} GiB of CPU memory per node "
                f"(have {hw.host_memory_gib:.0f} GiB)"
            )
        return text + "; use more GPUs, a shorter sequence or a larger device"

    @property
    def active_parameters(self) -> int:
        """Parameters one token uses (the total for a dense model; what FLOPs and MFU count)."""
        return count_active_params(self.model)

    def to_dict(self) -> dict:
        chosen = self.chosen.to_dict() if self.chosen else None
        return {
            "model": self.model.preset,
            "parameters": self.parameters,
            "active_parameters": self.active_parameters,
            "flops_per_token": self.flops_per_token,
            "hardware": dataclasses.asdict(self.cluster.hardware),
            "gpus": self.cluster.gpus,
            "gpus_per_node": self.cluster.gpus_per_node,
            "nodes": self.cluster.nodes,
            "interconnect": self.cluster.interconnect.name,
            "seq_len": self.workload.seq_len,
            "precision": self.workload.precision,
            "global_batch_tokens": self.sequences_per_step * self.workload.seq_len,
            "total_tokens": self.total_tokens,
            "chinchilla_tokens": self.chinchilla_tokens,
            "candidates": [
                c.to_dict() | {"energy": _energy_dict(self.energy_of(c))} for c in self.candidates
            ],
            "chosen": chosen,
            "steps": self.steps,
            "wall_seconds": self.wall_seconds,
            "gpu_hours": self.gpu_hours,
            "price_per_gpu_hour": self.cluster.price_per_gpu_hour,
            "cost": self.cost,
            "energy": _energy_dict(self.energy),
            "fits": self.chosen is not None,
            "shortfall": None if self.chosen else self.shortfall(),
            "notes": self.notes,
        }


def _energy_dict(energy: EnergyEstimate | None) -> dict | None:
    return energy.to_dict() if energy is not None else None


# -- time --------------------------------------------------------------------------------------------------


def _ring_seconds(nbytes: float, ranks: int, bandwidth_gbs: float, latency_us: float, factor: float) -> float:
    """A ring all-gather / reduce-scatter (factor 1) or all-reduce (factor 2) of ``nbytes`` over ``ranks``."""
    if ranks <= 1:
        return 0.0
    return factor * (ranks - 1) / ranks * nbytes / (bandwidth_gbs * 1e9 * LINK_EFFICIENCY) + latency_us * 1e-6


def all_to_all_bytes(tokens: float, top_k: int, d_model: int, dtype_bytes: int, ep: int) -> float:
    """Bytes one process sends in one MoE all-to-all (the dispatch, or the combine): each of its tokens goes
    to ``top_k`` experts, and with balanced routing a copy leaves for another rank of the EP group with
    probability ``(ep - 1) / ep``."""
    return tokens * top_k * d_model * dtype_bytes * (ep - 1) / ep


def all_to_all_seconds(nbytes: float, ep: int, local: int, cluster: Cluster) -> float:
    """One all-to-all of ``nbytes`` per process over an EP group with ``local`` of its ``ep`` ranks in each
    node: the share for the node's own ranks crosses NVLink, the rest the interconnect, at the same time."""
    if ep <= 1:
        return 0.0
    hw = cluster.hardware
    local = max(1, min(local, ep))
    if local == ep:
        return nbytes / (hw.link_gbs * 1e9 * LINK_EFFICIENCY) + 10e-6
    between = min(hw.link_gbs, cluster.interconnect.gbs_per_gpu)
    inside = nbytes * (local - 1) / (ep - 1) / (hw.link_gbs * 1e9 * LINK_EFFICIENCY)
    across = nbytes * (ep - local) / (ep - 1) / (between * 1e9 * LINK_EFFICIENCY)
    return max(inside, across) + cluster.interconnect.latency_us * 1e-6


def _compute_seconds(cfg: ModelConfig, layout: Layout, hw: Hardware, hardware_flops: float) -> float:
    """Matmul time of one micro-batch on one process. Small GEMMs under-fill the device: efficiency falls
    as rows / (rows + 256); a routed expert's GEMM has ``tokens x top_k x ep / n_experts`` rows (balanced
    routing), so its FLOPs run at their own efficiency."""
    rows = layout.tokens_per_micro_batch / layout.tp
    efficiency = hw.compute_efficiency * rows / (rows + 256)
    n_moe = moe_layers(cfg)
    if not n_moe:
        return hardware_flops * rows / (hw.peak_flops * efficiency)
    moe = cfg.moe
    expert_flops = 6.0 * n_moe * moe.top_k * moe_params(cfg).one_expert
    if layout.activation_checkpointing:
        expert_flops *= 4 / 3  # the recomputed forward
    expert_rows = layout.tokens_per_micro_batch * moe.top_k * layout.ep / moe.n_experts
    expert_efficiency = hw.compute_efficiency * expert_rows / (expert_rows + 256)
    padded = expert_flops * (moe.capacity_factor or 1.0)  # a capacity factor pads every expert's buffer
    return rows * ((hardware_flops - expert_flops) / efficiency + padded / expert_efficiency) / hw.peak_flops


def _all_to_all_per_micro_batch(cfg: ModelConfig, layout: Layout, cluster: Cluster) -> float:
    """Seconds of MoE all-to-all in one micro-batch: dispatch and combine in forward, both again in
    backward (and in the recomputed forward under AC), in every MoE block, on the critical path (nothing
    here overlaps them with compute)."""
    if layout.ep <= 1:
        return 0.0
    per_layer = 4 + (2 if layout.activation_checkpointing else 0)
    compute_bytes = 4 if layout.precision == "fp32" else 2
    nbytes = all_to_all_bytes(
        layout.tokens_per_micro_batch / layout.tp, cfg.moe.top_k, cfg.d_model, compute_bytes, layout.ep
    )
    ep_per_node = max(1, cluster.gpus_per_node // layout.tp)  # EP ranks stride TP ranks (TP in a node)
    return per_layer * moe_layers(cfg) * all_to_all_seconds(nbytes, layout.ep, ep_per_node, cluster)


def step_timing(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, corrections: Corrections | None = None
) -> Timing:
    """Predicted seconds per optimizer step of ``layout`` on ``cluster``."""
    corrections = corrections or Corrections()
    hw = cluster.hardware
    params = param_counts(cfg)
    flops_per_token = model_flops_per_token(cfg, layout.seq_len)
    block = params.per_block
    if params.experts:  # a token meets only the active part of each block
        block = (params.active - params.embedding - params.head) / cfg.n_layers
    block_forward = (2 * block + 4 * cfg.d_model * layout.seq_len) * cfg.n_layers
    hardware_flops = flops_per_token + (block_forward if layout.activation_checkpointing else 0)
    compute = _compute_seconds(cfg, layout, hw, hardware_flops)
    no_ckpt = dataclasses.replace(layout, activation_checkpointing=False)
    memory_bound = (
        3 * memory_breakdown(cfg, no_ckpt).activations_per_micro_batch / (hw.memory_bandwidth_gbs * 1e9)
    )
    local = (compute + memory_bound) * corrections.time_scale

    one_node = layout.world_size <= cluster.gpus_per_node
    bandwidth = hw.link_gbs if one_node else min(hw.link_gbs, cluster.interconnect.gbs_per_gpu)
    latency = 10.0 if one_node else cluster.interconnect.latency_us
    compute_bytes = 4 if layout.precision == "fp32" else 2
    dp, shard_params = layout.dp, (params.total - params.experts) / layout.tp
    # The routed experts are gathered / reduced only among the dp / ep ranks that hold the same ones.
    expert_params, expert_dp = params.experts / (layout.tp * layout.ep), dp // layout.ep
    exposed = 0.0
    step_comm = 0.0
    if layout.strategy == "fsdp":
        # Per micro-batch: all-gather in forward and again in backward, reduce-scatter of fp32 gradients.
        collectives = 3 * (cfg.n_layers + 1) + (3 * moe_layers(cfg) if layout.ep > 1 else 0)
        gather = _ring_seconds(shard_params * compute_bytes, dp, bandwidth, 0.0, 1.0)
        gather += _ring_seconds(expert_params * compute_bytes, expert_dp, bandwidth, 0.0, 1.0)
        scatter = _ring_seconds(shard_params * 4, dp, bandwidth, 0.0, 1.0)
        scatter += _ring_seconds(expert_params * 4, expert_dp, bandwidth, 0.0, 1.0)
        comm = 2 * gather + scatter + collectives * latency * 1e-6 * (dp > 1)
        exposed = max(0.0, comm - local) + comm / (cfg.n_layers + 1)  # the first gather is never hidden
    elif layout.strategy == "ddp":
        allreduce = _ring_seconds(shard_params * 4, dp, bandwidth, latency, 2.0)
        if params.experts:
            allreduce += _ring_seconds(expert_params * 4, expert_dp, bandwidth, latency, 2.0)
        step_comm = max(0.0, allreduce - 2 / 3 * local) + _ring_seconds(25e6, dp, bandwidth, latency, 2.0)
    if layout.tp > 1:  # sequence-parallel all-gathers / reduce-scatters of activations inside each block
        per_layer = 8 + (4 if layout.activation_checkpointing else 0)
        nbytes = layout.tokens_per_micro_batch * cfg.d_model * compute_bytes
        exposed += per_layer * cfg.n_layers * _ring_seconds(nbytes, layout.tp, hw.link_gbs, 10.0, 1.0)
    all_to_all = _all_to_all_per_micro_batch(cfg, layout, cluster)
    exposed += all_to_all

    state_per_gpu = params.per_rank(layout)
    offload = 0.0
    if layout.cpu_offload:
        # fp32 shards copied up for both all-gathers, fp32 gradients copied down; AdamW on the node's CPUs.
        offload = (2 * 4 + 4) * state_per_gpu / (hw.pcie_gbs * 1e9)
        host_share = hw.host_bandwidth_gbs * 1e9 / min(cluster.gpus, cluster.gpus_per_node)
        optimizer = 32 * state_per_gpu / host_share
    else:
        optimizer = 36 * state_per_gpu / (hw.memory_bandwidth_gbs * 1e9)  # read p, g, m, v; write p, m, v
    step = layout.grad_accum * (local + exposed + offload) + step_comm + optimizer
    tokens = layout.tokens_per_micro_batch * layout.grad_accum * dp
    per_gpu = tokens / step / layout.world_size
    return Timing(
        compute_s=layout.grad_accum * compute * corrections.time_scale,
        memory_bound_s=layout.grad_accum * memory_bound * corrections.time_scale,
        communication_s=layout.grad_accum * exposed + step_comm,
        offload_s=layout.grad_accum * offload + (optimizer if layout.cpu_offload else 0.0),
        optimizer_s=0.0 if layout.cpu_offload else optimizer,
        step_s=step,
        tokens_per_s=tokens / step,
        tokens_per_s_per_gpu=per_gpu,
        mfu=flops_per_token * per_gpu / hw.peak_flops,
        all_to_all_s=layout.grad_accum * all_to_all,
    )


# -- memory fit --------------------------------------------------------------------------------------------


def predicted_memory(cfg: ModelConfig, layout: Layout, hw: Hardware) -> MemoryBreakdown:
    """The memory model with the device's fixed overhead and (on CUDA) allocator slack."""
    slack = ALLOCATOR_SLACK if hw.kind == "cuda" else 0.0
    return memory_breakdown(cfg, layout, overhead_bytes=int(hw.overhead_gib * GIB), slack=slack)


def largest_micro_batch(
    cfg: ModelConfig, layout: Layout, hw: Hardware, limit: int, capacity: float, memory_scale: float = 1.0
) -> int:
    """The largest micro-batch <= ``limit`` whose predicted memory fits ``capacity`` bytes (0: none)."""

    def fits(mb: int) -> bool:
        grad_accum = max(layout.grad_accum, 2 if mb < limit else 1)
        trial = dataclasses.replace(layout, micro_batch=mb, grad_accum=grad_accum)
        return predicted_memory(cfg, trial, hw).total * memory_scale <= capacity

    if not fits(1):
        return 0
    low, high = 1, max(1, limit)
    while low < high:  # memory grows with the micro-batch: bisect on the largest that fits
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def split_batch(per_rank_sequences: int, micro_batch_limit: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) covering ``per_rank_sequences`` with micro-batches <= the limit, balanced."""
    grad_accum = math.ceil(per_rank_sequences / micro_batch_limit)
    return math.ceil(per_rank_sequences / grad_accum), grad_accum


def exact_split(per_rank_sequences: int, micro_batch_limit: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) whose product is exactly ``per_rank_sequences``: the largest divisor
    <= the limit, so a training step keeps the tokens per step the config asks for."""
    limit = max(1, min(micro_batch_limit, per_rank_sequences))
    micro_batch = max(d for d in range(1, limit + 1) if per_rank_sequences % d == 0)
    return micro_batch, per_rank_sequences // micro_batch


# -- candidates --------------------------------------------------------------------------------------------


def expert_parallel_degrees(cfg: ModelConfig, gpus: int) -> tuple[int, ...]:
    """The expert-parallel degrees a model allows on ``gpus``: divisors of both ``gpus`` and
    ``model.moe.n_experts`` (only 1 for a dense model)."""
    if not cfg.moe.enabled:
        return (1,)
    return tuple(ep for ep in range(1, gpus + 1) if gpus % ep == 0 and cfg.moe.n_experts % ep == 0)


def candidate_layouts(
    world_size: int,
    tp_degrees: tuple[int, ...] = (),
    *,
    offload: bool = True,
    ep_degrees: tuple[int, ...] = (1,),
) -> list[tuple[str, dict]]:
    """The layouts ``lmforge plan`` compares, in the order of preference when they are equally fast.

    Each expert-parallel degree > 1 adds DDP and FSDP, with and without checkpointing, FSDP with checkpointing
    and CPU offload, and joins each tensor-parallel degree whose data-parallel ranks it divides."""
    base = "single" if world_size == 1 else "ddp"
    label = "single GPU" if world_size == 1 else "DDP"
    out = [
        (label, dict(strategy=base)),
        (f"{label} + AC", dict(strategy=base, activation_checkpointing=True)),
        ("FSDP", dict(strategy="fsdp")),
        ("FSDP + AC", dict(strategy="fsdp", activation_checkpointing=True)),
        ("FSDP + offload", dict(strategy="fsdp", cpu_offload=True)),
        ("FSDP + AC + offload", dict(strategy="fsdp", activation_checkpointing=True, cpu_offload=True)),
    ]
    if world_size == 1:
        out = [o for o in out if not (o[0].startswith("FSDP") and not o[1].get("cpu_offload"))]
    if not offload:
        out = [o for o in out if not o[1].get("cpu_offload")]
    if 1 not in ep_degrees:
        out = []
    for ep in (ep for ep in ep_degrees if ep > 1 and world_size % ep == 0):
        for name, strategy in ((label, base), ("FSDP", "fsdp")):
            out.append((f"{name} + EP{ep}", dict(strategy=strategy, ep=ep)))
            out.append(
                (f"{name} + EP{ep} + AC", dict(strategy=strategy, ep=ep, activation_checkpointing=True))
            )
        if offload:
            switches = dict(strategy="fsdp", ep=ep, activation_checkpointing=True, cpu_offload=True)
            out.append((f"FSDP + EP{ep} + AC + offload", switches))
    for tp in tp_degrees:
        if tp <= 1:
            continue
        for ep in (ep for ep in ep_degrees if (world_size // tp) % ep == 0):
            name = f"FSDP + TP{tp}" + (f" + EP{ep}" if ep > 1 else "")
            out.append((name, dict(strategy="fsdp", tp=tp, ep=ep)))
            out.append((f"{name} + AC", dict(strategy="fsdp", tp=tp, ep=ep, activation_checkpointing=True)))
    return out


def evaluate(
    cfg: ModelConfig,
    name: str,
    layout: Layout,
    cluster: Cluster,
    per_rank_sequences: int,
    corrections: Corrections,
) -> Candidate:
    """Fit the micro-batch of one layout and predict its speed."""
    hw = cluster.hardware
    capacity = hw.memory_bytes
    limit = largest_micro_batch(cfg, layout, hw, per_rank_sequences, capacity, corrections.memory_scale)
    host_ok = True
    if layout.cpu_offload:
        host_need = predicted_memory(cfg, layout, hw).host_bytes * min(cluster.gpus, cluster.gpus_per_node)
        host_ok = host_need <= hw.host_memory_gib * GIB
    if limit == 0 or not host_ok:
        shown = dataclasses.replace(layout, micro_batch=1, grad_accum=per_rank_sequences)
        memory = predicted_memory(cfg, shown, hw)
        return Candidate(name, shown, memory, capacity, corrections.memory_scale, None)
    micro_batch, grad_accum = split_batch(per_rank_sequences, limit)
    chosen = dataclasses.replace(layout, micro_batch=micro_batch, grad_accum=grad_accum)
    memory = predicted_memory(cfg, chosen, hw)
    timing = step_timing(cfg, chosen, cluster, corrections)
    return Candidate(name, chosen, memory, capacity, corrections.memory_scale, timing)


def check_inputs(
    cfg: ModelConfig,
    cluster: Cluster,
    workload: Workload,
    tp_degrees: tuple[int, ...],
    ep_degrees: tuple[int, ...] = (1,),
) -> None:
    problems = []
    if cluster.gpus < 1:
        problems.append(f"--gpus={cluster.gpus} must be >= 1")
    if cluster.gpus_per_node < 1:
        problems.append(f"--gpus-per-node={cluster.gpus_per_node} must be >= 1")
    if workload.seq_len < 1:
        problems.append(f"--seq={workload.seq_len} must be >= 1")
    elif workload.seq_len > cfg.max_seq_len and cfg.position != "rope":
        problems.append(
            f"--seq={workload.seq_len} is longer than model.max_seq_len={cfg.max_seq_len} "
            f"(the model's {cfg.position} positions stop there)"
        )
    if workload.global_batch_tokens < 1:
        problems.append(f"--global-batch-tokens={workload.global_batch_tokens} must be >= 1")
    if workload.total_tokens is not None and workload.total_tokens < 1:
        problems.append(f"--tokens={workload.total_tokens} must be >= 1")
    if cluster.price_per_gpu_hour is not None and cluster.price_per_gpu_hour < 0:
        problems.append(f"--price-per-gpu-hour={cluster.price_per_gpu_hour} must be >= 0")
    problems += cluster.energy.problems()
    for tp in tp_degrees:
        if tp < 1 or cluster.gpus % tp:
            problems.append(f"--tp {tp} must be >= 1 and divide --gpus={cluster.gpus}")
        elif tp > cluster.gpus_per_node:
            problems.append(f"--tp {tp} must stay inside a node (--gpus-per-node={cluster.gpus_per_node})")
        elif cfg.n_heads % tp or cfg.kv_heads % tp:
            problems.append(
                f"--tp {tp} must divide the model's heads (n_heads={cfg.n_heads}, n_kv_heads={cfg.kv_heads})"
            )
    for ep in ep_degrees:
        if ep < 1 or cluster.gpus % ep:
            problems.append(f"--ep {ep} must be >= 1 and divide --gpus={cluster.gpus}")
        if ep > 1 and not cfg.moe.enabled:
            problems.append(f"--ep {ep} needs a Mixture-of-Experts model (model.moe.n_experts is 0)")
        elif ep >= 1 and cfg.moe.enabled and cfg.moe.n_experts % ep:
            problems.append(
                f"--ep {ep} must divide model.moe.n_experts={cfg.moe.n_experts} (every rank of an "
                f"expert-parallel group holds the same number of experts); valid here: "
                f"{', '.join(map(str, expert_parallel_degrees(cfg, cluster.gpus)))}"
            )
    if problems:
        raise ConfigError("cannot plan:\n  " + "\n  ".join(problems))


def plan_cluster(
    cfg: ModelConfig,
    cluster: Cluster,
    workload: Workload,
    *,
    tp_degrees: tuple[int, ...] = (),
    ep_degrees: tuple[int, ...] | None = None,
    corrections: Corrections | None = None,
) -> Report:
    """Compare the candidate layouts for training ``cfg`` on ``cluster`` and choose the fastest that fits.
    ``ep_degrees=None`` compares every expert-parallel degree the model allows (just 1 when dense)."""
    if ep_degrees is None:
        ep_degrees = expert_parallel_degrees(cfg, cluster.gpus)
    check_inputs(cfg, cluster, workload, tp_degrees, ep_degrees)
    corrections = corrections or Corrections()
    notes = []
    requested_sequences = max(1, round(workload.global_batch_tokens / workload.seq_len))
    candidates = []
    sequences_per_step = requested_sequences
    offload = cluster.hardware.kind == "cuda"  # a CPU has nowhere to offload to
    for name, switches in candidate_layouts(cluster.gpus, tp_degrees, offload=offload, ep_degrees=ep_degrees):
        layout = Layout(
            world_size=cluster.gpus,
            seq_len=workload.seq_len,
            precision=workload.precision,
            device_kind=cluster.hardware.kind,
            **switches,
        )
        per_rank = math.ceil(requested_sequences / layout.dp)
        candidates.append(evaluate(cfg, name, layout, cluster, per_rank, corrections))
    fitting = [c for c in candidates if c.fits]
    # The fastest, but a layout later in the list (more machinery) must be faster by PREFER_SIMPLER.
    chosen = fitting[0] if fitting else None
    for c in fitting[1:]:
        if c.timing.tokens_per_s > chosen.timing.tokens_per_s * PREFER_SIMPLER:
            chosen = c
    if chosen is not None:
        lay = chosen.layout
        sequences_per_step = lay.micro_batch * lay.grad_accum * lay.dp
        if sequences_per_step != requested_sequences:
            notes.append(
                f"global batch rounded from {requested_sequences} to {sequences_per_step} sequences so that "
                f"{lay.dp} data-parallel ranks x micro-batch {lay.micro_batch} x {lay.grad_accum} "
                f"accumulation steps cover it"
            )
    params = count_params(cfg)
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * params
    if cfg.moe.enabled:
        # No agreed compute-optimal rule for sparse models: 20 tokens per *active* parameter as a floor.
        chinchilla = CHINCHILLA_TOKENS_PER_PARAM * count_active_params(cfg)
        notes.append(
            f"expert-parallel degrees compared: {', '.join(map(str, ep_degrees))}; routing assumed balanced, "
            f"all-to-all not overlapped with compute"
        )
    if workload.total_tokens is None:
        notes.append(f"--tokens not given: planning the compute-optimal {chinchilla:,} tokens")
    if cluster.hardware.power_watts <= 0:
        notes.append(
            f"no power figure for {cluster.hardware.name}: set power_watts in --hardware-file for energy"
        )
    return Report(
        model=cfg,
        cluster=cluster,
        workload=workload,
        parameters=params,
        flops_per_token=model_flops_per_token(cfg, workload.seq_len),
        sequences_per_step=sequences_per_step,
        candidates=candidates,
        chosen=chosen,
        total_tokens=workload.total_tokens or chinchilla,
        chinchilla_tokens=chinchilla,
        notes=notes,
    )
