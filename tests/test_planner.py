"""Pure decisions, tested against machines we don't have."""

from __future__ import annotations

import pytest

from chatapp.planner import choose_attention, choose_auto_preset, compute_dtype_for

GIB = 1024**3


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


def test_auto_on_cpu_follows_native_bf16():
    assert choose_auto_preset(device_type="cpu", bf16_supported=False).value == "fp32"
    assert choose_auto_preset(device_type="cpu", bf16_supported=True).value == "bf16"


def test_auto_on_gpu_is_16_bit_when_it_fits_else_nf4():
    fits = choose_auto_preset(device_type="cuda", bf16_supported=True, weights_16bit_bytes=16 * GIB, free_bytes=23 * GIB)
    assert fits.value == "bf16"
    old = choose_auto_preset(device_type="cuda", bf16_supported=False, weights_16bit_bytes=1 * GIB, free_bytes=15 * GIB)
    assert old.value == "fp16"
    tight = choose_auto_preset(device_type="cuda", bf16_supported=True, weights_16bit_bytes=16 * GIB, free_bytes=8 * GIB)
    assert tight.value == "nf4"
    assert any("nf4" in r and "16.0 GiB" in r for r in tight.reasons)


def test_compute_dtype_for_quantized_presets():
    assert compute_dtype_for("nf4", device_type="cuda", bf16_supported=True) == "bf16"
    assert compute_dtype_for("int8", device_type="cuda", bf16_supported=False) == "fp16"
    assert compute_dtype_for("nf4", device_type="cpu", bf16_supported=False) == "fp32"
    assert compute_dtype_for("fp16", device_type="cpu", bf16_supported=False) == "fp16"
