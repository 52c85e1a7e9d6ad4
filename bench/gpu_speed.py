"""The GPU check's speed and correctness steps: SDPA's backends, cache reuse against a re-encode, decode speed.

Decode speed is set against the bandwidth limit: at batch size 1 each new token reads every weight (but the input
embedding table, of which it reads one row, unless the output layer shares it) and the whole KV cache (a static
cache: its whole buffer, which attention reads masked) once. The limit is the bandwidth a device-to-device copy gets
in the same run divided by those bytes; the fraction is the measured rate over that limit.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from functools import partial

import gpu_models
from gpu_memory import free_after, snapshot

ATTENTION_GOAL = "record SDPA's choice and each backend's time on an 8k causal prefill and a 2k chunk over 8k"
EXACT_GOAL = "fp32: every turn token-identical to a re-encode, on both decode paths; bf16: agreement recorded"
DECODE_GOAL = "the static-cache + CUDA-graph path at or above 60% of the bandwidth limit in bf16"
GRAPH_TARGET = 0.6
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(device: str, fn, reps: int = 3) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- 4. attention -----------------------------------------------------------------------------------------------


def attention(ctx, record: dict) -> None:
    """The 8B's attention shape, as transformers calls SDPA: a whole causal prefill (no mask, GQA in the kernel),
    and a chunk on top of a cache (a boolean mask, so K/V repeated to every head)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from chatapp.hardware import flash_attn_installed

    config = gpu_models.read_config("llama-3.1-8b")
    config = gpu_models.shrink(config) if ctx.dry_run else config
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or config["hidden_size"] // heads
    n, chunk = ctx.sizes.attention_tokens, ctx.sizes.attention_chunk
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=ctx.device, dtype=torch.bfloat16)

    q, k, v = randn(1, heads, n, dim), randn(1, kv, n, dim), randn(1, kv, n, dim)
    rows_of_q = torch.arange(n - chunk, n, device=ctx.device)[:, None]
    mask = (rows_of_q >= torch.arange(n, device=ctx.device)[None, :]).view(1, 1, chunk, n)
    cases = {
        f"causal prefill of {n}": (q, k, v, {"is_causal": True, "enable_gqa": True}),
        f"{chunk} over a {n} cache": (
            q[:, :, -chunk:],
            k.repeat_interleave(heads // kv, dim=1),
            v.repeat_interleave(heads // kv, dim=1),
            {"attn_mask": mask},
        ),
    }
    names = {member.value: name for name, member in SDPBackend.__members__.items()}
    rows = record["rows"] = []
    for case, (query, key, value, kwargs) in cases.items():
        choice = names.get(torch._fused_sdp_choice(query, key, value, **kwargs), "?")
        timed = []
        for backend in (None, *BACKENDS):
            row = {"case": case, "backend": backend or f"default (chooses {choice})"}
            only = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext()
            try:
                with only:
                    seconds = _timed(ctx.device, partial(F.scaled_dot_product_attention, query, key, value, **kwargs))
                row["ms"] = round(seconds * 1e3, 3)
                timed.append((row, seconds))
            except Exception as exc:  # a backend that can't take this case (a mask for flash, the CPU...)
                row["error"] = str(exc).strip().splitlines()[0][:160]
            rows.append(row)
        math = next((seconds for row, seconds in timed if row["backend"] == "MATH"), None)
        for row, seconds in timed:
            row["vs_math"] = round(math / seconds, 2) if math else None
    record["flash_attention_2"] = (
        "installed, not timed here: the loader picks it when present"
        if flash_attn_installed()
        else "not measured: the flash-attn package is not installed (it has no wheel for this machine's torch and CUDA)"
    )


# -- 3. exactness -----------------------------------------------------------------------------------------------


def exactness(ctx, record: dict) -> None:
    """The small model: a multi-turn chat through ChatSession (the app's options) against model.generate on the
    whole conversation each turn, in fp32 and bf16, on the dynamic and the static (CUDA: compiled) decode path."""
    from chatapp.engine import load_model

    folder = ctx.checkpoints.get("smollm2-135m")
    rows = record["rows"] = []
    cuda = ctx.device.startswith("cuda")
    for preset in ("fp32", "bf16"):
        loaded = None
        for decode in ("dynamic", "static"):
            row = {"preset": preset, "decode": decode + (" (CUDA graphs)" if cuda and decode == "static" else "")}
            need = 75 if cuda and decode == "static" else 15  # a compile takes most of a minute
            if ctx.left() < need:
                rows.append({**row, "status": f"skipped: out of time ({ctx.left():.0f} s left of the step's share)"})
                continue
            try:
                loaded = loaded or load_model(str(folder), preset, settings=ctx.settings, device=ctx.device)
                row.update(_chat(ctx, loaded, decode))
            except Exception as exc:  # this row's record; the next still runs
                from gpu_check import one_line

                row.update(status="failed", error=one_line(exc))
            rows.append(row)
        del loaded
        free_after(ctx)
    fp32 = [row["all_identical"] for row in rows if row["preset"] == "fp32" and "all_identical" in row]
    record["goal_met"] = all(fp32) if len(fp32) == 2 else (False if False in fp32 else None)


def _chat(ctx, loaded, decode: str) -> dict:
    from chatapp.engine import ChatSession
    from chatapp.engine.bench import cached_turn, naive_turn
    from chatapp.engine.session import Message, common_prefix_len

    sizes = ctx.sizes
    session = ChatSession(loaded, decode=decode)
    turns = []
    for turn in range(sizes.exact_turns):
        text = gpu_models.user_message(loaded.tokenizer, sizes.exact_first if turn == 0 else sizes.exact_turn, turn)
        cached, stats = cached_turn(session, [*session.messages, Message("user", text)], sizes.exact_new)
        history = [Message(m.role, m.content) for m in session.context_messages()[:-1]]
        naive, _ = naive_turn(loaded, history, sizes.exact_new)
        turns.append((cached == naive, common_prefix_len(cached, naive), stats.prefilled_tokens, stats.prompt_tokens))
    return {
        "status": "ok",
        "turns": len(turns),
        "identical_turns": sum(t[0] for t in turns),
        "all_identical": all(t[0] for t in turns),
        "tokens_agreeing_before_divergence": [t[1] for t in turns],
        "prefilled_per_turn": [t[2] for t in turns],
        "prompt_per_turn": [t[3] for t in turns],
    }


# -- 2. decode speed --------------------------------------------------------------------------------------------


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves, reads and writes both counted."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _timed(device, lambda: dst.copy_(src), reps=10)
    return 2 * nbytes / seconds


def bytes_per_token(loaded, cache_bytes: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step reads: see the module doc."""
    model = loaded.model
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed  # a packed CPU weight (cpu_linear) has no data_ptr
    return loaded.footprint_bytes - (0 if tied else embed.numel() * embed.element_size()), cache_bytes


def bandwidth_fraction(tokens_per_s: float, read_bytes: int, bandwidth: float) -> tuple[float, float]:
    """(the bandwidth limit in tokens/s, the share of it reached)."""
    limit = bandwidth / read_bytes
    return limit, tokens_per_s / limit


#: (preset, decode path, which context, another chat): in this order, so that time running out costs the least
#: wanted rows. The second bf16 static row is a new chat at the same size: its warm-up turn shows whether a new
#: chat's cache makes the decode step compile again.
DECODE_RUNS = (
    ("bf16", "dynamic", 0, False),
    ("bf16", "static", 0, False),
    ("bf16", "static", 0, True),
    ("bf16", "dynamic", 1, False),
    ("bf16", "static", 1, False),
    ("nf4", "dynamic", 0, False),
    ("nf4", "dynamic", 1, False),
    ("nf4", "static", 0, False),
)


def decode(ctx, record: dict) -> None:
    from chatapp.engine import load_model

    cuda = ctx.device.startswith("cuda")
    bandwidth = copy_bandwidth(ctx.device, ctx.sizes.copy_bytes)
    record["copy_bandwidth_bytes_per_s"] = int(bandwidth)
    free_after(ctx)
    folder = ctx.checkpoints.get("llama-3.1-8b")
    contexts = ctx.sizes.decode_contexts
    rows = record["rows"] = []
    for preset in ("bf16", "nf4"):
        loaded, base = None, snapshot(ctx.device)
        for want, path, which, again in DECODE_RUNS:
            if want != preset:
                continue
            row = {"preset": preset, "decode": path + (" (CUDA graphs)" if cuda and path == "static" else "")}
            row["chat"] = "another, same size" if again else "first"
            need = 80 if cuda and path == "static" and not again else 25
            if ctx.left() < need:
                rows.append({**row, "status": f"skipped: out of time ({ctx.left():.0f} s left of the step's share)"})
                continue
            try:
                loaded = loaded or load_model(
                    str(folder), preset, settings=ctx.settings, device=ctx.device, context=max(contexts) + 256
                )
                row.update(_rate(ctx, loaded, path, contexts[which], bandwidth))
            except Exception as exc:  # e.g. nf4's weights that don't compile into a graph
                from gpu_check import one_line

                row.update(status="failed", error=one_line(exc))
            rows.append(row)
        compiled = loaded is not None and loaded.compiled_step is not None and cuda
        loaded = None  # as Worker.unload drops it: no dynamo reset
        free_after(ctx)
        if compiled:
            above = snapshot(ctx.device)["used_bytes"] - base["used_bytes"]
            record[f"{preset}_after_unloading_a_compiled_model_above_baseline_bytes"] = above
    graph = [row.get("fraction_of_limit") for row in rows if row["preset"] == "bf16" and "graphs" in row["decode"]]
    graph = [fraction for fraction in graph if fraction is not None]
    record["goal_met"] = all(f >= GRAPH_TARGET for f in graph) if graph else None
    if not cuda:
        record["notes"] = ["dry run: the static path runs eagerly on the CPU (no CUDA graphs); no verdict"]


def _rate(ctx, loaded, path: str, context: int, bandwidth: float) -> dict:
    """A turn to warm up (compile, capture) and one that regenerates it, on a static cache of `context` tokens'
    room: the second's decode rate, as the app's stats give it."""
    from chatapp import planner
    from chatapp.engine import ChatSession
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.session import Message
    from chatapp.facts import facts_from_folder

    new, warm = ctx.sizes.decode_new, ctx.sizes.decode_warm
    session = ChatSession(loaded, decode=path, speculative="off")
    messages = [Message("user", gpu_models.user_message(loaded.tokenizer, context - new - warm))]
    started = time.perf_counter()
    cached_turn(session, messages, warm)
    warmup_s = time.perf_counter() - started
    _ids, stats = cached_turn(session, messages, new)
    weights, kv = bytes_per_token(loaded, session.cache_bytes())
    limit, fraction = bandwidth_fraction(stats.decode_tokens_per_s, weights + kv, bandwidth)
    row = {
        "context": stats.cache_tokens,
        "tokens_per_s": stats.decode_tokens_per_s,
        "weights_read_bytes": weights,
        "kv_read_bytes": kv,
        "limit_tokens_per_s": limit,
        "fraction_of_limit": fraction,
        "warmup_turn_s": round(warmup_s, 1),
        # A step that failed to compile falls back to eager (static_decode.step): say which one was timed.
        # The dynamic path never uses the compiled step, even when an earlier static row left one on the model.
        "step": "compiled" if path == "static" and loaded.compiled_step not in (None, loaded.model) else "eager",
        "status": "ok",
    }
    if ctx.device.startswith("cuda"):
        import torch

        facts = facts_from_folder(loaded.folder)
        est = planner.estimate(facts, loaded.preset, stats.cache_tokens)
        peak = int(torch.cuda.max_memory_allocated())
        row.update(peak_allocated_bytes=peak, est_without_overhead_bytes=est.total_bytes - est.overhead_bytes)
    return row
