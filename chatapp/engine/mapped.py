"""Give back the pages of a mapped checkpoint that the loaded model no longer reads.

transformers maps a safetensors file and takes the weights it can use as they are from the mapping, and the
mapping lives as long as any of them does. Weights it replaces leave their pages behind, counted in the
process's memory: quantizing to nf4 or int8 reads every bf16 weight to make its quantized copy, and a packed
CPU weight (cpu_linear) is a copy too. For SmolLM2-135M that left 212-220 of the file's 269 MB resident
beside the copies that replaced them.

Only pages that no tensor of the model overlaps are dropped, and only a file's pages: read again, they come
back from the file, where anonymous pages would come back as zeros.

The small tensors still read from the file (norms, biases) are copied out of it first. The page cache holds a file
read in order (just downloaded, copied, or read once whole) in folios of up to 2 MiB, and reading one norm maps its
whole folio: SmolLM2-135M's 61 norms, 69 KB in all, kept 111 MB of the file resident beside 54 MB of embeddings.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import torch

_MADV_DONTNEED = 4  # Linux's value
#: Mapped tensors smaller than this are copied out of the file before its pages are dropped: twice the largest folio.
SMALL = 4 * 2**20


def release_unused(model: torch.nn.Module) -> int:
    """Drop the pages of the files the model's tensors are mapped from that none of them overlaps, after copying the
    small ones out; bytes dropped."""
    spans = _file_mappings()
    tensors = [t for t in (*model.parameters(), *model.buffers()) if _readable(t)]
    for tensor in tensors:
        if tensor.nbytes < SMALL and any(low <= tensor.data_ptr() < high for low, high in spans):
            tensor.data = tensor.data.clone()
    live = sorted(_extent(t) for t in tensors)
    dropped = 0
    for low, high in spans:
        inside = [(start, end) for start, end in live if start < high and end > low]
        if not inside:
            continue  # no weight of this model there: some other file
        cursor = low
        for start, end in [*inside, (high, high)]:
            dropped += _drop(cursor, start)
            cursor = max(cursor, end)
    return dropped


def _readable(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not tensor.is_mkldnn and tensor.numel() > 0


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) a CPU tensor reads."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


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


def _drop(start: int, end: int) -> int:
    """Drop the whole pages inside [start, end); the bytes dropped."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return 0
    if _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        return 0
    return last - first


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
