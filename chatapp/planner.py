"""Pure decisions: which preset `auto` means here, and which attention implementation to use.

Nothing here touches torch or the hardware; callers pass in what they found, so every rule can be
tested against machines we don't have.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESETS = ("auto", "bf16", "fp16", "fp32", "int8", "nf4")
QUANTIZED_PRESETS = ("int8", "nf4")
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


def choose_auto_preset(
    *,
    device_type: str,
    bf16_supported: bool,
    weights_16bit_bytes: int | None = None,
    free_bytes: int | None = None,
) -> Decision:
    """What `auto` means on this device.

    GPU: bf16 (fp16 without bf16 support) when the 16-bit weights fit, else nf4.
    CPU: bf16 only where the CPU computes it natively (AVX512-BF16/AMX); elsewhere torch emulates bf16
    matmuls, which made a 400-token prefill of SmolLM2-135M 6x slower than fp32 on our AVX2 machines.
    """
    if device_type == "cpu":
        if bf16_supported:
            return Decision("bf16", ("this CPU computes bf16 natively (AVX512-BF16/AMX)",))
        return Decision("fp32", ("this CPU has no native bf16 (no AVX512-BF16/AMX), so fp32 is faster here",))
    half = "bf16" if bf16_supported else "fp16"
    reasons = [f"{device_type} {'supports' if bf16_supported else 'lacks'} bf16, so 16-bit means {half}"]
    if weights_16bit_bytes is not None and free_bytes is not None:
        gib = 1024**3
        if weights_16bit_bytes > free_bytes:
            reasons.append(
                f"{half} weights need {weights_16bit_bytes / gib:.1f} GiB but only {free_bytes / gib:.1f} GiB is free: nf4"
            )
            return Decision("nf4", tuple(reasons))
        reasons.append(f"{half} weights ({weights_16bit_bytes / gib:.1f} GiB) fit in {free_bytes / gib:.1f} GiB free")
    return Decision(half, tuple(reasons))


def compute_dtype_for(preset: str, *, device_type: str, bf16_supported: bool) -> str:
    """The dtype activations run in. Quantized presets compute in bf16 where the device runs it well."""
    if preset in ("bf16", "fp16", "fp32"):
        return preset
    if bf16_supported:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"
