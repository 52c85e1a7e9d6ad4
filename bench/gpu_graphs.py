"""The GPU check's look inside the compiled decode step: where a bf16 8B step's time goes, and what overlapping the
host's work with the device's gains.

The first H200 run decoded Llama 8B bf16 at 0.51 of the bandwidth limit on the static path with CUDA graphs, against
the issue's 0.6. Three rates per variant tell the parts apart, all on one static cache of ~1k tokens:
- `app`: the session's decode rate (ChatSession on the static path: sampling, detokenizing, stop checks);
- `step`: decode_step in a bare loop, each token read back to the host (`.item()`) before the next step;
- `queued`: the compiled model fed its own argmax on the device, with no read-back: what the GPU sustains when the
  host keeps ahead of it.
The variants differ in the app's loop: a token read back each step (generate.stream), or one step ahead
(speculate.stream_ahead), which brought `app` up to `queued` (the third visit). The second reuses the first's
compiled step. A third compiles the step as transformers would, copying the cache to every query head rather than
packing the heads (cpu_attention.PACKED_UNDER_MASK): at 8k that copy was a fifth of the step. The profile is of the
app's variant: the kernels that take the most device time, and the host's time per step.

Then the drafts: the app drafts by default (prompt lookup), and on the static path a verify is a second compiled
graph, static_decode.VERIFY_WIDTH tokens wide, launched on top of the step already running. Random weights reply
nothing like a real model, so their drafts say little. Besides the app's own drafter, two know the reply from the
turn without drafts: every draft right (the best drafting can do), every draft wrong (the worst, until the gate
stops drafting). And the bare cost of a verify against a step, which the gate's threshold rests on.
"""

from __future__ import annotations

import time

import gpu_models
import gpu_speed
from gpu_memory import free_after

GRAPHS_GOAL = "where a compiled bf16 decode step's time goes, and whether tuning it reaches 60% of the limit"
#: (key for --variants, name, inductor options added to static_decode.COMPILE_OPTIONS, decode one step ahead, grouped
#: heads packed in the compiled step as cpu_attention does, rather than the cache copied to every query head as
#: transformers does under compile). The second H200 visit measured gpt-fast's coordinate_descent_tuning here:
#: slower (the GEMVs are cuBLAS's), twice the warm-up. The last runs after the drafts, which take the app's step.
VARIANTS = (
    ("read-back", "cuda graphs, a token read back each step", {}, False, True),
    ("ahead", "cuda graphs, one step ahead (the app's)", {}, True, True),
    ("copies", "cuda graphs, one step ahead, the cache copied to every head (transformers')", {}, True, False),
)
#: Tokens each bare-loop rate is measured over, and the steps the profile records.
STEPS = 64
PROFILED = 8
#: A variant's compile (the first H200 run: ~32 s), its turns and rates take about this long.
NEED_S = 75
#: The drafters the drafts table compares, each with the step one ahead; the verify graph compiles on the first.
DRAFTERS = ("off", "ngram (the app's)", "every draft right", "every draft wrong")
#: A drafter's two turns, the first compiling the verify graph (~40 s for an 8B).
DRAFTS_NEED_S = 60


