"""The GPU check's planner step (the planner's estimate against a real load and turn), and the memory readings and
machine description the other steps use.

Device memory is read two ways on CUDA: torch's allocator (memory_allocated, its peak) and the driver's count of
all memory in use (total - free from torch.cuda.mem_get_info), from which NVML's reading before this process made
its CUDA context is subtracted: that difference is this process's whole footprint, CUDA context included, which is
what the planner's total must cover. A dry run reads the process's RSS instead, where a verdict says little.
"""

from __future__ import annotations

import gc
from pathlib import Path

MIB = 2**20
#: Unloading a model gives back all but this much (cuBLAS workspaces and the like may stay).
TOLERANCE = 100 * MIB
PLANNER_GOAL = "estimate / measured device memory between 0.95 and 1.10 for every model and preset"
#: Gemma 2 before Qwen 2.5: its eager attention and sliding window test the estimate more than another plain GQA.
PLANNER_MODELS = ("llama-3.1-8b", "gemma-2-9b", "qwen2.5-7b")
PLANNER_PRESETS = ("bf16", "nf4", "int8")
#: Later steps load these again, so their checkpoints stay; the others are deleted once measured (disk).
KEPT = ("llama-3.1-8b", "smollm2-135m")


# -- the machine and its memory --------------------------------------------------------------------------------


def nvml_used(index: int = 0) -> int | None:
    """Bytes in use on GPU `index` (every process), from NVML without making a CUDA context; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: a CPU machine
        return None
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def describe_machine(device: str, dry_run: bool) -> dict:
    import importlib.metadata
    import platform

    import torch

    from chatapp.hardware import detect, flash_attn_installed

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    meta = {"device": device, "dry_run": dry_run, "python": platform.python_version()}
    for name in ("torch", "transformers", "huggingface_hub", "bitsandbytes", "accelerate", "safetensors"):
        meta[name] = version(name)
    meta.update(flash_attn_installed=flash_attn_installed(), cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        gpus = detect().gpus
        gpu = gpus[0] if gpus else None
        props = torch.cuda.get_device_properties(0)
        meta.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            total_bytes=int(props.total_memory),
            cuda_version=torch.version.cuda,
            nvml_bandwidth_gb_s=round(gpu.bandwidth_bytes_per_s / 1e9) if gpu and gpu.bandwidth_bytes_per_s else None,
        )
    else:
        meta["device_name"] = f"CPU ({platform.processor() or platform.machine()}), dry run"
    return meta


def scratch_settings(scratch: Path):
    """chatapp settings of the run's own: folders in scratch (so platformdirs isn't asked), no KV snapshots."""
    from chatapp.config import Settings

    return Settings(
        data_dir=scratch / "data", config_dir=scratch / "config", themes_dir=scratch / "themes", kv_disk_budget=0
    )


def context_overhead(ctx) -> dict:
    """The CUDA context this process makes, and what cuBLAS adds at its first matmul: against CUDA_OVERHEAD_BYTES."""
    from chatapp.planner import CUDA_OVERHEAD_BYTES

    if not ctx.device.startswith("cuda"):
        return {"cuda_context": "not measured: no CUDA in a dry run"}
    import torch

    torch.zeros(1, device=ctx.device)
    torch.cuda.synchronize()
    context = used(ctx.device)
    a = torch.ones(1024, 1024, device=ctx.device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    del a
    torch.cuda.empty_cache()
    cublas = used(ctx.device)
    base = ctx.used_before
    return {
        "planner_cuda_overhead_bytes": CUDA_OVERHEAD_BYTES,
        "cuda_context_bytes": context - base if base is not None else None,
        "cuda_context_and_cublas_bytes": cublas - base if base is not None else None,
    }


def used(device: str) -> int:
    """Device memory in use, every process (CUDA); this process's RSS on a CPU."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    return rss()


