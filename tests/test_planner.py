"""The planner's pure decisions: memory estimates, the choice of preset, context and attention, and decode-speed
estimates, tested against simulated machines we don't have."""

from __future__ import annotations

from dataclasses import replace

import pytest

from chatapp.catalog import load_catalog
from chatapp.facts import facts_from_spec
from chatapp.hardware import CpuInfo, GpuInfo, Hardware, describe_by_hand
from chatapp.planner import (
    CONTEXT_FLOOR,
    PREFILL_CHUNK,
    activation_bytes,
    auto_ladder,
    bandwidth_bytes_per_s,
    choose,
    choose_attention,
    compute_dtype_for,
    decode_tokens_per_s,
    estimate,
    kv_cache_bytes,
    longest_context,
    plan_dict,
    practical_context,
    weights_bytes,
)

GIB = 1024**3
CATALOG = load_catalog()


def facts(key):
    return facts_from_spec(CATALOG[key])


def cpu(ram_gib: float, bf16: bool = False) -> CpuInfo:
    flags = frozenset({"avx2", "avx512_bf16"} if bf16 else {"avx2"})
    return CpuInfo(int(ram_gib * GIB), int(ram_gib * GIB), flags)


def gpu(gib: float, capability=(8, 6), index=0, name="GPU") -> GpuInfo:
    return GpuInfo(index, name, int(gib * GIB), int(gib * GIB), capability)


def machine(*gpus_gib: float, ram_gib: float = 32, capability=(8, 6)) -> Hardware:
    return Hardware(cpu(ram_gib), tuple(gpu(g, capability, i) for i, g in enumerate(gpus_gib)))


# -- estimates against first principles -------------------------------------------------------


@pytest.mark.parametrize(
    "key, params",
    [
        ("llama-3.1-8b", 8_030_261_248),
        ("qwen2.5-7b", 7_615_616_512),
        ("smollm2-135m", 134_515_008),
        ("llama-3.2-1b", 1_235_814_400),
        ("mistral-7b", 7_248_023_552),
    ],
)
def test_parameter_counts_from_architecture(key, params):
    assert facts(key).params == params


def test_llama_8b_bf16_weights_and_kv_cache():
    f = facts("llama-3.1-8b")
    assert weights_bytes(f, "bf16", "bf16") == 16_060_522_496  # 16.06 GB
    assert kv_cache_bytes(f, 8192, "bf16") == 2 * 32 * 8 * 128 * 8192 * 2  # 1.07 GB, GQA: 8 KV heads not 32
    total = estimate(f, "bf16", 8192).total_bytes
    assert abs(total - 18e9) / 18e9 < 0.10


def test_bnb_keeps_embeddings_16_bit_and_nf4_carries_scales():
    f = facts("llama-3.1-8b")
    embeddings = 2 * 128256 * 4096  # input embeddings + untied lm_head
    linear = f.params - embeddings - (2 * 32 + 1) * 4096
    assert f.quantizable_params == linear
    nf4 = weights_bytes(f, "nf4", "bf16")
    assert nf4 == (f.params - linear) * 2 + int(linear * (0.5 + 1 / 64 + 4 / (64 * 256)))
    assert 5.5e9 < nf4 < 6.0e9
    int8 = weights_bytes(f, "int8", "bf16")
    assert (f.params - linear) * 2 + linear < int8 < (f.params - linear) * 2 + linear * 1.01
    # On a CPU without native bf16, what bnb leaves unquantized is fp32.
    assert weights_bytes(f, "nf4", "fp32") - nf4 == (f.params - linear) * 2


@pytest.mark.parametrize(
    "flash, expected",
    [(False, "attention: eager (transformers has no SDPA"), (True, "attention: flash_attention_2 (")],
)
def test_a_soft_capped_models_plan_names_the_attention_it_will_load_with(flash, expected):
    """Gemma 2's plan said SDPA, which the loader then swapped for eager; flash-attn takes soft caps."""
    plan = choose(machine(48, 48), facts("gemma-2-9b"), context=8192, flash_attn_installed=flash)
    assert plan.choice.attn_implementation == expected.split()[1].rstrip(" (")
    assert plan.reasons[-1].startswith(expected)


