"""Warnings: deprecations from our code and huggingface_hub fail the tests; library noise goes to the log."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest


def _warn(category: type[Warning], module: str) -> None:
    # The module a warning is attributed to is what pyproject's filterwarnings match.
    warnings.warn_explicit("old API", category, f"{module.replace('.', '/')}.py", 1, module=module)


OURS_AND_HUB = ["chatapp", "chatapp.hub_download", "huggingface_hub", "huggingface_hub.file_download"]


@pytest.mark.parametrize("module", OURS_AND_HUB)
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecations_from_us_and_huggingface_hub_are_errors(module, category):
    with pytest.raises(category):
        _warn(category, module)


@pytest.mark.parametrize("module", ["transformers.utils", "chatapp_plugin", "huggingface_hubby"])
def test_other_libraries_deprecations_stay_warnings(module):
    with pytest.warns(DeprecationWarning):
        _warn(DeprecationWarning, module)


# `chatapp doctor`, with bitsandbytes made to believe the CPU has AVX512-BF16: it then tries the `kernels`
# package for its fused 4-bit CPU kernel, fails, and logs "Failed to load CPU gemm_4bit_forward from
# kernels-community" through logging.getLogger("bitsandbytes.backends.cpu.ops"), as it does on such machines.
_DOCTOR_ON_A_BF16_CPU = """
import importlib.abc, importlib.util, sys

class Bf16Cpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Bf16Cpu())
sys.modules["kernels"] = None  # not installed, wherever this runs
from chatapp.cli import main

sys.exit(main(["doctor"]))
"""


def test_library_warnings_go_to_the_log_not_the_terminal(tmp_path):
    env = {**os.environ, "CHATAPP_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run(
        [sys.executable, "-c", _DOCTOR_ON_A_BF16_CPU], capture_output=True, text=True, env=env, timeout=300
    )
    assert "bitsandbytes" in out.stdout, out.stderr
    noise = [
        line for line in (out.stdout + out.stderr).splitlines() if "kernels-community" in line or "gemm_4bit" in line
    ]
    assert noise == []
    log = tmp_path / "data" / "chatapp.log"
    assert f"log: {log}" in out.stdout
    assert "WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward from kernels-community" in (
        log.read_text()
    )


_WARN_AND_LOG = """
import logging, sys, warnings
from chatapp.logs import adopt_transformers_logging, route_library_logs

route_library_logs(sys.argv[1])
warnings.warn("a library's warning", UserWarning)
logging.getLogger("huggingface_hub.file_download").warning("a hub record")
adopt_transformers_logging()
from transformers.utils import logging as hf_logging

hf_logging.get_logger("transformers.generation").warning("a transformers record")
print("ours", file=sys.stderr)
"""


def test_warnings_and_transformers_and_hub_records_go_to_the_log(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # warnings and up, as users get
    out = subprocess.run(
        [sys.executable, "-c", _WARN_AND_LOG, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "ours\n"
    log = (tmp_path / "chatapp.log").read_text()
    for words in ("UserWarning: a library's warning", "a hub record", "a transformers record"):
        assert words in log, words