def rss(pid: int | str = "self") -> int | None:
    """Resident bytes of a process (this one by default); None when it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith("VmRSS:")), None)


def snapshot(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"rss_bytes": rss()}
    import torch

    return {
        "used_bytes": used(device),
        "allocated_bytes": int(torch.cuda.memory_allocated()),
        "reserved_bytes": int(torch.cuda.memory_reserved()),
    }


def verdict(estimate: int, measured: int, over: float = 0.10, under: float = 0.05) -> tuple[float, str, bool]:
    """(estimate / measured, in words, within the goal): a plan may ask for up to `over` more than a load takes,
    and never for more than `under` less (that is a promise of memory that isn't there)."""
    ratio = estimate / measured
    if ratio < 1 - under:
        return ratio, f"under by {1 - ratio:.0%}", False
    if ratio > 1 + over:
        return ratio, f"over by {ratio - 1:.0%}", False
    return ratio, "within", True


# -- 1. planner vs reality --------------------------------------------------------------------------------------


def planner_vs_reality(ctx, record: dict) -> None:
    rows = record["rows"] = []
    record["notes"] = [
        f"prompt {ctx.sizes.planner_prompt} tokens, then {ctx.sizes.planner_new} decoded; the eager decode path "
        "(decode='dynamic'): the static path's memory is in the decode step's rows"
    ]
    for name in PLANNER_MODELS:
        for preset in PLANNER_PRESETS:
            if ctx.planner_rows and f"{name}:{preset}" not in ctx.planner_rows:
                continue
            row = {"model": name, "preset": preset}
            if ctx.left() < 20:
                rows.append({**row, "status": "skipped: out of time"})
                continue
            try:
                row.update(_planner_row(ctx, name, preset))
            except Exception as exc:  # one preset failing (no bitsandbytes, out of memory) is its row's record
                from gpu_check import one_line

                row.update(status="failed", error=one_line(exc))
            rows.append(row)
            free_after(ctx)
        if name not in KEPT:
            ctx.checkpoints.drop(name)
    judged = [row["within_goal"] for row in rows if row.get("within_goal") is not None]
    record["goal_met"] = all(judged) if judged else None


def free_after(ctx) -> None:
    """Between measurements: what was dropped goes back to the device, and the peak starts again."""
    if ctx.device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _planner_row(ctx, name: str, preset: str) -> dict:
    import gpu_models

    from chatapp import planner
    from chatapp.engine import ChatSession, load_model
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.loader import detect_hardware
    from chatapp.engine.session import Message
    from chatapp.facts import facts_from_folder

    cuda = ctx.device.startswith("cuda")
    folder = ctx.checkpoints.get(name)
    facts = facts_from_folder(folder, name)
    hardware = detect_hardware(ctx.device)
    device_type, bf16 = planner.device_kind(hardware)
    tokens = ctx.sizes.planner_prompt + ctx.sizes.planner_new
    plan = planner.choose(hardware, facts, context=tokens, preset=preset)
    if plan.choice is None:
        return {"status": f"skipped: won't fit here ({planner.shortfall(plan, preset)})"}
    est = planner.estimate(facts, preset, tokens, device_type=device_type, bf16_supported=bf16)
    free_after(ctx)
    # What this process holds before the load (its CUDA context, what earlier steps left): part of what is measured.
    floor = used(ctx.device) - ctx.used_before if cuda and ctx.used_before is not None else None
    loaded = load_model(str(folder), preset, settings=ctx.settings, device=ctx.device, context=tokens)
    row = {"dtype": loaded.dtype, "attention": loaded.attn_implementation}
    if cuda:
        import torch

        row["peak_load_bytes"] = int(torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
    session = ChatSession(loaded, speculative="off", decode="dynamic")
    message = gpu_models.user_message(loaded.tokenizer, ctx.sizes.planner_prompt)
    _ids, stats = cached_turn(session, [Message("user", message)], ctx.sizes.planner_new)
    row.update(
        context=stats.cache_tokens,
        est_weights_bytes=est.weights_bytes,
        weights_bytes=loaded.footprint_bytes,
        est_kv_bytes=est.kv_cache_bytes,
        kv_bytes=session.cache_bytes(),
        est_activations_bytes=est.activation_bytes,
        est_overhead_bytes=est.overhead_bytes,
        est_total_bytes=est.total_bytes,
    )
    if not cuda:
        row["status"] = "ok (parts only: device memory needs CUDA)"
        return row
    import torch

    row["peak_turn_bytes"] = int(torch.cuda.max_memory_allocated())
    peak = max(row["peak_load_bytes"], row["peak_turn_bytes"])
    process = used(ctx.device) - ctx.used_before if ctx.used_before is not None else None
    allocated_ratio, _, _ = verdict(est.total_bytes - est.overhead_bytes, peak)
    reserved = int(torch.cuda.memory_reserved())
    row.update(peak_allocated_bytes=peak, reserved_bytes=reserved, process_floor_bytes=floor, process_bytes=process)
    row["est_vs_peak_allocated"] = round(allocated_ratio, 3)
    if process is not None:
        ratio, words, ok = verdict(est.total_bytes, process)
        row.update(est_vs_process=round(ratio, 3), verdict=words, within_goal=ok)
    row["status"] = "ok"
    return row