def test_sliding_window_layers_cap_their_cache():
    f = facts("gemma-2-9b")
    full, sliding = f.layers - f.sliding_layers, f.sliding_layers
    per = 2 * f.kv_heads * f.head_dim * 2
    assert kv_cache_bytes(f, 8192, "bf16") == per * (full * 8192 + sliding * 4096)
    assert kv_cache_bytes(f, 2048, "bf16") == per * f.layers * 2048


@pytest.mark.parametrize("preset, peak_mib", [("bf16", 20_441.2), ("nf4", 8_660.8), ("int8", 12_513.7)])
def test_eager_attention_counts_the_scores_of_the_largest_chunk(preset, peak_mib):
    """Gemma 2 attends eagerly (SDPA can't softcap): the bf16 product, its fp32 softmax and the bf16 copy of that
    are alive at once. On an H200 (bench/GPU.md, section 6), 4,159 tokens in chunks of 2,048 peaked at peak_mib
    allocated, 7-16% above the estimate without the scores."""
    f = facts("gemma-2-9b")
    assert f.eager_attention and PREFILL_CHUNK == 2048
    scores = 16 * 2048 * 4159 * (2 * 2 + 4)
    with_scores = estimate(f, preset, 4159)
    without = estimate(replace(f, eager_attention=False), preset, 4159)
    assert with_scores.activation_bytes - without.activation_bytes == scores == 1_090_256_896
    # The measured peak is torch's allocations, which the CUDA context and cuBLAS workspace are not.
    counted = (with_scores.total_bytes - with_scores.overhead_bytes) / 1024**2
    assert 0.95 < counted / peak_mib < 1.10
    # A CPU chunks a first prompt too (engine/generate.py), so no whole-prompt term: the same chunk and scores.
    assert activation_bytes(f, 8192, "bf16", "cpu") == activation_bytes(f, 8192, "bf16", "cuda")


# -- choices over simulated hardware ------------------------------------------------------------


@pytest.mark.parametrize(
    "hardware, expected_preset, expected_map",
    [
        (machine(24), "bf16", "cuda:0"),
        (machine(48), "bf16", "cuda:0"),
        (machine(80), "bf16", "cuda:0"),
        (machine(16), "nf4", "cuda:0"),
        (machine(12), "nf4", "cuda:0"),
        (machine(8), "nf4", "cuda:0"),
        (machine(4), "bf16", "auto"),  # nf4 needs ~7.5 GB: split bf16 over GPU + CPU RAM, flagged slow
        (machine(24, 24), "bf16", "cuda:0"),  # fits on one: no split
        (machine(16, capability=(7, 0)), "nf4", "cuda:0"),  # V100: no bf16, fp16 doesn't fit
        (machine(24, capability=(7, 5)), "fp16", "cuda:0"),  # pre-Ampere: fp16 instead of bf16
        (machine(ram_gib=64), "bf16", "cpu"),  # no native bf16: bf16 weights with fp32 math
        (machine(ram_gib=16), "nf4", "cpu"),
    ],
    ids=["24G", "48G", "80G", "16G", "12G", "8G", "4G", "2x24G", "V100-16G", "T4-24G", "cpu-64G", "cpu-16G"],
)
def test_llama_8b_at_8k(hardware, expected_preset, expected_map):
    plan = choose(hardware, facts("llama-3.1-8b"), context=8192)
    assert plan.choice is not None, plan.reasons
    assert (plan.choice.preset, plan.choice.device_map) == (expected_preset, expected_map)
    assert plan.choice.context_tokens == 8192
    assert any(r.startswith(f"{expected_preset} needs") or f"splitting {expected_preset}" in r for r in plan.reasons)
    assert plan.reasons[-1].startswith("attention: sdpa")


def test_llama_8b_on_a_cpu_with_8_gib_is_refused_with_numbers():
    plan = choose(machine(ram_gib=8), facts("llama-3.1-8b"), context=8192)
    assert plan.choice is None
    assert "smallest need is nf4 at 8,192 tokens" in plan.reasons[-1]
    assert "CPU RAM with 8.2 GB usable" in plan.reasons[-1]


