"""Pure decisions: which preset `auto` means here, and which attention implementation to use.

Nothing here touches torch or the hardware; callers pass in what they found, so every rule can be
tested against machines we don't have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .units import gb as _gb

if TYPE_CHECKING:
    from .facts import ModelFacts
    from .hardware import Hardware

PRESETS = ("auto", "bf16", "fp16", "fp32", "int8", "nf4")
#: Flash Attention 2 needs Ampere (compute capability 8.0) or newer.
FLASH_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class Decision:
    value: str
    reasons: tuple[str, ...]


def choose_attention(
    *,
    device_type: str,
    compute_dtype: str,
    compute_capability: tuple[int, int] | None = None,
    flash_attn_installed: bool = False,
    sdpa_available: bool = True,
) -> Decision:
    """flash_attention_2 where it is installed and supported, else sdpa, else eager."""
    why_not_flash = None
    if not flash_attn_installed:
        why_not_flash = "flash-attn is not installed (pip install 'chatapp[flash]')"
    elif device_type != "cuda":
        why_not_flash = f"flash-attn needs a CUDA GPU, this is {device_type}"
    elif compute_capability is None or compute_capability < FLASH_MIN_CAPABILITY:
        why_not_flash = f"flash-attn needs compute capability >= 8.0, this GPU has {compute_capability}"
    elif compute_dtype not in ("bf16", "fp16"):
        why_not_flash = f"flash-attn needs fp16/bf16, the model computes in {compute_dtype}"
    if why_not_flash is None:
        return Decision("flash_attention_2", ("flash-attn is installed and this GPU supports it",))
    if sdpa_available:
        return Decision("sdpa", (why_not_flash, "using PyTorch SDPA"))
    return Decision("eager", (why_not_flash, "this model has no SDPA support, using eager attention"))


def compute_dtype_for(preset: str, *, device_type: str, bf16_supported: bool) -> str:
    """The dtype activations run in. Quantized presets compute in bf16 where the device runs it well.

    bf16 on a CPU without native bf16 keeps bf16 weights but computes in fp32 (engine/bf16_weights.py).
    """
    if preset == "bf16" and device_type == "cpu" and not bf16_supported:
        return "fp32"
    if preset in ("bf16", "fp16", "fp32"):
        return preset
    if bf16_supported:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


# -- memory -----------------------------------------------------------------------------------

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: nf4: 4-bit codes, one 8-bit absmax per 64-weight block, and (double quant) one fp32 per 256 absmaxes.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: The session prefills at most this many tokens per forward pass, which bounds activation memory.
PREFILL_CHUNK = 2048
#: CUDA context + cuBLAS workspace of one process. Measured on an H200 (bench/GPU.md): 102 MiB for the context and
#: cuBLAS, 300-380 MiB in use by the process before any model; estimates with this much were within 0.94-1.09 of
#: the process's whole device memory.
CUDA_OVERHEAD_BYTES = 512 * 1024**2
#: Measured on CPU (bench/MEMORY.md): ~250 MB of torch + transformers runtime, plus load-time copies.
CPU_OVERHEAD_BYTES = 400 * 1024**2
#: bf16 weights with fp32 math (a CPU without native bf16) upcast at most this much of a weight at once.
UPCAST_BLOCK_BYTES = 64 * 1024**2
#: Plans keep this share of a device's free memory in reserve.
SAFETY_MARGIN = 0.05
CONTEXT_FLOOR = 8192
#: The context a verdict is given at when the user set no context_cap: a long chat, not the model's 128k maximum
#: that almost nobody fills (and that the KV cache only reaches if the chat does).
PRACTICAL_CONTEXT = 8192
WEIGHT_PRESETS = ("bf16", "fp16", "fp32", "int8", "nf4")


@dataclass(frozen=True)
class Estimate:
    preset: str
    context_tokens: int
    weights_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes + self.overhead_bytes


def weights_bytes(facts: ModelFacts, preset: str, compute_dtype: str) -> int:
    """bitsandbytes quantizes the Linear layers in the blocks; embeddings, lm_head and norms stay in compute_dtype."""
    if preset in DTYPE_BYTES:
        return facts.params * DTYPE_BYTES[preset]
    kept = (facts.params - facts.quantizable_params) * DTYPE_BYTES[compute_dtype]
    if preset == "int8":
        # int8 codes plus one fp32 scale per output row.
        return kept + facts.quantizable_params + 4 * facts.quantizable_params // facts.hidden_size
    if preset == "nf4":
        return kept + int(facts.quantizable_params * NF4_BYTES_PER_PARAM)
    raise ValueError(f"unknown preset {preset!r}")


def kv_cache_bytes(facts: ModelFacts, context_tokens: int, dtype: str) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x tokens x bytes; sliding-window layers hold at most their window."""
    per_token_layer = 2 * facts.kv_heads * facts.head_dim * DTYPE_BYTES[dtype]
    full = facts.layers - facts.sliding_layers
    window = min(context_tokens, facts.sliding_window or context_tokens)
    return per_token_layer * (full * context_tokens + facts.sliding_layers * window)


