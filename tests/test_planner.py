"""Pure decisions, tested against machines we don't have."""

from __future__ import annotations

import pytest

from chatapp.planner import choose_attention, compute_dtype_for

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


def test_compute_dtype_for_quantized_presets():
    assert compute_dtype_for("nf4", device_type="cuda", bf16_supported=True) == "bf16"
    assert compute_dtype_for("int8", device_type="cuda", bf16_supported=False) == "fp16"
    assert compute_dtype_for("nf4", device_type="cpu", bf16_supported=False) == "fp32"
    assert compute_dtype_for("fp16", device_type="cpu", bf16_supported=False) == "fp16"
