"""Text for `chatapp plan` and the picker's verdicts: pure functions of a plan (`chatapp doctor` is doctor.py)."""

from __future__ import annotations

from .hardware import Hardware
from .planner import Plan


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def describe_hardware(hw: Hardware) -> list[str]:
    lines = []
    for g in hw.gpus:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        lines.append(f"GPU {g.index}: {g.name}, {_gib(g.total_bytes)} ({_gib(g.free_bytes)} free), compute {cc}")
    if hw.mps:
        lines.append(f"Apple GPU (MPS), sharing {_gib(hw.cpu.ram_total_bytes)} of unified memory")
    if not hw.gpus:
        lines.append("no CUDA GPU")
    bf16 = "native bf16" if hw.cpu.bf16_native else "no native bf16"
    lines.append(f"CPU: {_gib(hw.cpu.ram_total_bytes)} RAM ({_gib(hw.cpu.ram_available_bytes)} available), {bf16}")
    return lines


def format_plan(plan: Plan) -> str:
    f = plan.facts
    lines = [
        f"model: {f.name}: {f.params / 1e9:.2f}B parameters, {f.layers} layers, "
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
            f"choice: {c.preset} at {c.context_tokens:,} tokens on {c.device_map}, attention {c.attn_implementation}{slow}"
        )
    lines += ["reasons:", *(f"  - {r}" for r in plan.reasons)]
    return "\n".join(lines)


def verdict(plan: Plan) -> str:
    """One line per model: the presets `auto` would try, with ✓/✗ and their totals, e.g. 'bf16 ✗ 17.9 GB · nf4 ✓ 7.5 GB'."""
    rows = {est.preset: (est, where) for est, where in plan.presets}
    on_cpu = not plan.hardware.gpus
    fast = "fp32" if on_cpu and not plan.hardware.cpu.bf16_native else "bf16"
    return " · ".join(
        f"{p} {'✓' if rows[p][1] else '✗'} {_gb(rows[p][0].total_bytes)}" for p in (fast, "nf4")
    )


def weights_verdict(hw: Hardware, params: int | None) -> str:
    """For Hub search results, where only the parameter count is known: do the weights alone fit?"""
    from .planner import NF4_BYTES_PER_PARAM, usable_bytes

    if not params:
        return "size unknown"
    budget = max([usable_bytes(g.free_bytes) for g in hw.gpus] or [usable_bytes(hw.cpu.ram_available_bytes)])
    sizes = {"bf16": params * 2, "nf4": int(params * NF4_BYTES_PER_PARAM)}
    return " · ".join(f"{p} {'✓' if n <= budget else '✗'} {_gb(n)}" for p, n in sizes.items()) + " (weights)"
