"""What is there: CUDA devices (via NVML, without torch), CPU features and RAM."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: CPU flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run natively.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    #: Peak memory bandwidth from NVML (bus width x memory clock); None when unknown, e.g. a GPU described by hand.
    bandwidth_bytes_per_s: float | None = None

    @property
    def bf16_supported(self) -> bool:
        return self.compute_capability is not None and self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class CpuInfo:
    ram_total_bytes: int
    ram_available_bytes: int
    flags: frozenset[str] = frozenset()
    #: The cores this process may use; None when unknown (described by hand, or in tests).
    cores: int | None = None

    @property
    def bf16_native(self) -> bool:
        return any(flag in self.flags for flag in CPU_BF16_FLAGS)


@dataclass(frozen=True)
class Hardware:
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)
    #: An Apple-silicon GPU (MPS), which shares the CPU's RAM ("unified memory").
    mps: bool = False


def _meminfo() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields.get("MemAvailable", fields["MemFree"]).split()[0]) * 1024
        return total, available
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count()


def detect_cpu() -> CpuInfo:
    total, available = _meminfo()
    return CpuInfo(ram_total_bytes=total, ram_available_bytes=available, flags=_cpu_flags(), cores=_cores())


def detect_gpus_nvml() -> tuple[GpuInfo, ...]:
    """CUDA devices through NVML, so a process without torch can see them. Empty when there is no driver."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVML raises its own error types
        return ()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else name,
                    total_bytes=int(memory.total),
                    free_bytes=int(memory.free),
                    compute_capability=capability,
                    bandwidth_bytes_per_s=_nvml_bandwidth(pynvml, handle),
                )
            )
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def _nvml_bandwidth(pynvml, handle) -> float | None:
    """Peak bandwidth: bus width (bits) / 8 x the top memory clock x 2 (double data rate).

    NVML reports the clock so that this holds for GDDR6/6X and HBM alike: a T4 (256 bit, 5001 MHz) gives 320 GB/s,
    an A100 40GB (5120 bit, 1215 MHz) 1.56 TB/s, an RTX 3090 (384 bit, 9751 MHz) 936 GB/s, as their data sheets say.
    """
    try:
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
    except Exception:  # old drivers and some virtual GPUs don't report these
        return None
    if not bus_bits or not clock_mhz:
        return None
    return bus_bits / 8 * clock_mhz * 1e6 * 2


def flash_attn_installed() -> bool:
    """Whether the flash-attn package can be imported (looked up, not imported: importing it loads CUDA)."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def detect_mps() -> bool:
    import platform

    return platform.system() == "Darwin" and platform.machine() == "arm64"


def detect() -> Hardware:
    return Hardware(cpu=detect_cpu(), gpus=detect_gpus_nvml(), mps=detect_mps())


# -- "what if" descriptions: --gpu 24GiB, --gpu "RTX 3060:12GiB", --gpu "T4:16GiB:7.5", --no-gpu, --ram 32GiB

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'24GiB', '12 GB', '8192MiB' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a size like 24GiB, 12GB or 8192MiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"'{text}' is no memory at all: give a size above 0, like 24GiB")
    return size


def parse_gpu(text: str, index: int) -> GpuInfo:
    """'24GiB', 'RTX 3060:12GiB' or 'T4:16GiB:7.5' (name, memory, compute capability; Ampere 8.0 if not given)."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) == 1:
        name, size, capability = "GPU", parts[0], "8.0"
    elif len(parts) == 2:
        (name, size), capability = parts, "8.0"
    elif len(parts) == 3:
        name, size, capability = parts
    else:
        raise ValueError(f"'{text}' is not a GPU like 24GiB, 'RTX 3060:12GiB' or 'T4:16GiB:7.5'")
    major, _, minor = capability.partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        raise ValueError(f"'{capability}' is not a compute capability like 8.6")
    total = parse_size(size)
    return GpuInfo(index, name or "GPU", total, total, (int(major), int(minor or 0)))


def describe_by_hand(
    detected: Hardware, gpus: list[str] | None = None, no_gpu: bool = False, ram: str | None = None
) -> Hardware:
    """The detected hardware with what the user described replacing it; an idle machine is assumed."""
    cpu = detected.cpu
    if ram:
        size = parse_size(ram)
        cpu = CpuInfo(ram_total_bytes=size, ram_available_bytes=size, flags=cpu.flags, cores=cpu.cores)
    devices, mps = detected.gpus, detected.mps
    if no_gpu:
        devices, mps = (), False
    elif gpus:
        devices, mps = tuple(parse_gpu(text, i) for i, text in enumerate(gpus)), False
    return Hardware(cpu=cpu, gpus=devices, mps=mps)
