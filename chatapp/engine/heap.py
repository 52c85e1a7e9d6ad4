"""Give the C heap's free memory back to the kernel: after a CPU load, after each turn, and, for bitsandbytes'
int8 layers, while a prefill runs.

torch's CPU tensors come from glibc's malloc. After a large block that malloc mapped on its own is freed, glibc
raises its threshold for mapping blocks (up to 32 MiB), so later large tensors come from the heap, and the holes
they leave there stay resident until the heap is trimmed. Measured on SmolLM2-135M (bench/MEMORY.md):
- After an nf4 load the heap held up to 319 MB free: RSS 763 MB, 465 once trimmed. A trim took 4-19 ms after a
  1,024-token prefill, and only the pages used again are faulted back in, so the loader and the worker trim after
  every load and turn whatever the preset.
- bitsandbytes' CPU int8 path makes many large temporaries, which doubled a prefill's peak: three prefills of
  2,048 tokens peaked at 1,540-1,758 MB in six runs, and at 793-1,210 with the heap trimmed after any decoder layer
  that left over FREE_LIMIT free. That costs the pages faulted in again: a prefill took 5.4-7.1 s against 3.6-4.8.
  For nf4 and bf16, trimming inside the prefill lowered no peak beyond the noise (their peaks vary with the load's),
  so only int8 is watched: a preset chosen to save memory.
Making glibc map every large block instead (a fixed M_MMAP_THRESHOLD) gave the same int8 peak but slowed every
prefill: bf16's by 25%, int8's by 150%.

glibc only (Linux): elsewhere, or with a glibc older than 2.33 (no mallinfo2), this does nothing.
"""

from __future__ import annotations

import ctypes
import functools

import torch

#: Free bytes the heap may hold after a watched decoder layer before it is trimmed.
FREE_LIMIT = 128 * 2**20
_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def free_bytes() -> int | None:
    """Bytes glibc's heap holds free, or None without glibc."""
    libc = _libc()
    return None if libc is None else int(libc.mallinfo2().fordblks)


def trim() -> None:
    """Return the heap's free pages to the kernel."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def watch(model: torch.nn.Module) -> int:
    """Trim the heap after each decoder layer of a multi-token forward that left over FREE_LIMIT free; how many
    layers are watched (0 without glibc, or where the model's layers aren't found)."""
    if _libc() is None:
        return 0
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None) or []
    for layer in layers:
        layer.register_forward_hook(_after_layer, with_kwargs=True)
    return len(layers)


def _after_layer(module, args, kwargs, output) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    # A decode step's one row frees little, and checking would cost every token a call per layer.
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] > 1:
        free = free_bytes()
        if free is not None and free > FREE_LIMIT:
            trim()