def test_llama_8b_on_12_gib_never_picks_single_gpu_bf16():
    plan = choose(machine(12), facts("llama-3.1-8b"), context=8192)
    assert not (plan.choice.preset == "bf16" and plan.choice.device_map.startswith("cuda"))
    assert any("bf16 needs 17.9 GB" in r for r in plan.reasons)


def test_split_is_flagged_slow_with_max_memory():
    plan = choose(machine(4), facts("llama-3.1-8b"), context=8192)
    assert plan.choice.slow
    assert set(plan.choice.max_memory) == {0, "cpu"}
    assert any("slow" in r for r in plan.reasons)


def test_refusal_names_the_smallest_need_and_the_biggest_device():
    plan = choose(machine(4, ram_gib=8), facts("llama-3.1-70b"), context=8192)
    assert plan.choice is None
    assert "nothing fits" in plan.reasons[-1]
    assert "nf4" in plan.reasons[-1] and "GPU 0" in plan.reasons[-1]
    assert plan_dict(plan)["choice"] is None


def test_80_gib_gets_the_full_128k_context():
    plan = choose(machine(80), facts("llama-3.1-8b"))
    assert (plan.choice.preset, plan.choice.context_tokens) == ("bf16", 131072)


def test_context_is_lowered_before_the_preset_is():
    plan = choose(machine(24), facts("llama-3.1-8b"))
    assert plan.choice.preset == "bf16"
    assert CONTEXT_FLOOR <= plan.choice.context_tokens < 131072
    assert any("context lowered" in r for r in plan.reasons)
    assert estimate(facts("llama-3.1-8b"), "bf16", plan.choice.context_tokens).total_bytes <= 24 * GIB * 0.95


def test_two_gpus_split_a_70b_with_device_map_auto():
    plan = choose(machine(24, 24), facts("llama-3.1-70b"), context=8192)
    assert (plan.choice.preset, plan.choice.device_map) == ("nf4", "auto")
    assert set(plan.choice.max_memory) == {0, 1}


@pytest.mark.parametrize(
    "ram, bf16, expected",
    # SmolLM2-1.7B has no GQA (32 KV heads): at 8k tokens its fp32 cache is 3.2 GB beside 3.4 GB of bf16 weights
    # (no native bf16: bf16 weights, fp32 math and cache), and its bf16 cache 1.6 GB.
    [(8, False, "nf4"), (16, False, "bf16"), (64, True, "bf16"), (8, True, "bf16")],
)
def test_small_models_on_cpus(ram, bf16, expected):
    plan = choose(Hardware(cpu(ram, bf16)), facts("smollm2-1.7b"))
    assert plan.choice.preset == expected
    assert plan.choice.device_map == "cpu"


@pytest.mark.parametrize("ram, expected", [(32, "bf16"), (16, "nf4")])
def test_apple_gpu_plans_against_unified_memory(ram, expected):
    plan = choose(Hardware(cpu(ram), mps=True), facts("llama-3.1-8b"), context=8192)
    assert (plan.choice.preset, plan.choice.device_map) == (expected, "mps")
    assert plan.reasons[0].startswith("Apple GPU runs bf16")
    assert any("Apple GPU (unified memory)" in r for r in plan.reasons)


def test_cpu_short_of_ram_falls_to_nf4_then_refuses():
    # Without native bf16, what bnb leaves unquantized (1.1B embedding params here) is fp32 on a CPU.
    assert choose(Hardware(cpu(12)), facts("qwen2.5-7b"), context=8192).choice.preset == "nf4"
    assert choose(Hardware(cpu(4)), facts("qwen2.5-7b"), context=8192).choice is None


@pytest.mark.parametrize("key", sorted(CATALOG))
def test_every_catalog_model_plans_offline(key):
    plan = choose(machine(24), facts(key))
    assert plan.facts.params > 0
    assert len(plan.presets) == 5


def test_explicit_preset_that_does_not_fit_has_no_choice():
    plan = choose(machine(8), facts("llama-3.1-8b"), context=8192, preset="fp32")
    assert plan.choice is None