def activation_bytes(facts: ModelFacts, context_tokens: int, dtype: str, device_type: str = "cuda") -> int:
    """Peak of a prefill: the MLP's gate/up/act tensors plus two hidden-state copies, fp32 logits, and the attention
    scores where something holds them.

    A GPU prefills in chunks of PREFILL_CHUNK, and SDPA's fused kernels never hold the attention scores.
    A CPU prefills a first prompt whole (the causal kernel holds no scores), but a chunk on top of a cache
    needs a mask, takes SDPA's math path, and its scores (heads x chunk x context) are real memory.
    Eager attention (facts.eager_attention: Gemma 2, as SDPA can't softcap) holds the largest chunk's scores on
    every device, three times over: the product in the compute dtype, its fp32 softmax, and the softmax cast back.
    A CPU then prefills even a first prompt in chunks (engine/generate.py), so that chunk is PREFILL_CHUNK at most.
    """
    per_token = (3 * facts.intermediate_size + 2 * facts.hidden_size) * DTYPE_BYTES[dtype]
    logits = 4 * facts.vocab_size
    chunk = min(context_tokens, PREFILL_CHUNK)
    if facts.eager_attention:
        # In fp32 the cast back is the same tensor, so 4 of the 12 bytes a score counts there aren't held.
        # flash_attention_2 takes softcaps: with flash-attn installed Gemma 2 holds no scores, and counting them
        # anyway overestimates a 9B by ~5%, which is simpler than making the estimate depend on the attention chosen.
        scores = facts.attention_heads * chunk * context_tokens * (2 * DTYPE_BYTES[dtype] + 4)
        return chunk * per_token + scores + logits
    if device_type != "cpu":  # CUDA and MPS: chunked prefill, fused attention
        return chunk * per_token + logits
    whole = context_tokens * per_token
    scores = facts.attention_heads * chunk * context_tokens * DTYPE_BYTES[dtype]
    return max(whole, chunk * per_token + scores) + logits


def estimate(
    facts, preset: str, context_tokens: int, *, device_type: str = "cuda", bf16_supported: bool = True
) -> Estimate:
    compute = compute_dtype_for(preset, device_type=device_type, bf16_supported=bf16_supported)
    return Estimate(
        preset=preset,
        context_tokens=context_tokens,
        weights_bytes=weights_bytes(facts, preset, compute),
        kv_cache_bytes=kv_cache_bytes(facts, context_tokens, compute),
        activation_bytes=activation_bytes(facts, context_tokens, compute, device_type)
        + (UPCAST_BLOCK_BYTES if preset != compute and preset in DTYPE_BYTES else 0),
        overhead_bytes=CUDA_OVERHEAD_BYTES if device_type == "cuda" else CPU_OVERHEAD_BYTES,
    )


def usable_bytes(free: int) -> int:
    return int(free * (1 - SAFETY_MARGIN))


# -- choosing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    preset: str
    context_tokens: int
    #: "cpu", "cuda:N", or "auto" (accelerate spreads layers over max_memory).
    device_map: str
    attn_implementation: str
    estimate: Estimate
    max_memory: dict | None = None
    slow: bool = False
    #: Estimated decode rate at context_tokens (see decode_tokens_per_s).
    tokens_per_s: float | None = None
    #: The longest context at which this preset fits here (see longest_context); None for a GPU+CPU split.
    max_context_tokens: int | None = None
    #: KV cache all chats together may keep live (GPU memory, or RAM on a CPU), and parked in CPU RAM.
    cache_live_bytes: int = 0
    cache_parked_bytes: int = 0


