"""`chatapp doctor`: libraries, hardware and paths, and the problems it names."""

from __future__ import annotations

import subprocess
import sys

from chatapp.hardware import CpuInfo, Hardware


def chatapp(*args):
    return subprocess.run([sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=300)


def test_doctor_reports_libraries_hardware_and_paths():
    out = chatapp("doctor")
    for words in ("torch 2.", "transformers", "bitsandbytes", "flash-attn", "hardware: CPU", "config:", "Hub cache:"):
        assert words in out.stdout, words
    problems = [line for line in out.stdout.splitlines() if line.startswith("problem: ")]
    assert out.returncode == (1 if problems else 0)
    assert problems or out.stdout.rstrip().endswith("no problems found")


def test_doctor_names_a_gpu_that_torch_cannot_use(settings):
    from chatapp.doctor import doctor
    from chatapp.hardware import GpuInfo

    with_gpu = Hardware(CpuInfo(8 << 30, 8 << 30, frozenset()), (GpuInfo(0, "RTX 4090", 24 << 30, 24 << 30, (8, 9)),))
    info, problems = doctor(settings, with_gpu)
    assert any("GPU 0: RTX 4090" in line for line in info)
    assert any("this torch can't use it" in p and "TORCH=" in p for p in problems)
