"""The memory planner: first-principles estimates and table-driven choices over simulated hardware."""

from __future__ import annotations

import pytest

from chatapp.catalog import load_catalog
from chatapp.facts import facts_from_spec
from chatapp.hardware import CpuInfo, GpuInfo, Hardware, describe_by_hand, parse_gpu, parse_size
from chatapp.planner import CONTEXT_FLOOR, choose, estimate, kv_cache_bytes, plan_dict, weights_bytes

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


def test_sliding_window_layers_cap_their_cache():
    f = facts("gemma-2-9b")
    full, sliding = f.layers - f.sliding_layers, f.sliding_layers
    per = 2 * f.kv_heads * f.head_dim * 2
    assert kv_cache_bytes(f, 8192, "bf16") == per * (full * 8192 + sliding * 4096)
    assert kv_cache_bytes(f, 2048, "bf16") == per * f.layers * 2048


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
        (machine(ram_gib=64), "fp32", "cpu"),
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
    # SmolLM2-1.7B has no GQA (32 KV heads): at 8k tokens its fp32 cache is 3.2 GB beside 6.8 GB of weights.
    [(8, False, "nf4"), (16, False, "fp32"), (64, True, "bf16"), (8, True, "bf16")],
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
    assert {"preset", "weights_bytes", "kv_cache_bytes", "overhead_bytes", "total_bytes", "fits"} <= set(d["presets"][0])
    assert {"preset", "context_tokens", "device_map", "attn_implementation"} <= set(d["choice"])


# -- hand-described hardware --------------------------------------------------------------------


def test_sizes_and_gpu_specs():
    assert parse_size("24GiB") == 24 * GIB
    assert parse_size("12 GB") == 12 * 10**9
    assert parse_gpu("RTX 3060:12GiB", 0).name == "RTX 3060"
    assert parse_gpu("T4:16GiB:7.5", 1).compute_capability == (7, 5)
    assert parse_gpu("24GiB", 0).bf16_supported
    for bad in ("lots", "12XB", "a:b:c:d", "T4:16GiB:x"):
        with pytest.raises(ValueError):
            parse_gpu(bad, 0)


def test_describe_by_hand_replaces_what_was_detected():
    detected = machine(80, ram_gib=512)
    hw = describe_by_hand(detected, ["24GiB", "RTX 3060:12GiB"], ram="16GiB")
    assert [g.total_bytes for g in hw.gpus] == [24 * GIB, 12 * GIB]
    assert hw.cpu.ram_total_bytes == 16 * GIB
    assert describe_by_hand(detected, no_gpu=True).gpus == ()
    apple = Hardware(cpu(64), mps=True)
    assert describe_by_hand(apple, no_gpu=True).mps is False
    assert describe_by_hand(apple, ["24GiB"]).mps is False