def graphs(ctx, record: dict) -> None:
    from chatapp.engine import cpu_attention, load_model, static_decode

    cuda = ctx.device.startswith("cuda")
    bandwidth = gpu_speed.copy_bandwidth(ctx.device, ctx.sizes.copy_bytes)
    record["copy_bandwidth_bytes_per_s"] = int(bandwidth)
    free_after(ctx)
    context = ctx.sizes.decode_contexts[0]
    folder = ctx.checkpoints.get("llama-3.1-8b")
    loaded = load_model(str(folder), "bf16", settings=ctx.settings, device=ctx.device, context=context + 256)
    rows = record["rows"] = []
    default, packed_on = dict(static_decode.COMPILE_OPTIONS), cpu_attention.PACKED_UNDER_MASK
    compiled_with = None

    def run(variants) -> None:
        nonlocal compiled_with
        for key, name, extra, ahead, packed in variants:
            if ctx.graph_variants and key not in ctx.graph_variants:
                continue
            row = {"variant": name}
            if ctx.left() < NEED_S:
                rows.append({**row, "status": f"skipped: out of time ({ctx.left():.0f} s left of the step's share)"})
                continue
            static_decode.COMPILE_OPTIONS = {**default, **extra}
            cpu_attention.PACKED_UNDER_MASK = packed_on if packed else ()
            fresh = (static_decode.COMPILE_OPTIONS, packed) != compiled_with
            compiled_with = (static_decode.COMPILE_OPTIONS, packed)
            try:
                row.update(_variant(ctx, loaded, context, bandwidth, ahead, fresh, profile=key == "ahead"))
            except Exception as exc:  # this variant's record; the next still runs
                from gpu_check import one_line

                row.update(status="failed", error=one_line(exc))
            if row.get("profile"):
                record["profile"] = row.pop("profile")
            rows.append(row)

    try:
        run(VARIANTS[:-1])
        if any(row.get("status", "").startswith("ok") for row in rows):
            _drafts(ctx, loaded, context, bandwidth, record)
        run(VARIANTS[-1:])
    finally:
        static_decode.COMPILE_OPTIONS, cpu_attention.PACKED_UNDER_MASK = default, packed_on
        loaded.compiled_step = None
    app = [row.get("app_fraction_of_limit") for row in rows if row["variant"] == VARIANTS[1][1]]
    record["goal_met"] = app[0] >= gpu_speed.GRAPH_TARGET if app and app[0] is not None and cuda else None
    if not cuda:
        note = "dry run: no compile on the CPU, so every variant and drafter is the eager step; no verdict"
        record.setdefault("notes", []).append(note)


