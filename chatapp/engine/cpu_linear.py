"""bf16 Linear layers on the CPU with their weights packed once, in oneDNN's own layout, at load.

torch's bf16 `F.linear` on the CPU hands oneDNN a plain row-major weight, and oneDNN reorders it into the
blocked layout its bf16 kernels read on every call. For a decode step, which reads each weight once, that
reorder is most of the work: on a 2-core AVX512-BF16 EPYC, SmolLM2-135M's Linear layers ran at about
10 GB/s against 25-34 GB/s for a plain read of the same bytes. Packed once with
`torch.ops.mkldnn._reorder_linear_weight`, the same call takes 0.55-0.65 of the time, for one row and for a
prefill's thousands, and computes the same bits (oneDNN runs the same kernel on the same layout). This is
what torch.compile's freezing pass does for CPU inference; here it is done without compiling.

Only for models that compute in bf16 on a CPU whose oneDNN has native bf16 kernels. A weight shared with
another module (tied embeddings) stays as it is: packing it would need a second copy.

transformers maps a safetensors file and uses its weights where they lie, and the mapping lives as long as
any of its tensors does. So a packed weight's original pages are given back to the kernel (`_release`):
otherwise they stayed in the process's memory beside the packed copy, 212 of SmolLM2-135M's 269 MB.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux's value


class PackedLinear(torch.nn.Linear):
    """A Linear whose weight is oneDNN's packed tensor (`weight.is_mkldnn`); `weight.to_dense()` gives it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def supported() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels of its own (AVX512-BF16 or AMX), not emulated ones."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def apply(model: torch.nn.Module) -> int:
    """Pack the weight of every plain bf16 Linear of a CPU model in place; how many were packed."""
    shared = _shared_weights(model)
    files = _file_mappings()
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is not torch.nn.Linear
            or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu"
            or id(weight) in shared
        ):
            continue
        with torch.no_grad():
            module.weight = torch.nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(weight.detach()), requires_grad=False
            )
        module.__class__ = PackedLinear
        _release(weight.data_ptr(), weight.nbytes, files)
        packed += 1
    return packed


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges this process has mapped from files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            spans.append((start, end))
    return spans


def _release(start: int, nbytes: int, files: list[tuple[int, int]]) -> None:
    """Drop the pages wholly inside [start, start + nbytes) from memory, where a file holds them.

    Only a file's pages: read again, they come back from the file unchanged, where anonymous pages would come
    back as zeros. Pages shared with a neighbouring tensor stay.
    """
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and any(low <= first and last <= high for low, high in files):
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _shared_weights(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for tensor in module.parameters(recurse=False):
            seen[id(tensor)] = seen.get(id(tensor), 0) + 1
    return {key for key, count in seen.items() if count > 1}