@dataclass(frozen=True)
class DraftShare:
    """A draft model's memory next to the model it drafts for: its weights in the model's compute dtype and a KV
    cache as long as the model's (each chat's cache has a draft twin), and whether both fit together."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int
    fits: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class Plan:
    """What `choose` decided for one model on one machine, and why.

    `presets` holds every weight preset's estimate at the plan's context (the chosen one, or the floor when nothing
    fits) with where it fits (a device label, or None: nowhere). `choice` is None when nothing fits. `reasons` are
    the steps in order, each with its numbers, ending with the attention implementation or the refusal.
    """

    facts: ModelFacts
    hardware: Hardware
    presets: tuple[tuple[Estimate, str | None], ...]
    choice: Choice | None
    reasons: tuple[str, ...]
    #: The draft model's share, when one was asked for (see choose).
    draft: DraftShare | None = None


_DEVICE_NAMES = {"cuda": "GPU", "mps": "Apple GPU", "cpu": "CPU"}


@dataclass(frozen=True)
class _Target:
    label: str
    device_map: str
    budget: int
    device_type: str
    gpus: int = 0


def _targets(hardware: Hardware) -> list[_Target]:
    if not hardware.gpus and hardware.mps:
        return [_Target("Apple GPU (unified memory)", "mps", usable_bytes(hardware.cpu.ram_available_bytes), "mps")]
    if not hardware.gpus:
        return [_Target("CPU RAM", "cpu", usable_bytes(hardware.cpu.ram_available_bytes), "cpu")]
    best = max(hardware.gpus, key=lambda g: g.free_bytes)
    targets = [
        _Target(f"GPU {best.index} ({best.name})", f"cuda:{best.index}", usable_bytes(best.free_bytes), "cuda", 1)
    ]
    if len(hardware.gpus) > 1:
        pool = max(
            0, sum(usable_bytes(g.free_bytes) for g in hardware.gpus) - (len(hardware.gpus) - 1) * CUDA_OVERHEAD_BYTES
        )
        targets.append(_Target(f"{len(hardware.gpus)} GPUs", "auto", pool, "cuda", len(hardware.gpus)))
    return targets


def _fit_context(facts, preset, want, floor, target, bf16) -> int | None:
    """The largest context in [floor, want] at which preset fits target, or None."""

    def fits(ctx):
        est = estimate(facts, preset, ctx, device_type=target.device_type, bf16_supported=bf16)
        return est.total_bytes <= target.budget

    if fits(want):
        return want
    if floor >= want or not fits(floor):
        return None
    low, high = floor, want  # fits(low), not fits(high)
    while high - low > 1024:
        mid = (low + high) // 2 // 1024 * 1024
        if mid <= low:
            break
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def device_kind(hardware: Hardware) -> tuple[str, bool]:
    """("cuda", "mps" or "cpu", and whether it computes bf16 natively): what the plan runs on."""
    if hardware.gpus:
        return "cuda", all(g.bf16_supported for g in hardware.gpus)
    if hardware.mps:
        return "mps", True
    return "cpu", hardware.cpu.bf16_native


def auto_ladder(hardware: Hardware) -> tuple[str, ...]:
    """The presets `auto` tries on this hardware, in order. The one home of this rule: verdicts use it too.

    A GPU: bf16, or fp16 where bf16 isn't supported (pre-Ampere, e.g. a T4). A CPU: bf16; where it has no native
    bf16, bf16 weights with fp32 math (half fp32's memory, and faster decoding). Then nf4 when memory is short.
    """
    device_type, bf16 = device_kind(hardware)
    if device_type == "cpu":
        return ("bf16", "nf4")
    return ("bf16" if bf16 else "fp16", "nf4")


def practical_context(facts: ModelFacts, context_cap: int | None = None) -> int:
    """The context a user will get: their context_cap when set, else PRACTICAL_CONTEXT; at most the model's own."""
    return min(context_cap or PRACTICAL_CONTEXT, facts.max_context)


def longest_context(hardware: Hardware, facts: ModelFacts, preset: str) -> int | None:
    """The longest context (to 1,024 tokens, at most the model's maximum) at which preset fits on one of hardware's
    devices (or its GPUs together); None when it doesn't fit even at 1,024 tokens."""
    _, bf16 = device_kind(hardware)
    floor = min(1024, facts.max_context)
    fits = [_fit_context(facts, preset, facts.max_context, floor, t, bf16) for t in _targets(hardware)]
    return max((ctx for ctx in fits if ctx is not None), default=None)


# -- decode speed -------------------------------------------------------------------------------
# At batch size 1 every new token reads all the weights and the whole KV cache once, so decoding runs at about
# memory bandwidth / bytes read per token. The defaults below are effective rates (what decoding gets, not a data
# sheet's peak), chosen on the low side: an estimate that says "slow" for a model that turns out fine is a small
# disappointment; one that says "~20 tok/s" for a model that crawls is the false promise users complain about.

#: CPU, per core: on our 2-core boxes SmolLM2-135M fp32 (0.54 GB of weights) decodes at 12-17 tok/s (7-9 GB/s
#: effective, helped by caches), while a matrix-vector product too big for any cache, which is what a big model's
#: decode is, streams 6.6 GB/s on the same 2 cores (torch, fp32). 3 GB/s per core gives 6 GB/s there: a little
#: under both, so big models are not promised more than they get.
CPU_BANDWIDTH_PER_CORE = 3e9
#: One socket's memory channels cap what more cores can pull: 40 GB/s is below dual-channel DDR5.
CPU_BANDWIDTH_MAX = 40e9
#: Cores assumed when the count is unknown (hardware described by hand): the smallest machine we run on.
CPU_CORES_DEFAULT = 2
#: Apple GPU: a base M1 has 68 GB/s peak (Pro/Max chips 200-400 GB/s); we assume the base chip, minus some.
MPS_BANDWIDTH = 50e9
#: A CUDA GPU whose bandwidth NVML didn't report (or one described by hand): below a T4's 320 GB/s peak.
CUDA_BANDWIDTH = 200e9
#: The share of a GPU's peak (NVML) bandwidth that decoding reaches in practice.
BANDWIDTH_EFFICIENCY = 0.7
#: A GPU waits for Python: eager PyTorch launches a few dozen small kernels per layer per token. gpt-fast's eager
#: baseline, Llama-2-7B fp16 on an A100, decodes 25.5 tok/s where bandwidth alone allows ~110, i.e. ~0.9 ms a layer
#: of overhead; without it a 135M model would be promised hundreds of tokens a second. CPU: none here, because
#: CPU_BANDWIDTH_PER_CORE was calibrated on a real decode, overhead included.
LAYER_OVERHEAD_S = {"cuda": 0.8e-3, "mps": 0.8e-3, "cpu": 0.0}
#: Below this estimated rate a model fits but isn't really usable: a short 100-token reply takes most of a minute.
USABLE_TOKENS_PER_S = 2.0


def cpu_bandwidth_bytes_per_s(hardware: Hardware) -> float:
    """Effective CPU RAM bandwidth for decoding: CPU_BANDWIDTH_PER_CORE per core, at most CPU_BANDWIDTH_MAX."""
    cores = hardware.cpu.cores or CPU_CORES_DEFAULT
    return min(cores * CPU_BANDWIDTH_PER_CORE, CPU_BANDWIDTH_MAX)


def bandwidth_bytes_per_s(hardware: Hardware) -> float:
    """Effective memory bandwidth of the device a plan runs on: NVML's peak x BANDWIDTH_EFFICIENCY for GPUs
    (the slowest one, when layers are spread over several), else the conservative default of the device type."""
    device_type, _ = device_kind(hardware)
    if device_type == "cuda":
        known = [g.bandwidth_bytes_per_s for g in hardware.gpus]
        return min(known) * BANDWIDTH_EFFICIENCY if all(known) else CUDA_BANDWIDTH
    return MPS_BANDWIDTH if device_type == "mps" else cpu_bandwidth_bytes_per_s(hardware)


def decode_tokens_per_s(
    hardware: Hardware, facts: ModelFacts, preset: str, context: int, *, offloaded_bytes: int = 0
) -> float:
    """Estimated decode rate with `context` tokens in the cache: bandwidth / (weights + KV cache) bytes, plus
    LAYER_OVERHEAD_S per layer on a GPU.

    `offloaded_bytes` of them live in CPU RAM (a GPU+CPU split) and are read at the CPU's bandwidth.
    """
    device_type, bf16 = device_kind(hardware)
    compute = compute_dtype_for(preset, device_type=device_type, bf16_supported=bf16)
    read = weights_bytes(facts, preset, compute) + kv_cache_bytes(facts, context, compute)
    on_cpu = min(max(0, offloaded_bytes), read)
    seconds = (read - on_cpu) / bandwidth_bytes_per_s(hardware) + on_cpu / cpu_bandwidth_bytes_per_s(hardware)
    seconds += facts.layers * LAYER_OVERHEAD_S[device_type]
    return 1 / seconds


def _max_memory(hardware: Hardware, cpu_bytes: int | None = None) -> dict:
    # A GPU with less free memory than its CUDA context takes holds no weights, rather than a negative amount.
    memory: dict = {g.index: max(0, usable_bytes(g.free_bytes) - CUDA_OVERHEAD_BYTES) for g in hardware.gpus}
    if cpu_bytes is not None:
        memory["cpu"] = cpu_bytes
    return memory


#: Chats whose caches stay live (in GPU memory, or RAM on a CPU) at the plan's context, where there is room.
LIVE_CONTEXTS = 4
#: On a GPU, caches evicted from it park in CPU RAM before going to disk: this many contexts at most...
PARKED_CONTEXTS = 8
#: ...and at most this share of the available RAM.
PARKED_RAM_SHARE = 0.25


def cache_budgets(per_context: int, room_bytes: int, ram_available_bytes: int, on_gpu: bool) -> tuple[int, int]:
    """(live, parked) bytes of KV cache for all chats together, by the KV formula's bytes per full context.

    Live: the chat in use always, plus as many more full contexts as the room left after the plan's estimate
    holds, up to LIVE_CONTEXTS. Parked: only with a GPU (on a CPU the live tier is RAM already).
    """
    per_context = max(per_context, 1)
    live = per_context * max(1, min(LIVE_CONTEXTS, 1 + max(room_bytes, 0) // per_context))
    parked = int(min(PARKED_CONTEXTS * per_context, ram_available_bytes * PARKED_RAM_SHARE)) if on_gpu else 0
    return live, parked


def describe_cache_budgets(live: int, parked: int, per_context: int, where: str) -> str:
    chats = max(1, live // max(per_context, 1))
    text = f"KV cache: {chats} chat(s) at full context stay live in {where} ({_gb(live)})"
    if parked:
        text += f", then {_gb(parked)} parked in CPU RAM"
    return text + ", then snapshots on disk (kv_disk_budget)"


def choose(
    hardware: Hardware,
    facts: ModelFacts,
    context: int | None = None,
    preset: str = "auto",
    flash_attn_installed: bool = False,
    draft: ModelFacts | None = None,
) -> Plan:
    """The best preset and context that fit, with the reasons; or no choice, saying what was needed and what is here.

    A draft model (speculative decoding) is budgeted after the model: it is left out, and said so, when the two
    don't fit together; the model is never given a smaller preset or context to make room for it.
    """
    reasons: list[str] = []
    targets = _targets(hardware)
    on_gpu = bool(hardware.gpus)
    device_type, bf16 = device_kind(hardware)
    want = min(context or facts.max_context, facts.max_context)
    if context and context > facts.max_context:
        reasons.append(f"{facts.name} handles at most {facts.max_context:,} tokens; context capped there")
    floor = want if context else min(CONTEXT_FLOOR, facts.max_context)

    if preset == "auto":
        ladder = list(auto_ladder(hardware))
        fast = ladder[0]
        reasons.append(
            f"{_DEVICE_NAMES[device_type]} {'runs' if bf16 else 'has no native'} bf16: trying {fast}, then nf4"
        )
    else:
        ladder = [preset]

    choice = None
    for candidate in ladder:
        for target in targets:
            ctx = _fit_context(facts, candidate, want, floor, target, bf16)
            if ctx is None:
                continue
            est = estimate(facts, candidate, ctx, device_type=target.device_type, bf16_supported=bf16)
            if ctx < want:
                full = estimate(facts, candidate, want, device_type=device_type, bf16_supported=bf16)
                reasons.append(
                    f"{candidate} at the full {want:,}-token context needs {_gb(full.total_bytes)}; "
                    f"context lowered to {ctx:,} so {candidate} fits"
                )
            reasons.append(
                f"{candidate} needs {_gb(est.total_bytes)} at {ctx:,} tokens; "
                f"{target.label} has {_gb(target.budget)} usable"
            )
            choice = Choice(
                preset=candidate,
                context_tokens=ctx,
                device_map=target.device_map,
                attn_implementation="",
                estimate=est,
                max_memory=_max_memory(hardware) if target.device_map == "auto" else None,
            )
            break
        if choice:
            break
        smallest = estimate(facts, candidate, floor, device_type=device_type, bf16_supported=bf16)
        reasons.append(
            f"{candidate} needs {_gb(smallest.total_bytes)} even at {floor:,} tokens, more than "
            f"{_gb(max(t.budget for t in targets))} usable on {max(targets, key=lambda t: t.budget).label}"
        )

    if choice is None and on_gpu and preset in ("auto", "bf16", "fp16"):
        half = ("bf16" if bf16 else "fp16") if preset == "auto" else preset
        est = estimate(facts, half, floor, device_type="cuda", bf16_supported=bf16)
        cpu = usable_bytes(hardware.cpu.ram_available_bytes)
        gpu = sum(_max_memory(hardware).values())
        if est.total_bytes <= gpu + cpu:
            reasons.append(
                f"splitting {half} weights over the GPU ({_gb(gpu)}) and CPU RAM ({_gb(cpu)}) with "
                "device_map=auto: it fits, but layers on the CPU make it slow"
            )
            speed = decode_tokens_per_s(hardware, facts, half, floor, offloaded_bytes=est.total_bytes - gpu)
            choice = Choice(half, floor, "auto", "", est, _max_memory(hardware, cpu), slow=True, tokens_per_s=speed)

    if choice is not None:
        compute = compute_dtype_for(choice.preset, device_type=device_type, bf16_supported=bf16)
        best = max(hardware.gpus, key=lambda g: g.free_bytes) if on_gpu else None
        attention = choose_attention(
            device_type=device_type,
            compute_dtype=compute,
            compute_capability=best.compute_capability if best else None,
            flash_attn_installed=flash_attn_installed,
        )
        if facts.eager_attention and attention.value == "sdpa":
            # What the loader falls back to for such a model; the plan says it rather than SDPA, which won't run.
            attention = Decision("eager", ("transformers has no SDPA for this model's soft-capped attention",))
        extra: dict = {"attn_implementation": attention.value}
        if draft is not None:
            share = draft_share(draft, choice, compute, targets)
        if not choice.slow:
            target = next(t for t in targets if t.device_map == choice.device_map)
            per_context = choice.estimate.kv_cache_bytes
            room = target.budget - choice.estimate.total_bytes - (share.total_bytes if draft and share.fits else 0)
            live, parked = cache_budgets(per_context, room, hardware.cpu.ram_available_bytes, on_gpu)
            extra.update(cache_live_bytes=live, cache_parked_bytes=parked)
            where = "GPU memory" if on_gpu else "CPU RAM" if device_type == "cpu" else "memory"
            cache_reason = describe_cache_budgets(live, parked, per_context, where)
            extra["tokens_per_s"] = decode_tokens_per_s(hardware, facts, choice.preset, choice.context_tokens)
            extra["max_context_tokens"] = longest_context(hardware, facts, choice.preset)
        choice = Choice(**{**choice.__dict__, **extra})
        if not choice.slow:
            reasons.append(cache_reason)
        reasons.append(f"attention: {attention.value} ({attention.reasons[0]})")
    else:
        smallest = min(
            (estimate(facts, p, floor, device_type=device_type, bf16_supported=bf16) for p in ("nf4",) + tuple(ladder)),
            key=lambda e: e.total_bytes,
        )
        biggest = max(targets, key=lambda t: t.budget)
        reasons.append(
            f"nothing fits: the smallest need is {smallest.preset} at {floor:,} tokens, {_gb(smallest.total_bytes)}; "
            f"the biggest device is {biggest.label} with {_gb(biggest.budget)} usable"
        )

    shown_ctx = choice.context_tokens if choice else floor
    table = []
    for p in WEIGHT_PRESETS:
        est = estimate(facts, p, shown_ctx, device_type=device_type, bf16_supported=bf16)
        where = next((t.label for t in targets if est.total_bytes <= t.budget), None)
        table.append((est, where))
    if draft is not None and choice is None:
        share = DraftShare(draft.name, 0, 0, fits=False)
    return Plan(facts, hardware, tuple(table), choice, tuple(reasons), share if draft is not None else None)


def draft_share(draft: ModelFacts, choice: Choice, compute: str, targets: list[_Target]) -> DraftShare:
    """The draft's weights (unquantized: the model's preset, or its compute dtype) and its cache at the model's
    context, and whether they fit in what the chosen device has left; a model split over GPU and CPU gets no draft."""
    dtype = compute if compute in DTYPE_BYTES else "bf16"
    preset = choice.preset if choice.preset in DTYPE_BYTES else dtype
    weights = weights_bytes(draft, preset, dtype)
    cache = kv_cache_bytes(draft, min(choice.context_tokens, draft.max_context), dtype)
    target = next((t for t in targets if t.device_map == choice.device_map), None)
    fits = not choice.slow and target is not None and choice.estimate.total_bytes + weights + cache <= target.budget
    return DraftShare(draft.name, weights, cache, fits)


def describe_draft(plan: Plan) -> str:
    """The draft's line in `chatapp plan` and the load notes: its share, or why it is left out."""
    share, choice = plan.draft, plan.choice
    need = f"{_gb(share.weights_bytes)} weights + {_gb(share.kv_cache_bytes)} cache"
    if choice is None:
        return f"draft {share.name} left out: the model itself doesn't fit"
    if share.fits:
        return f"draft {share.name}: {need}, beside the model (speculative decoding)"
    if choice.slow:
        return f"draft {share.name} left out: the model itself is split over the GPU and CPU RAM"
    return f"draft {share.name} left out: its {need} don't fit beside the model; the model loads without it"


def shortfall(plan: Plan, preset: str) -> str:
    """Why `preset` doesn't fit, in one line with the numbers: what it needs at the plan's context (for auto, the
    least of the presets it tries), and the most any device here has."""
    tried = auto_ladder(plan.hardware) if preset == "auto" else (preset,)
    need = min((est for est, _ in plan.presets if est.preset in tried), key=lambda est: est.total_bytes)
    biggest = max(_targets(plan.hardware), key=lambda t: t.budget)
    return (
        f"{need.preset} needs {_gb(need.total_bytes)} at {need.context_tokens:,} tokens; "
        f"{biggest.label} has {_gb(biggest.budget)} usable"
    )


def plan_dict(plan: Plan) -> dict:
    """The `chatapp plan --json` contract."""
    hw = plan.hardware
    return {
        "model": plan.facts.as_dict(),
        "hardware": {
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "total_bytes": g.total_bytes,
                    "free_bytes": g.free_bytes,
                    "compute_capability": list(g.compute_capability) if g.compute_capability else None,
                    "bf16": g.bf16_supported,
                    "bandwidth_bytes_per_s": g.bandwidth_bytes_per_s,
                }
                for g in hw.gpus
            ],
            "cpu": {
                "ram_total_bytes": hw.cpu.ram_total_bytes,
                "ram_available_bytes": hw.cpu.ram_available_bytes,
                "bf16_native": hw.cpu.bf16_native,
            },
        },
        "presets": [
            {
                "preset": est.preset,
                "weights_bytes": est.weights_bytes,
                "kv_cache_bytes": est.kv_cache_bytes,
                "overhead_bytes": est.activation_bytes + est.overhead_bytes,
                "total_bytes": est.total_bytes,
                "fits": where is not None,
                "fits_on": where,
            }
            for est, where in plan.presets
        ],
        "choice": None
        if plan.choice is None
        else {
            "preset": plan.choice.preset,
            "context_tokens": plan.choice.context_tokens,
            "device_map": plan.choice.device_map,
            "attn_implementation": plan.choice.attn_implementation,
            "max_memory": {str(k): v for k, v in plan.choice.max_memory.items()} if plan.choice.max_memory else None,
            "slow": plan.choice.slow,
            "total_bytes": plan.choice.estimate.total_bytes,
            "max_context_tokens": plan.choice.max_context_tokens,
            "decode_tokens_per_s": plan.choice.tokens_per_s,
            "cache_live_bytes": plan.choice.cache_live_bytes,
            "cache_parked_bytes": plan.choice.cache_parked_bytes,
        },
        "reasons": list(plan.reasons),
        "draft": None
        if plan.draft is None
        else {
            "model": plan.draft.name,
            "weights_bytes": plan.draft.weights_bytes,
            "kv_cache_bytes": plan.draft.kv_cache_bytes,
            "fits": plan.draft.fits,
        },
    }