def _variant(ctx, loaded, context: int, bandwidth: float, ahead: bool, fresh: bool, profile: bool) -> dict:
    """The app's session on the static path (a warm-up turn that compiles when `fresh`, then the measured one, as the
    decode step does), then the bare loops and the profile on that session's cache, the last reply's tokens dropped
    to make room."""
    import torch
    from torch._dynamo.utils import counters

    from chatapp.engine import ChatSession, kvcache, static_decode
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.session import Message

    cuda = ctx.device.startswith("cuda")
    if fresh:  # else the step the last variant compiled, with the same options
        torch._dynamo.reset()
        counters.clear()
        loaded.compiled_step = None
    new, warm = ctx.sizes.decode_new, ctx.sizes.decode_warm
    session = ChatSession(loaded, decode="static", speculative="off", ahead=ahead)
    messages = [Message("user", gpu_models.user_message(loaded.tokenizer, context - new - warm))]
    started = time.perf_counter()
    cached_turn(session, messages, warm)
    row: dict = {"warmup_turn_s": round(time.perf_counter() - started, 1)}
    reply, stats = cached_turn(session, messages, new)
    cache = session._cache
    weights, kv = gpu_speed.bytes_per_token(loaded, kvcache.nbytes(cache))
    limit = bandwidth / (weights + kv)
    row.update(context=stats.cache_tokens, limit_tokens_per_s=round(limit), app_tokens_per_s=stats.decode_tokens_per_s)
    step = static_decode.compiled_step(loaded)
    with torch.inference_mode():
        _make_room(cache, STEPS)
        row["step_tokens_per_s"] = _timed_rate(ctx, lambda: _synced(step, cache, reply[0], STEPS))
        kvcache.drop(cache, STEPS)
        row["queued_tokens_per_s"] = _timed_rate(ctx, lambda: _queued(step, cache, reply[0], STEPS))
        kvcache.drop(cache, STEPS)
        if profile:
            before = int(cache.get_seq_length())
            try:
                row["profile"] = _profile(ctx, step, cache, reply[0])
            except Exception as exc:  # the profiler (CUPTI) failing costs the profile, not the rates
                row["profile_error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            kvcache.drop(cache, int(cache.get_seq_length()) - before)
    for kind in ("app", "step", "queued"):
        row[f"{kind}_fraction_of_limit"] = round(row[f"{kind}_tokens_per_s"] / limit, 3)
    row["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    row["graph_breaks"] = int(sum(counters["graph_break"].values()))
    row["step"] = "compiled" if loaded.compiled_step not in (None, loaded.model) else "eager"
    row["status"] = "ok" if cuda else "ok (eager: a dry run)"
    return row


def _drafts(ctx, loaded, context: int, bandwidth: float, record: dict) -> None:
    """The drafts table (see the module's doc) and the verify's cost, on the compiled step the variants left."""
    from chatapp.engine import ChatSession, kvcache, speculate
    from chatapp.engine.bench import cached_turn
    from chatapp.engine.session import Message

    new, warm = ctx.sizes.decode_new, ctx.sizes.decode_warm
    messages = [Message("user", gpu_models.user_message(loaded.tokenizer, context - new - warm))]
    rows = record["drafts"] = []
    reference: list[int] = []
    plain = None
    for name in DRAFTERS:
        row: dict = {"drafter": name}
        if ctx.left() < DRAFTS_NEED_S:
            rows.append({**row, "status": f"skipped: out of time ({ctx.left():.0f} s left of the step's share)"})
            continue
        session = ChatSession(loaded, decode="static", speculative="off" if name == "off" else "ngram", ahead=True)
        real = speculate.Drafter
        if name.startswith("every"):
            speculate.Drafter = _knowing(reference, right=name == "every draft right", vocab=len(loaded.tokenizer))
        try:
            started = time.perf_counter()
            cached_turn(session, messages, new)  # the first draft compiles the verify graph
            row["warmup_turn_s"] = round(time.perf_counter() - started, 1)
            reply, stats = cached_turn(session, messages, new)
        except Exception as exc:  # this drafter's record; the next still runs
            from gpu_check import one_line

            rows.append({**row, "status": "failed", "error": one_line(exc)})
            continue
        finally:
            speculate.Drafter = real
        reference = reference or reply
        weights, kv = gpu_speed.bytes_per_token(loaded, kvcache.nbytes(session._cache))
        same = next((i for i, (a, b) in enumerate(zip(reply, reference, strict=False)) if a != b), len(reply))
        row.update(
            app_tokens_per_s=stats.decode_tokens_per_s,
            app_fraction_of_limit=round(stats.decode_tokens_per_s * (weights + kv) / bandwidth, 3),
            drafted=stats.drafted_tokens,
            accepted=stats.accepted_tokens,
            tokens=len(reply),
            agree_with_off=same,
            status="ok",
        )
        rows.append(row)
        if name == DRAFTERS[0]:
            plain = (session._cache, reply[0])
    if plain and ctx.left() > 10:
        record["verify"] = [_verify_cost(ctx, loaded, *plain)]  # a list: the Markdown makes it a table


class _Knowing:
    """A drafter that knows the reply (speculate.Drafter's interface): drafts its next tokens, or tokens that are
    each one off them."""

    def __init__(self, reply: list[int], right: bool, vocab: int, ids: list[int]):
        self.reply, self.right, self.vocab, self.pushed = reply, right, vocab, -1

    def push(self, token: int) -> None:
        self.pushed += 1

    def draft(self, sampler):
        from chatapp.engine.speculate import DRAFT_TOKENS

        tokens = self.reply[self.pushed + 1 : self.pushed + 1 + DRAFT_TOKENS]
        return (tokens if self.right else [(t + 1) % self.vocab for t in tokens]), None


def _knowing(reply: list[int], right: bool, vocab: int):
    return lambda ids: _Knowing(reply, right, vocab, ids)


def _verify_cost(ctx, loaded, cache, token: int) -> dict:
    """Milliseconds of a compiled step and of a compiled verify (a draft of DRAFT_TOKENS, padded as the app's), each
    dropped again, over STEPS of them: the verify's cost in steps, which speculate.Gate's threshold rests on."""
    import torch

    from chatapp.engine import kvcache, static_decode
    from chatapp.engine.speculate import DRAFT_TOKENS

    draft = [token] * DRAFT_TOKENS
    with torch.inference_mode():
        _make_room(cache, static_decode.VERIFY_WIDTH)
        static_decode.rows(loaded, cache, draft)  # compiled already, by the drafts above; else now
        kvcache.drop(cache, DRAFT_TOKENS)

        def steps():
            for _ in range(STEPS):
                static_decode.step(loaded, cache, token)
                kvcache.drop(cache, 1)

        def verifies():
            for _ in range(STEPS):
                static_decode.rows(loaded, cache, draft)
                kvcache.drop(cache, DRAFT_TOKENS)

        step_ms = 1e3 / _timed_rate(ctx, steps)
        verify_ms = 1e3 / _timed_rate(ctx, verifies)
    return {
        "step_ms": round(step_ms, 3),
        "verify_ms": round(verify_ms, 3),
        "in_steps": round(verify_ms / step_ms, 2),
    }


def _make_room(cache, tokens: int) -> None:
    """Drop the cache's last tokens until `tokens` more fit its static buffer: a turn that ends near the end of its
    bucket leaves too few for a verify's VERIFY_WIDTH (at 8,192 tokens it left 3, and the verify wrote past the end)."""
    from chatapp.engine import kvcache, static_decode

    spare = static_decode.room(cache) - int(cache.get_seq_length())
    if spare < tokens:
        kvcache.drop(cache, tokens - spare)


def _timed_rate(ctx, run) -> float:
    gpu_speed._sync(ctx.device)
    started = time.perf_counter()
    run()
    gpu_speed._sync(ctx.device)
    return round(STEPS / (time.perf_counter() - started), 1)


def _synced(step, cache, token: int, steps: int) -> None:
    from chatapp.engine.generate import decode_step

    for _ in range(steps):
        token = int(decode_step(step, cache, token).argmax(-1).item())


def _queued(step, cache, token: int, steps: int) -> None:
    """The same steps with the argmax left on the device as the next input: nothing waits for the host."""
    import torch

    ids = torch.tensor([[token]], dtype=torch.long, device=next(iter(cache.layers)).keys.device)
    for _ in range(steps):
        logits = step(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        ids = logits[:, -1:].argmax(-1)


def _profile(ctx, step, cache, token: int) -> list[dict]:
    """torch.profiler over PROFILED bare steps: the busiest device kernels, and the host's and device's time per step
    (device time: the sum of the kernels' own times)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.startswith("cuda") else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        _synced(step, cache, token, PROFILED)
        gpu_speed._sync(ctx.device)
    wall = time.perf_counter() - started
    events = prof.key_averages()

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0) or 0)

    device = sum(device_us(e) for e in events)
    rows = [
        {
            "kernel": "all (per step)",
            "calls": None,
            "device_ms": round(device / 1e3 / PROFILED, 3),
            "share": 1.0,
            "host_wall_ms": round(wall * 1e3 / PROFILED, 3),
        }
    ]
    busiest = sorted(events, key=device_us, reverse=True)[:12]
    for event in busiest:
        if not device_us(event):
            break
        rows.append(
            {
                "kernel": event.key[:90],
                "calls": event.count // PROFILED,
                "device_ms": round(device_us(event) / 1e3 / PROFILED, 3),
                "share": round(device_us(event) / device, 3) if device else None,
            }
        )
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    rows += [
        {
            "kernel": f"host: {event.key[:80]}",
            "calls": event.count // PROFILED,
            "host_ms": round(event.self_cpu_time_total / 1e3 / PROFILED, 3),
        }
        for event in host
    ]
    return rows
