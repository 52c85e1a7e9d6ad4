"""bench/gpu_check.py, the GPU check of issue 16: the models it builds from bench/configs."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_the_configs_have_the_catalogs_shapes(bench_path):
    """The published configs agree with models.toml's own numbers for the same models (found independently)."""
    import gpu_models
    from transformers import AutoConfig

    from chatapp.catalog import load_catalog

    catalog = load_catalog()
    for name in gpu_models.MODELS:
        raw = gpu_models.read_config(name)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        shape = catalog[name].architecture
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        found = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
        assert found == (shape["layers"], shape["hidden_size"], shape["intermediate_size"], shape["attention_heads"])
        assert (config.num_key_value_heads, head_dim, config.vocab_size) == (
            shape["kv_heads"],
            shape["head_dim"],
            shape["vocab_size"],
        )
        assert config.tie_word_embeddings == shape["tied_embeddings"], name
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        assert window == shape.get("sliding_window"), name


def test_a_shrunk_config_keeps_its_family_and_fits_bitsandbytes_cpu_kernels(bench_path):
    import gpu_models

    gemma = gpu_models.shrink(gpu_models.read_config("gemma-2-9b"))
    assert gemma["model_type"] == "gemma2" and gemma["sliding_window"] == 32
    assert gemma["attn_logit_softcapping"] == 50.0 and gemma["final_logit_softcapping"] == 30.0
    llama = gpu_models.shrink(gpu_models.read_config("llama-3.1-8b"))
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["num_hidden_layers"] == 2
    for config in (gemma, llama):
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        assert config["num_key_value_heads"] * head_dim % 32 == 0 and config["intermediate_size"] % 32 == 0


def test_the_tokenizer_is_the_same_when_transformers_rebuilds_it_as_qwen2s(bench_path, tmp_path):
    """transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, rebuilt from the vocabulary; a reply's
    text must still encode back to its ids, and a prompt have the asked length."""
    import gpu_models
    from transformers import AutoTokenizer

    from chatapp.engine.session import Message, render_ids

    folder = gpu_models.build("qwen2.5-7b", tmp_path / "qwen", device="cpu", dry_run=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 512
    reply = [gpu_models.reply_ids()[(7 * i) % 95] for i in range(200)]
    assert tokenizer(tokenizer.decode(reply), add_special_tokens=False)["input_ids"] == reply
    assert len(render_ids(tokenizer, [Message("user", gpu_models.user_message(tokenizer, 100))])) == 100
    saved = gpu_models.byte_tokenizer(512)
    assert saved("hello, world", add_special_tokens=False)["input_ids"] == tokenizer("hello, world")["input_ids"]
