"""Text for `chatapp plan` and the picker's verdicts: pure functions of a plan (`chatapp doctor` is doctor.py)."""

from __future__ import annotations

from . import planner
from .hardware import Hardware
from .planner import Plan
from .units import gb as _gb
from .units import gib as _gib
from .units import params, rate, tokens


def describe_hardware(hw: Hardware) -> list[str]:
    lines = []
    for g in hw.gpus:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        bandwidth = f", {_gb(g.bandwidth_bytes_per_s, 0)}/s" if g.bandwidth_bytes_per_s else ""
        lines.append(
            f"GPU {g.index}: {g.name}, {_gib(g.total_bytes)} ({_gib(g.free_bytes)} free), compute {cc}{bandwidth}"
        )
    if hw.mps:
        lines.append(f"Apple GPU (MPS), sharing {_gib(hw.cpu.ram_total_bytes)} of unified memory")
    if not hw.gpus:
        lines.append("no CUDA GPU")
    bf16 = "native bf16" if hw.cpu.bf16_native else "no native bf16"
    cores = f"{hw.cpu.cores} cores, " if hw.cpu.cores else ""
    lines.append(
        f"CPU: {cores}{_gib(hw.cpu.ram_total_bytes)} RAM ({_gib(hw.cpu.ram_available_bytes)} available), {bf16}"
    )
    return lines


def format_plan(plan: Plan) -> str:
    f = plan.facts
    lines = [
        f"model: {f.name}: {params(f.params)} parameters, {f.layers} layers, "
        f"{f.kv_heads} KV heads x {f.head_dim}, max context {f.max_context:,}",
        *(f"hardware: {line}" for line in describe_hardware(plan.hardware)),
        f"context: {plan.presets[0][0].context_tokens:,} tokens",
        "",
        f"{'preset':<6} | {'weights':>8} | {'KV cache':>8} | {'overhead':>8} | {'total':>8} | fits on",
    ]
    for est, where in plan.presets:
        overhead = est.activation_bytes + est.overhead_bytes
        lines.append(
            f"{est.preset:<6} | {_gb(est.weights_bytes):>8} | {_gb(est.kv_cache_bytes):>8} | "
            f"{_gb(overhead):>8} | {_gb(est.total_bytes):>8} | {where or 'nothing here'}"
        )
    lines.append("")
    c = plan.choice
    if c is None:
        lines.append("choice: none; nothing fits")
    else:
        slow = " (slow: part of the model runs on the CPU)" if c.slow else ""
        lines.append(
            f"choice: {c.preset} at {c.context_tokens:,} tokens on {c.device_map}, "
            f"attention {c.attn_implementation}{slow}"
        )
        if c.max_context_tokens:
            lines.append(f"longest context that fits ({c.preset}): {c.max_context_tokens:,} tokens")
        lines.append(f"decode speed: {speed_line(plan)}")
    if plan.draft is not None:
        lines.append(planner.describe_draft(plan))
    lines += ["reasons:", *(f"  - {r}" for r in plan.reasons)]
    return "\n".join(lines)


def verdict(plan: Plan) -> str:
    """One line per model: the presets `auto` tries here (planner.auto_ladder) up to the first that fits, each with
    ✓/✗ and its need at the plan's context, then the longest context that one fits: 'bf16 ✓ 2.9 GB · up to 131k',
    'bf16 ✗ 17.9 GB · nf4 ✓ 7.5 GB · up to 45k'."""
    rows = {est.preset: (est, where) for est, where in plan.presets}
    parts = []
    for p in planner.auto_ladder(plan.hardware):
        parts.append(f"{p} {'✓' if rows[p][1] else '✗'} {_gb(rows[p][0].total_bytes)}")
        if rows[p][1]:
            break
    c = plan.choice
    if c is not None and c.slow:
        parts.append("GPU+CPU split, slow")
    elif c is not None and c.max_context_tokens:
        parts.append(f"up to {tokens(c.max_context_tokens)}")
    return " · ".join(parts)


def speed(plan: Plan) -> str:
    """The chosen preset's estimated decode rate, '~25 tok/s'; '-' when nothing fits."""
    return rate(plan.choice.tokens_per_s if plan.choice else None)


def speed_line(plan: Plan) -> str:
    """The estimate with how it was made, for the details pane and `chatapp plan`."""
    c = plan.choice
    if c is None or c.tokens_per_s is None:
        return "- (nothing fits)"
    read = f"{_gb(c.estimate.weights_bytes + c.estimate.kv_cache_bytes)} read per token"
    if c.slow:
        how = f"{read}, part of it from CPU RAM at {_gb(planner.cpu_bandwidth_bytes_per_s(plan.hardware))}/s"
    else:
        how = (
            f"{_gb(planner.bandwidth_bytes_per_s(plan.hardware))}/s ÷ {read}, weights + KV cache at "
            f"{c.context_tokens:,} tokens"
        )
    overhead = plan.facts.layers * planner.LAYER_OVERHEAD_S[planner.device_kind(plan.hardware)[0]]
    if overhead:
        how += f", plus {overhead * 1e3:.0f} ms of per-layer launch overhead"
    usable = "" if c.tokens_per_s >= planner.USABLE_TOKENS_PER_S else "; too slow to be usable"
    return f"{rate(c.tokens_per_s)} (estimate: {how}{usable})"


def weights_verdict(hw: Hardware, params: int | None) -> str:
    """For Hub search results, where only the parameter count is known: do the weights alone fit?"""
    from .planner import DTYPE_BYTES, NF4_BYTES_PER_PARAM, auto_ladder, usable_bytes

    if not params:
        return "size unknown"
    budget = max([usable_bytes(g.free_bytes) for g in hw.gpus] or [usable_bytes(hw.cpu.ram_available_bytes)])
    per_param = {**DTYPE_BYTES, "nf4": NF4_BYTES_PER_PARAM}
    sizes = {p: int(params * per_param[p]) for p in auto_ladder(hw)}
    return " · ".join(f"{p} {'✓' if n <= budget else '✗'} {_gb(n)}" for p, n in sizes.items()) + " (weights)"
