"""The planner's report as text: the per-layout memory table, the chosen plan, and the run's totals."""

from __future__ import annotations

from lmforge.plan.energy import (
    DEFAULT_NODE_OVERHEAD,
    DEFAULT_PUE,
    IDLE_POWER_FRACTION,
    NODE_OVERHEAD_SOURCE,
    PUE_SOURCE,
)
from lmforge.plan.hardware import GIB
from lmforge.plan.planner import Report


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _amount(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def render_report(report: Report) -> str:
    """A readable table: one row per layout (GiB per GPU), then the chosen plan."""
    hw, cluster, wl = report.cluster.hardware, report.cluster, report.workload
    moe = report.model.moe
    active = (
        f" ({report.active_parameters:,} active per token: {moe.n_experts} experts, top-{moe.top_k})"
        if moe.enabled
        else ""
    )
    lines = [
        f"model     {report.model.preset or 'custom'}: {report.parameters:,} parameters{active}, "
        f"{report.flops_per_token:.3g} training FLOPs/token at seq {wl.seq_len}",
        f"cluster   {cluster.gpus} x {hw.name} ({hw.memory_gib:.1f} GiB, {hw.peak_tflops:g} TFLOP/s bf16)"
        + ("" if cluster.gpus == 1 else f" in {cluster.nodes} node(s) of {cluster.gpus_per_node}, ")
        + ("" if cluster.gpus == 1 else "one node" if cluster.nodes == 1 else f"{cluster.interconnect.name}"),
        f"batch     {wl.global_batch_tokens:,} tokens/step requested, {wl.precision}",
        "",
        "memory per GPU (GiB) at the largest micro-batch that fits (micro-batch 1 where none does):",
    ]
    header = ("layout", "mb", "accum", "weights", "grads", "optim", "activ", "temp", "overhead", "total",
              "fits", "tokens/s/GPU", "MFU", "run", "kWh", "kg CO2e")  # fmt: skip
    rows = [header]
    for c in report.candidates:
        m, energy = c.memory, report.energy_of(c)
        fits = "yes" if c.fits else f"no (+{_gib(c.over_bytes)})" if c.over_bytes else "no (host memory)"
        rows.append((
            c.name, str(c.layout.micro_batch), str(c.layout.grad_accum), _gib(m.weights), _gib(m.gradients),
            _gib(m.optimizer), _gib(m.activations), _gib(m.temporary), _gib(m.overhead),
            _gib(c.predicted_bytes),
            fits, f"{c.timing.tokens_per_s_per_gpu:,.0f}" if c.timing else "-",
            f"{100 * c.timing.mfu:.1f}%" if c.timing else "-",
            _duration(report.steps_of(c) * c.timing.step_s) if c.timing else "-",
            _amount(energy.kwh) if energy else "-", _amount(energy.co2_kg) if energy else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    chosen = report.chosen
    if chosen is None:
        lines.append(f"no plan: {report.shortfall()}")
    else:
        t, lay = chosen.timing, chosen.layout
        expert_parallel = ""
        if moe.enabled:
            expert_parallel = (
                f", expert-parallel {lay.ep} ({moe.n_experts // lay.ep} of {moe.n_experts} experts per GPU)"
            )
        lines += [
            f"plan      {chosen.name}: micro-batch {lay.micro_batch} x {lay.grad_accum} accumulation x "
            f"{lay.dp} data-parallel = {report.sequences_per_step * wl.seq_len:,} tokens/step, "
            f"activation checkpointing {'on' if lay.activation_checkpointing else 'off'}{expert_parallel}",
            f"memory    {_gib(chosen.predicted_bytes)} of {_gib(chosen.capacity_bytes)} GiB per GPU "
            f"(peak during {chosen.memory.peak_phase})"
            + (f"; {_gib(chosen.memory.host_bytes)} GiB per GPU on the CPU" if lay.cpu_offload else ""),
            f"step      {t.step_s:.3g} s = compute {t.compute_s:.3g} + memory-bound {t.memory_bound_s:.3g} + "
            f"exposed communication {t.communication_s:.3g}"
            + (f" (all-to-all {t.all_to_all_s:.3g})" if lay.ep > 1 else "")
            + f" + offload {t.offload_s:.3g} + optimizer {t.optimizer_s:.3g}",
            f"speed     {t.tokens_per_s:,.0f} tokens/s ({t.tokens_per_s_per_gpu:,.0f} per GPU), "
            f"MFU {100 * t.mfu:.1f}%",
            f"run       {_tokens(report.total_tokens)} tokens = {report.steps:,} steps: "
            f"{_duration(report.wall_seconds)}, "
            f"{report.gpu_hours:,.0f} GPU-hours"
            + (
                f", cost {report.cost:,.0f} at {cluster.price_per_gpu_hour:g}/GPU-hour"
                if report.cost is not None
                else ""
            ),
        ]
        lines += _energy_lines(report)
    counted = f"{_tokens(report.active_parameters)} active" if moe.enabled else _tokens(report.parameters)
    lines.append(
        f"compute-optimal tokens for {counted} parameters: {_tokens(report.chinchilla_tokens)} "
        f"(~20 per parameter, Hoffmann et al. 2022)"
    )
    lines += [f"note      {n}" for n in report.notes]
    return "\n".join(lines)


def _energy_lines(report: Report) -> list[str]:
    energy, hw = report.energy, report.cluster.hardware
    if energy is None:
        return []
    s = energy.settings
    return [
        f"power     {hw.power_watts:g} W board power x ({IDLE_POWER_FRACTION:g} + {1 - IDLE_POWER_FRACTION:g} x "
        f"{100 * energy.utilisation:.0f}% busy) = {energy.device_power_w:.0f} W per GPU; x {1 + s.node_overhead:g} "
        f"node overhead x PUE {s.pue:g} = {energy.facility_power_w / 1000:.3g} kW for the cluster",
        f"energy    {energy.kwh:,.0f} kWh at the data centre's meter ({energy.device_kwh:,.0f} kWh in the GPUs); "
        f"{energy.co2_kg / 1000:,.3g} t CO2eq at {s.grid_g_per_kwh:g} g/kWh ({s.grid_source})",
        f"assumed   PUE {PUE_SOURCE if s.pue == DEFAULT_PUE else f'{s.pue:g} (given)'}; node overhead "
        + (
            NODE_OVERHEAD_SOURCE
            if s.node_overhead == DEFAULT_NODE_OVERHEAD
            else f"{s.node_overhead:g} (given)"
        ),
    ]


def render_probe(probe) -> str:
    """Measured against predicted, for ``lmforge plan --probe``."""
    return "\n".join([
        f"probe     {probe.steps} steps of micro-batch {probe.micro_batch} x seq {probe.seq_len} "
        f"on {probe.device} "
        f"(memory: {probe.memory_method})",
        f"memory    measured {probe.measured_peak_bytes / GIB:.3f} GiB, "
        f"predicted {probe.predicted_peak_bytes / GIB:.3f} "
        f"GiB: x{probe.memory_scale:.2f}",
        f"step      measured {probe.measured_step_s:.4g} s, predicted {probe.predicted_step_s:.4g} s: "
        f"x{probe.time_scale:.2f}",
    ])  # fmt: skip
