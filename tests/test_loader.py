"""Loading a model: every preset, `auto` following the planner, templates, and one-line errors for bad weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from chathelpers import Chat

from chatapp.engine import load_model
from chatapp.engine.session import render_ids
from chatapp.errors import ChatappError, HubError, ModelLoadError
from chatapp.facts import facts_from_folder
from chatapp.hardware import CpuInfo, Hardware, detect_cpu
from chatapp.planner import choose, compute_dtype_for, estimate


def reply(loaded, text="Hello", n=4):
    return Chat(loaded).send(text, max_new_tokens=n).stats


@pytest.mark.parametrize("preset", ["fp32", "bf16", "fp16", "int8", "nf4", "auto"])
def test_every_preset_loads_and_generates_on_cpu(tiny_folder, settings, preset):
    loaded = load_model(str(tiny_folder), preset, settings=settings)
    assert loaded.device == "cpu"
    assert loaded.attn_implementation == "sdpa"
    assert loaded.footprint_bytes > 0
    if preset in ("fp32", "bf16", "fp16", "auto"):  # bf16 on a CPU without native bf16: bf16 weights, fp32 math
        native = detect_cpu().bf16_native
        assert loaded.dtype == compute_dtype_for(loaded.preset, device_type="cpu", bf16_supported=native)
    stats = reply(loaded)
    assert stats.generated_tokens >= 1
    if preset == "auto":
        assert loaded.preset in ("bf16", "fp32")
        assert loaded.reasons and not loaded.notes  # the planner's reasons go to the log; nothing needs the user
    if preset in ("int8", "nf4"):
        assert "Linear8bitLt" in repr(loaded.model) or "Linear4bit" in repr(loaded.model)


def test_quantized_weights_are_smaller(tiny_folder, settings):
    # The tiny model is mostly embeddings, which bnb keeps in 16/32-bit; compare the linear layers only.
    sizes = {}
    for preset in ("fp32", "nf4"):
        model = load_model(str(tiny_folder), preset, settings=settings).model
        sizes[preset] = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" in n and "proj" in n
        )
    assert sizes["nf4"] * 4 < sizes["fp32"]


def test_no_chat_template_falls_back_and_says_so(starter_folder, tmp_path, settings):
    from modelhelpers import build_tiny_model

    folder = build_tiny_model(starter_folder, tmp_path / "plain", template=False)
    loaded = load_model(str(folder), "fp32", settings=settings)
    assert loaded.template_fallback
    assert sum("no chat template" in n for n in loaded.notes) == 1
    chat = Chat(loaded, system="Be kind.")
    chat.send("Hi", max_new_tokens=5)
    text = loaded.tokenizer.decode(render_ids(loaded.tokenizer, chat.session.messages[:2]))
    assert text.startswith("System: Be kind.\n\nUser: Hi\n\nAssistant:")
    again = chat.send("More", max_new_tokens=5).stats
    assert again.prefilled_tokens < again.prompt_tokens


def test_hub_model_while_offline_is_one_line(settings):
    with pytest.raises(HubError, match="not downloaded and the Hub can't be reached"):
        load_model("SomeOrg/not-downloaded", settings=settings)


def test_pickle_weights_are_refused_unless_allowed(tiny_folder, tmp_path, settings):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights .*--allow-pickle"):
        load_model(str(folder), "fp32", settings=settings)
    loaded = load_model(str(folder), "fp32", settings=settings, allow_pickle=True)
    assert reply(loaded).generated_tokens >= 1


def test_corrupt_weights_give_one_line(tiny_folder, tmp_path, settings):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ChatappError) as info:
        load_model(str(folder), "fp32", settings=settings)
    assert "can't load" in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset(tiny_folder, settings):
    with pytest.raises(ModelLoadError, match="unknown preset 'q3'"):
        load_model(str(tiny_folder), "q3", settings=settings)


def test_trust_remote_code_is_announced(tiny_folder, settings):
    loaded = load_model(str(tiny_folder), "fp32", settings=settings, trust_remote_code=True)
    assert any("trust_remote_code is on" in n for n in loaded.notes)
    assert not any("trust_remote_code" in n for n in load_model(str(tiny_folder), "fp32", settings=settings).notes)


def test_engine_auto_follows_the_planner(tiny_folder, settings, monkeypatch):
    """On a CPU with too little RAM for bf16 but enough for nf4, `auto` loads nf4 and says why."""
    from chatapp.engine import loader

    f = facts_from_folder(tiny_folder)
    bf16 = estimate(f, "bf16", f.max_context, device_type="cpu", bf16_supported=False).total_bytes
    nf4 = estimate(f, "nf4", f.max_context, device_type="cpu", bf16_supported=False).total_bytes
    assert nf4 < bf16
    ram = int((bf16 + nf4) / 2 / 0.95)
    small = Hardware(CpuInfo(ram, ram, frozenset()))
    monkeypatch.setattr(loader, "detect_hardware", lambda device: small)
    monkeypatch.setattr(loader, "detect_cpu", lambda: small.cpu)
    loaded = loader.load_model(str(tiny_folder), "auto", settings=settings)
    assert loaded.preset == choose(small, f).choice.preset == "nf4"
    assert any("bf16 needs" in reason for reason in loaded.reasons)
    assert loaded.notes == [f"auto chose nf4: the unquantized presets don't fit (`chatapp plan {tiny_folder}`)"]
    # Too little even for nf4: a clear refusal, before any weight is loaded.
    tiny = Hardware(CpuInfo(nf4 // 2, nf4 // 2, frozenset()))
    monkeypatch.setattr(loader, "detect_hardware", lambda device: tiny)
    from chatapp.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="fits no preset on this machine: nothing fits"):
        loader.load_model(str(tiny_folder), "auto", settings=settings)