def test_plan_json_contract():
    d = plan_dict(choose(machine(24), facts("llama-3.1-8b"), context=8192))
    assert set(d) >= {"model", "hardware", "presets", "choice", "reasons"}
    assert {"preset", "weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes", "fits"} <= set(
        d["presets"][0]
    )
    assert {"preset", "context_tokens", "device_map", "attn_implementation"} <= set(d["choice"])
    # Added later: never renamed, only added.
    assert d["choice"]["max_context_tokens"] == longest_context(machine(24), facts("llama-3.1-8b"), "bf16")
    assert d["choice"]["decode_tokens_per_s"] > 0
    assert "bandwidth_bytes_per_s" in d["hardware"]["gpus"][0]


# -- one ladder for auto -------------------------------------------------------------------------

T4 = describe_by_hand(Hardware(cpu(32)), gpus=["T4:16GiB:7.5"])
APPLE = Hardware(cpu(32), mps=True)


@pytest.mark.parametrize(
    "hardware, ladder",
    [
        (T4, ("fp16", "nf4")),  # pre-Ampere: no bf16
        (APPLE, ("bf16", "nf4")),  # MPS runs bf16, whatever the CPU's flags say
        (machine(24), ("bf16", "nf4")),
        (Hardware(cpu(32)), ("bf16", "nf4")),  # a CPU without native bf16: bf16 weights with fp32 math
        (Hardware(cpu(32, bf16=True)), ("bf16", "nf4")),
    ],
    ids=["T4", "MPS", "Ampere", "cpu", "cpu-bf16"],
)
def test_auto_ladder_is_what_auto_tries(hardware, ladder):
    assert auto_ladder(hardware) == ladder
    plan = choose(hardware, facts("llama-3.2-1b"), context=8192)
    assert plan.reasons[0].endswith(f"trying {ladder[0]}, then {ladder[1]}")
    assert plan.choice.preset == ladder[0]


# -- practical context, longest context ----------------------------------------------------------


def test_practical_context_is_the_cap_or_8k_never_more_than_the_model():
    llama, starter = facts("llama-3.2-1b"), facts("smollm2-135m-local")
    assert practical_context(llama) == 8192
    assert practical_context(llama, 32768) == 32768
    assert practical_context(llama, 10**6) == 131072
    assert practical_context(starter, 32768) == starter.max_context == 8192


def test_longest_context_is_the_most_that_fits():
    f = facts("llama-3.1-8b")
    assert longest_context(machine(80), f, "bf16") == 131072  # the model's maximum
    lowered = longest_context(machine(24), f, "bf16")
    assert lowered == choose(machine(24), f).choice.context_tokens == 58368  # the same answer as choose's lowering
    budget = 24 * GIB * 0.95
    assert estimate(f, "bf16", lowered).total_bytes <= budget < estimate(f, "bf16", lowered + 1024).total_bytes
    assert longest_context(machine(8), f, "bf16") is None  # 16 GB of weights alone
    assert longest_context(machine(24, 24), facts("llama-3.1-70b"), "nf4") > 8192  # two GPUs pooled


# -- decode speed ---------------------------------------------------------------------------------


def test_decode_speed_is_bandwidth_over_bytes_read_per_token():
    f = facts("smollm2-135m")
    read = weights_bytes(f, "fp32", "fp32") + kv_cache_bytes(f, 8192, "fp32")
    # Unknown core count: the 2-core default, 3 GB/s a core; calibrated on SmolLM2-135M fp32 (12-17 tok/s at short
    # context, i.e. 7-9 GB/s, on our 2-core boxes), so ~6.6 tok/s with a full 8k cache is on the safe side.
    assert bandwidth_bytes_per_s(Hardware(cpu(16))) == 6e9
    assert decode_tokens_per_s(Hardware(cpu(16)), f, "fp32", 8192) == pytest.approx(6e9 / read)
    assert round(decode_tokens_per_s(Hardware(cpu(16)), f, "fp32", 8192), 1) == 6.6
    sixteen = Hardware(CpuInfo(16 * GIB, 16 * GIB, frozenset(), cores=16))
    assert bandwidth_bytes_per_s(sixteen) == 40e9  # capped: a socket's memory channels
    assert bandwidth_bytes_per_s(APPLE) == 50e9
    assert bandwidth_bytes_per_s(T4) == 200e9  # described by hand: no NVML figure
    h100 = Hardware(cpu(64), (GpuInfo(0, "H100", 80 * GIB, 80 * GIB, (9, 0), bandwidth_bytes_per_s=3.35e12),))
    assert bandwidth_bytes_per_s(h100) == pytest.approx(0.7 * 3.35e12)


