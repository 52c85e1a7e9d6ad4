"""SDPA with enable_gqa for masked multi-token calls on the CPU (cpu_attention): what transformers' own SDPA
computes, on a tiny random model of every family in the catalog."""

from __future__ import annotations

import pytest
import torch
from modelhelpers import FAMILIES, build_family_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from chatapp.engine import cpu_attention, kvcache
from chatapp.engine.generate import forward, prefill


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, starter_folder, tmp_path_factory, settings):
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp(request.param), request.param)
    return load_model(str(folder), "fp32", settings=settings)


@pytest.fixture
def grouped_calls(monkeypatch):
    """The query lengths of the SDPA calls made with enable_gqa over a mask."""
    calls: list[int] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        if kwargs.get("enable_gqa") and attn_mask is not None:
            calls.append(query.shape[2])
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _logits(loaded, ids: list[int], attention) -> torch.Tensor:
    """Prefill ids[:60] (no mask on the CPU), then ids[60:-1] on top of it, then the last id alone: the logits of
    the rows after the first prefill."""
    AttentionInterface.register("sdpa", attention)
    try:
        cache = kvcache.new_cache(loaded.model.config)
        with torch.inference_mode():
            prefill(loaded.model, cache, ids[:60])
            rows = forward(loaded.model, cache, ids[60:-1], rows=len(ids) - 61)
            return torch.cat([rows, forward(loaded.model, cache, ids[-1:])])
    finally:
        cpu_attention.install()


def test_loading_a_model_installs_it(family):
    assert AttentionInterface()["sdpa"] is cpu_attention.sdpa_forward


def test_a_prefill_on_a_cache_computes_what_transformers_sdpa_does(family, grouped_calls):
    ids = family.tokenizer("The bridge over the river was built of stone, and the town grew around it. " * 6).input_ids
    assert len(ids) > 70
    ours = _logits(family, ids, cpu_attention.sdpa_forward)
    if family.attn_implementation == "sdpa":
        # The families' heads are grouped (4 query heads to 2 key/value heads), so the new path ran.
        assert len(ids) - 61 in grouped_calls and 1 not in grouped_calls
    grouped_calls.clear()
    theirs = _logits(family, ids, sdpa_attention_forward)
    assert not grouped_calls
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_ungrouped_heads_are_transformers_own(grouped_calls):
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    module.is_causal = True
    query, key = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 9, 8)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)[None, None]
    out, _ = cpu_attention.sdpa_forward(module, query, key, key, mask)
    assert not grouped_calls
    torch.testing.assert_close(out, sdpa_attention_forward(module, query, key, key, mask)[0])
