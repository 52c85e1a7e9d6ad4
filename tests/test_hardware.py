"""What is there: hand-described hardware for "what if" plans, GPU bandwidth from NVML, optional libraries."""

from __future__ import annotations

import sys
import types

import pytest

from chatapp import hardware
from chatapp.hardware import CpuInfo, GpuInfo, Hardware, describe_by_hand, parse_gpu, parse_size

GIB = 1024**3


def cpu(ram_gib: float, cores: int | None = None) -> CpuInfo:
    return CpuInfo(int(ram_gib * GIB), int(ram_gib * GIB), frozenset({"avx2"}), cores)


def test_sizes_and_gpu_specs():
    assert parse_size("24GiB") == 24 * GIB
    assert parse_size("12 GB") == 12 * 10**9
    assert parse_gpu("RTX 3060:12GiB", 0).name == "RTX 3060"
    assert parse_gpu("T4:16GiB:7.5", 1).compute_capability == (7, 5)
    assert parse_gpu("24GiB", 0).bf16_supported
    assert parse_gpu("24GiB", 0).bandwidth_bytes_per_s is None  # unknown: the planner uses its default
    for bad in ("lots", "12XB", "a:b:c:d", "T4:16GiB:x"):
        with pytest.raises(ValueError):
            parse_gpu(bad, 0)


def test_describe_by_hand_replaces_what_was_detected():
    detected = Hardware(cpu(512, cores=64), (GpuInfo(0, "H100", 80 * GIB, 80 * GIB, (9, 0)),))
    hw = describe_by_hand(detected, ["24GiB", "RTX 3060:12GiB"], ram="16GiB")
    assert [g.total_bytes for g in hw.gpus] == [24 * GIB, 12 * GIB]
    assert hw.cpu.ram_total_bytes == 16 * GIB
    assert hw.cpu.cores == 64  # --ram replaces the RAM, not the CPU
    assert describe_by_hand(detected, no_gpu=True).gpus == ()
    apple = Hardware(cpu(64), mps=True)
    assert describe_by_hand(apple, no_gpu=True).mps is False
    assert describe_by_hand(apple, ["24GiB"]).mps is False


def fake_pynvml(bus_bits, clock_mhz):
    def clock(handle, kind):
        if clock_mhz is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return clock_mhz

    return types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=16 * GIB, free=15 * GIB),
        nvmlDeviceGetName=lambda h: b"Tesla T4",
        nvmlDeviceGetCudaComputeCapability=lambda h: (7, 5),
        nvmlDeviceGetMemoryBusWidth=lambda h: bus_bits,
        nvmlDeviceGetMaxClockInfo=clock,
        NVML_CLOCK_MEM=2,
    )


def test_gpu_bandwidth_from_nvml_bus_width_and_memory_clock(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(256, 5001))
    (t4,) = hardware.detect_gpus_nvml()
    assert (t4.name, t4.compute_capability, t4.free_bytes) == ("Tesla T4", (7, 5), 15 * GIB)
    assert t4.bandwidth_bytes_per_s == 256 / 8 * 5001e6 * 2  # 320 GB/s, the T4's data sheet figure
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(256, None))
    assert hardware.detect_gpus_nvml()[0].bandwidth_bytes_per_s is None


def test_detect_cpu_counts_the_cores_this_process_may_use():
    assert hardware.detect_cpu().cores >= 1


def test_flash_attn_installed_looks_without_importing(monkeypatch):
    import importlib.util

    seen = []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: seen.append(name) or None)
    assert hardware.flash_attn_installed() is False
    assert seen == ["flash_attn"]