def test_the_choice_carries_its_speed_and_a_split_is_read_partly_from_cpu_ram():
    f = facts("llama-3.1-8b")
    plan = choose(machine(24), f, context=8192)
    assert plan.choice.tokens_per_s == pytest.approx(decode_tokens_per_s(machine(24), f, "bf16", 8192))
    # 17.2 GB (16.1 GB of weights + 1.1 GB of cache) at 200 GB/s is 86 ms, plus 32 layers x 0.8 ms of launches.
    assert plan.choice.tokens_per_s == pytest.approx(1 / (17.2e9 / 200e9 + 32 * 0.8e-3), rel=0.01)
    assert round(plan.choice.tokens_per_s) == 9
    split = choose(machine(4), f, context=8192)
    assert split.choice.slow and split.choice.max_context_tokens is None
    on_gpu = decode_tokens_per_s(machine(4), f, "bf16", 8192)
    on_cpu = decode_tokens_per_s(machine(4), f, "bf16", 8192, offloaded_bytes=10**12)
    read = weights_bytes(f, "bf16", "bf16") + kv_cache_bytes(f, 8192, "bf16")
    assert on_cpu == pytest.approx(1 / (read / 6e9 + 32 * 0.8e-3))  # still launched from the GPU
    assert on_cpu < split.choice.tokens_per_s < on_cpu * 1.5 < on_gpu  # most of it is read at CPU speed


# -- attention and compute dtype ----------------------------------------------------------------


@pytest.mark.parametrize(
    "device, dtype, capability, flash, expected",
    [
        ("cuda", "bf16", (9, 0), True, "flash_attention_2"),  # H100
        ("cuda", "fp16", (8, 6), True, "flash_attention_2"),  # RTX 3090
        ("cuda", "bf16", (8, 0), True, "flash_attention_2"),  # A100, exactly the floor
        ("cuda", "fp16", (7, 5), True, "sdpa"),  # T4: too old for flash-attn 2
        ("cuda", "fp32", (9, 0), True, "sdpa"),  # flash-attn has no fp32 kernels
        ("cuda", "bf16", (9, 0), False, "sdpa"),  # not installed
        ("cpu", "bf16", None, True, "sdpa"),
        ("mps", "fp16", None, True, "sdpa"),
    ],
)
def test_choose_attention(device, dtype, capability, flash, expected):
    decision = choose_attention(
        device_type=device, compute_dtype=dtype, compute_capability=capability, flash_attn_installed=flash
    )
    assert decision.value == expected
    assert decision.reasons


def test_attention_falls_back_to_eager_without_sdpa():
    decision = choose_attention(device_type="cpu", compute_dtype="fp32", sdpa_available=False)
    assert decision.value == "eager"
    assert any("not installed" in r for r in decision.reasons)


def test_compute_dtype_for_quantized_presets():
    assert compute_dtype_for("nf4", device_type="cuda", bf16_supported=True) == "bf16"
    assert compute_dtype_for("int8", device_type="cuda", bf16_supported=False) == "fp16"
    assert compute_dtype_for("nf4", device_type="cpu", bf16_supported=False) == "fp32"
    assert compute_dtype_for("fp16", device_type="cpu", bf16_supported=False) == "fp16"


