"""SDPA on the CPU for grouped heads (cpu_attention): enable_gqa for masked multi-token calls and packed heads for
decode steps compute what transformers' own SDPA does, on a tiny random model of every family in the catalog."""

from __future__ import annotations

import pytest
import torch
from attentionhelpers import (
    check_decodes_as_sdpa,
    last_step_after_detours,
    load_family_in_bf16,
)
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
def sdpa_calls(monkeypatch):
    """Every SDPA call: (query length, query heads, key/value heads, enable_gqa, masked)."""
    calls: list[tuple[int, int, int, bool, bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        gqa = bool(kwargs.get("enable_gqa"))
        calls.append((query.shape[2], query.shape[1], key.shape[1], gqa, attn_mask is not None))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _grouped(calls) -> list[int]:
    """The query lengths of the calls made with enable_gqa over a mask."""
    return [length for length, _, _, gqa, masked in calls if gqa and masked]


def _packed(calls) -> list[int]:
    """The row counts of the unmasked calls whose query heads were packed onto the key/value heads."""
    return [length for length, heads, kv_heads, gqa, masked in calls if heads == kv_heads and not gqa and not masked]


def _logits(loaded, ids: list[int], attention, steps: int = 3) -> torch.Tensor:
    """Prefill ids[:60] (no mask on the CPU), then ids[60:-steps] on top of it, then the last `steps` ids one at a
    time as decode steps: the logits of the rows after the first prefill."""
    AttentionInterface.register("sdpa", attention)
    try:
        cache = kvcache.new_cache(loaded.model.config)
        with torch.inference_mode():
            prefill(loaded.model, cache, ids[:60])
            rows = [forward(loaded.model, cache, ids[60:-steps], rows=len(ids) - 60 - steps)]
            rows += [forward(loaded.model, cache, ids[i : i + 1]) for i in range(len(ids) - steps, len(ids))]
            return torch.cat(rows)
    finally:
        cpu_attention.install()


def test_loading_a_model_installs_it(family):
    assert AttentionInterface()["sdpa"] is cpu_attention.sdpa_forward


def test_a_prefill_and_decode_steps_on_a_cache_compute_what_transformers_sdpa_does(family, sdpa_calls):
    ids = family.tokenizer("The bridge over the river was built of stone, and the town grew around it. " * 6).input_ids
    assert len(ids) > 70
    ours = _logits(family, ids, cpu_attention.sdpa_forward)
    if family.attn_implementation == "sdpa":
        # The families' heads are grouped (4 query heads to 2 key/value heads), so the prefill ran with
        # enable_gqa, and every decode step had each key/value head's 2 query heads as its rows: packed here
        # when unmasked, by transformers under a sliding window's mask.
        assert len(ids) - 63 in _grouped(sdpa_calls)
        assert not [call for call in sdpa_calls if call[0] == 1]
    sdpa_calls.clear()
    theirs = _logits(family, ids, sdpa_attention_forward)
    assert not _grouped(sdpa_calls) and not _packed(sdpa_calls)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()


def test_ungrouped_heads_are_transformers_own(sdpa_calls):
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    module.is_causal = True
    query, key = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 9, 8)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)[None, None]
    out, _ = cpu_attention.sdpa_forward(module, query, key, key, mask)
    assert not _grouped(sdpa_calls)
    torch.testing.assert_close(out, sdpa_attention_forward(module, query, key, key, mask)[0])


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_a_decode_step_under_a_mask_packs_its_heads_where_asked(mask_kind, sdpa_calls, monkeypatch):
    """CUDA's compiled decode step (PACKED_UNDER_MASK), run here on the CPU: the heads that share a key/value head
    become its rows under the one mask they share, and the output is transformers' own."""
    monkeypatch.setattr(cpu_attention, "PACKED_UNDER_MASK", ("cuda", "cpu"))
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    module.is_causal = True
    query, key, value = torch.randn(2, 6, 1, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    mask = None
    if mask_kind != "none":
        mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
        mask[0, ..., 9:] = False  # a static cache's room past its tokens
        mask[1, ..., :2] = False  # a left pad
        if mask_kind == "float":
            mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    out, _ = cpu_attention.sdpa_forward(module, query, key, value, mask)
    assert sdpa_calls == [(3, 2, 2, False, mask is not None)]  # 3 rows on each of 2 heads, no copies of the keys
    torch.testing.assert_close(out, sdpa_attention_forward(module, query, key, value, mask)[0])


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_bf16(request, starter_folder, tmp_path_factory, settings):
    return load_family_in_bf16(starter_folder, tmp_path_factory.mktemp(request.param), request.param, settings)


@pytest.fixture
def products(monkeypatch):
    """Every decode step from the first cached token attends by matrix products; the row counts of those calls."""
    calls: list[int] = []
    real = cpu_attention._products

    def spy(packed, keys, values, length, scale):
        calls.append(packed.shape[2])
        return real(packed, keys, values, length, scale)

    monkeypatch.setattr(cpu_attention, "_products", spy)
    monkeypatch.setattr(cpu_attention, "LONG", 1)
    return calls


def test_bf16_decode_steps_by_matrix_products_pick_what_transformers_sdpa_picks(family_bf16, products):
    assert family_bf16.dtype == "bf16"
    check_decodes_as_sdpa(family_bf16, 1, products)


def test_a_step_after_a_rollback_reads_nothing_of_the_tokens_dropped(family_bf16, products):
    """The products read the room past the tokens in use, where dropped tokens stay: their weights must be 0."""
    ids = torch.randint(100, 5000, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    assert torch.equal(*last_step_after_detours(family_bf16, ids, [[], [7, 8, 9]]))
