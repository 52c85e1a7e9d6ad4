"""The growing KV cache: buffers that grow in steps and views that move, instead of a concatenation per token."""

from __future__ import annotations

import copy

import pytest
import torch
from chathelpers import Chat

from chatapp.engine import kvcache
from chatapp.engine.session import Message, render_ids


def _run(loaded, cache, ids):
    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)


def _room(layer) -> int:
    return layer._k.shape[-2]


def test_a_layer_grows_in_steps_and_decoding_writes_into_the_same_buffer(tiny_fp32):
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, list(range(1, 11)))
    layer = cache.layers[0]
    assert layer.length == 10 and _room(layer) == kvcache.STEP
    buffer = layer._k.data_ptr()
    for token in range(kvcache.STEP - 10):
        _run(tiny_fp32, cache, [token + 1])
    # Every token so far went into the first buffer: nothing was copied.
    assert layer._k.data_ptr() == buffer and layer.length == kvcache.STEP
    assert layer.keys.data_ptr() == buffer and cache.get_seq_length() == kvcache.STEP
    _run(tiny_fp32, cache, [7])
    assert _room(layer) == 2 * kvcache.STEP and layer.length == kvcache.STEP + 1
    assert kvcache.nbytes(cache) == sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers)


def test_a_long_prompt_takes_its_room_in_one_buffer(tiny_fp32):
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, [5] * (kvcache.STEP * 2 + 3))
    assert all(_room(layer) == kvcache.STEP * 3 for layer in cache.layers)


def test_a_dropped_token_is_overwritten_by_the_next_and_attention_never_sees_it(tiny_fp32):
    ids = render_ids(tiny_fp32.tokenizer, [Message("user", "Tell me about the bridge.")])
    whole = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, whole, ids + [11])
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, ids + [42, 43, 44])
    kvcache.drop(cache, 3)
    _run(tiny_fp32, cache, [11])
    # Equal up to float rounding (one forward of n tokens and one of n - 1 then 1 sum in other orders); had
    # attention seen the dropped tokens, the later layers would differ by far more.
    for mine, reference in zip(cache.layers, whole.layers, strict=True):
        assert mine.keys.shape == reference.keys.shape
        assert torch.allclose(mine.keys, reference.keys, atol=1e-5)
        assert torch.allclose(mine.values, reference.values, atol=1e-5)


def test_a_snapshot_copy_keeps_what_the_cache_held_when_it_was_taken(tiny_fp32):
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, [3, 4, 5, 6])
    named, seen = kvcache.tensors(cache)
    before = {name: tensor.clone() for name, tensor in named.items()}
    kvcache.drop(cache, 2)
    _run(tiny_fp32, cache, [9, 9])  # writes where the snapshot's last two tokens were
    assert seen == [4] * len(cache.layers)
    assert all(torch.equal(named[name], before[name]) for name in named)
    restored = kvcache.from_tensors(tiny_fp32.model.config, named, seen, "cpu")
    assert restored.get_seq_length() == 4 and torch.equal(restored.layers[0].keys, before["k.0"])


def test_a_copied_cache_is_independent_of_the_original(tiny_fp32):
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, [3, 4, 5, 6])
    twin = copy.deepcopy(cache)
    kept = twin.layers[0].keys.clone()
    kvcache.drop(cache, 2)
    _run(tiny_fp32, cache, [9, 9])
    assert torch.equal(twin.layers[0].keys, kept)
    _run(tiny_fp32, twin, [1])
    assert twin.get_seq_length() == 5 and cache.get_seq_length() == 4


@pytest.fixture
def small_steps(monkeypatch):
    """Buffers that grow every few tokens, so a short chat crosses many growths."""
    monkeypatch.setattr(kvcache, "STEP", 5)


def test_a_chat_over_many_growths_matches_one_over_few(tiny_fp32, small_steps):
    big, small = Chat(tiny_fp32), Chat(tiny_fp32)
    questions = ["Tell me about the bridge.", "And the mill?", "What of the floods, then?"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kvcache, "STEP", 256)
        wide = [big.send(q, max_new_tokens=12) for q in questions]
    narrow = [small.send(q, max_new_tokens=12) for q in questions]
    assert [t.tokens for t in narrow] == [t.tokens for t in wide]
    assert [t.stats.prefilled_tokens for t in narrow] == [t.stats.prefilled_tokens for t in wide]
    assert small.session._cache.layers[0]._k.shape[-2] % 5 == 0


def test_a_sliding_layer_gives_back_the_room_a_long_turn_took(starter_folder, tmp_path, settings, small_steps):
    from modelhelpers import build_family_model

    from chatapp.engine import load_model

    loaded = load_model(str(build_family_model(starter_folder, tmp_path, "gemma3")), "fp32", settings=settings)
    chat = Chat(loaded)
    chat.send("Tell me about the bridge. " * 40, max_new_tokens=4)  # a turn many windows long
    sliding = [layer for layer in chat.session._cache.layers if isinstance(layer, kvcache.GrowingSlidingLayer)]
    assert sliding and all(_room(layer) > 200 for layer in sliding)
    turn = chat.send("And the mill?", max_new_tokens=4)
    assert turn.stats.prefilled_tokens < 60 and turn.stats.cache_note == ""
    # At the turn's start the layers went back to their window, and so did their buffers' room; this turn
    # then added its own tokens.
    held = sliding[0].sliding_window - 1 + turn.stats.prefilled_tokens + turn.stats.generated_tokens
    assert all(_room(layer) <= held + kvcache.STEP for layer in sliding)


def test_attention_can_read_a_layers_whole_buffer_and_finds_zeros_past_its_tokens(tiny_fp32):
    cache = kvcache.new_cache(tiny_fp32.model.config)
    _run(tiny_fp32, cache, list(range(1, 11)))
    layer = cache.layers[0]
    assert kvcache.whole(layer.keys) is layer._k and kvcache.whole(layer.values) is layer._v
    assert torch.equal(layer._k[..., 10:, :], torch.zeros_like(layer._k[..., 10:, :]))
    # Anything else is not a buffer's first tokens: a plain tensor, a sliding layer's last tokens, a copy.
    assert kvcache.whole(torch.zeros(1, 2, 10, 16)) is None
    assert kvcache.whole(layer.keys[..., 1:, :]) is None
    assert kvcache.whole(layer.keys.clone()) is None