def test_cache_budgets_follow_the_room_left_and_park_in_ram_only_with_a_gpu():
    from chatapp.planner import LIVE_CONTEXTS, cache_budgets

    per = 1_000_000
    assert cache_budgets(per, 0, 32 * GIB, on_gpu=False) == (per, 0)  # the chat in use, always
    assert cache_budgets(per, 2 * per + 5, 32 * GIB, on_gpu=False) == (3 * per, 0)
    assert cache_budgets(per, 100 * per, 32 * GIB, on_gpu=False)[0] == LIVE_CONTEXTS * per
    assert cache_budgets(per, 0, 32 * GIB, on_gpu=True) == (per, 8 * per)
    assert cache_budgets(per, 0, 4 * per, on_gpu=True) == (per, per)  # a quarter of the RAM at most


def test_plan_says_where_the_chats_caches_go():
    roomy = choose(machine(80), facts("llama-3.1-8b"), context=8192)
    assert roomy.choice.cache_live_bytes == 4 * roomy.choice.estimate.kv_cache_bytes
    assert roomy.choice.cache_parked_bytes > 0
    assert any(r.startswith("KV cache: 4 chat(s) at full context stay live in GPU memory") for r in roomy.reasons)
    assert "parked in CPU RAM" in roomy.reasons[-2]  # the attention comes last
    on_cpu = choose(Hardware(cpu(32)), facts("smollm2-135m"), context=8192)
    assert on_cpu.choice.cache_parked_bytes == 0 and "live in CPU RAM" in on_cpu.reasons[-2]
    assert plan_dict(on_cpu)["choice"]["cache_live_bytes"] == on_cpu.choice.cache_live_bytes


# -- a draft model beside the model ----------------------------------------------------------------


def test_a_draft_is_budgeted_beside_the_model_in_its_dtype_and_at_its_context():
    target, draft = facts("qwen2.5-7b"), facts("qwen2.5-0.5b")
    # 18 GiB: the 7B in bf16 leaves room for three more chats' caches, or the draft and one.
    alone = choose(machine(18), target, context=8192)
    plan = choose(machine(18), target, context=8192, draft=draft)
    # The model's own plan is the plan without a draft, but for what the chats' caches may hold.
    assert replace(plan.choice, cache_live_bytes=0) == replace(alone.choice, cache_live_bytes=0)
    assert plan.choice.preset == alone.choice.preset == "bf16" and plan.draft.fits
    assert plan.draft.weights_bytes == weights_bytes(draft, "bf16", "bf16")
    assert plan.draft.kv_cache_bytes == kv_cache_bytes(draft, 8192, "bf16")
    # The chats' live caches get what is left after both models.
    per_chat = kv_cache_bytes(target, 8192, "bf16")
    assert (alone.choice.cache_live_bytes, plan.choice.cache_live_bytes) == (4 * per_chat, 2 * per_chat)
    assert plan_dict(plan)["draft"] == {
        "model": draft.name,
        "weights_bytes": plan.draft.weights_bytes,
        "kv_cache_bytes": plan.draft.kv_cache_bytes,
        "fits": True,
    }
    assert plan_dict(alone)["draft"] is None


@pytest.mark.parametrize(
    ("hardware", "context", "why"),
    [
        # The 7B fits in bf16 with under 1 GB to spare: the draft's 1 GB doesn't.
        (machine(17.2), 8192, "don't fit beside the model"),
        # The 7B is split over GPU and CPU RAM: no draft.
        (machine(10, ram_gib=64), 32768, "split over the GPU and CPU RAM"),
        # Nothing fits at all.
        (Hardware(cpu(4)), 8192, "the model itself doesn't fit"),
    ],
    ids=["no room left", "split", "nothing fits"],
)
def test_a_draft_that_does_not_fit_is_left_out_and_the_model_is_planned_as_without_it(hardware, context, why):
    from chatapp.planner import describe_draft

    target, draft = facts("qwen2.5-7b"), facts("qwen2.5-0.5b")
    alone = choose(hardware, target, context=context, preset="bf16" if hardware.gpus else "auto")
    plan = choose(hardware, target, context=context, preset="bf16" if hardware.gpus else "auto", draft=draft)
    assert plan.choice == alone.choice and plan.reasons == alone.reasons
    assert not plan.draft.fits
    line = describe_draft(plan)
    assert line.startswith(f"draft {draft.name} left out: ") and why in line and "\n" not in line
