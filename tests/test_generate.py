"""generate.py: streaming text never splits a character or leaks a stop string; sampling; the decode loop."""

from __future__ import annotations

import pytest
import torch
from chathelpers import Chat

from chatapp.engine import load_model
from chatapp.engine.generate import ReplyText, Sampler, StreamDecoder, stream
from chatapp.engine.session import render_ids
from chatapp.sampling import SamplingParams

TEXTS = [
    "Plain ASCII words, with punctuation!",
    "Émojis 🎉🚀 and accents: café, naïve, Ærø.",
    "日本語のテキストと中文混合, then English again.",
    "  leading spaces\nand\ttabs  and trailing  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_deltas_join_to_the_text_without_broken_characters(tiny_fp32, text):
    tok = tiny_fp32.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.finish())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    # A byte-level tokenizer splits these characters across tokens: some pushes must have waited.
    if any(ord(c) > 0x7FF for c in text):
        assert "" in deltas[:-1]


def test_sampler_greedy_seeded_and_top_p():
    import torch

    def sampler(temperature, top_p=1.0, seed=None):
        return Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert sampler(0.0)(logits) == 1
    a = [sampler(1.0, 0.9, seed=3)(logits) for _ in range(5)]
    b = [sampler(1.0, 0.9, seed=3)(logits) for _ in range(5)]
    assert a == b
    # top_p this small keeps only the most likely token.
    assert {sampler(1.0, 0.01, seed=s)(logits) for s in range(20)} == {1}
    with pytest.raises(ValueError, match="top_p must be > 0 and <= 1"):
        sampler(1.0, 0.0)


def test_the_decoder_keeps_its_text_instead_of_decoding_every_id_again(tiny_fp32):
    tok = tiny_fp32.tokenizer
    calls = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = tok("word " * 300, add_special_tokens=False)["input_ids"]
    decoder = StreamDecoder(Counting())
    for i in ids:
        decoder.push(i)
        assert decoder.text  # reading the text decodes nothing
    assert decoder.text + decoder.finish() == tok.decode(ids)
    assert max(calls) <= 4  # a short window each time, never the whole reply


@pytest.mark.parametrize("chunks", [["Hello", "\nUs", "er: more"], ["Hello\n", "User:", " x"], ["Hello\nUser: x"]])
def test_reply_text_stops_at_a_stop_string_and_never_shows_part_of_it(chunks):
    reply = ReplyText(("\nUser:", "\nSystem:"))
    shown = ""
    for chunk in chunks:
        reply.add(chunk)
        shown += reply.take()
        assert "\n" not in shown  # a newline that may start "\nUser:" waits
    assert reply.stopped and reply.text == "Hello"
    assert shown + reply.take(final=True) == "Hello"


def test_reply_text_releases_a_held_tail_that_was_not_a_stop_string():
    reply = ReplyText(("\nUser:",))
    reply.add("a\nU")
    assert reply.take() == "a"
    reply.add("nder the bridge")
    assert reply.take() == "\nUnder the bridge" and not reply.stopped


def test_stream_feeds_every_token_but_the_last():
    import torch

    fed, reasons = [], iter([None, None, "length"])
    items = list(
        stream(
            torch.zeros(1, 3), lambda logits: 7, lambda t: fed.append(t) or torch.zeros(1, 3), lambda t: next(reasons)
        )
    )
    assert items == [(7, None), (7, None), (7, "length")] and fed == [7, 7]


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


def test_a_first_prompt_on_a_cpu_is_chunked_under_eager_attention_and_whole_under_sdpa(
    starter_folder, tmp_path, tiny_fp32, settings, monkeypatch
):
    """SDPA's causal kernel holds no scores, so a CPU prefills a first prompt whole; Gemma 2's eager attention holds
    heads x rows x keys of them, so its prompt goes in chunks, as the planner counts (facts.eager_attention)."""
    from modelhelpers import build_family_model

    from chatapp.engine import generate, kvcache
    from chatapp.facts import facts_from_folder

    folder = build_family_model(starter_folder, tmp_path / "gemma2", "gemma2")
    gemma = load_model(str(folder), "fp32", settings=settings)
    assert gemma.attn_implementation == "eager" and facts_from_folder(folder).eager_attention
    assert tiny_fp32.attn_implementation == "sdpa"
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 64)
    forwards: list[int] = []
    real_forward = generate.forward
    monkeypatch.setattr(
        generate, "forward", lambda model, cache, ids: forwards.append(len(ids)) or real_forward(model, cache, ids)
    )
    score_rows: list[int] = []
    real_softmax = torch.nn.functional.softmax
    monkeypatch.setattr(
        torch.nn.functional, "softmax", lambda x, *a, **k: score_rows.append(x.shape[-2]) or real_softmax(x, *a, **k)
    )
    ids = list(range(100, 300))
    for loaded, expected in ((gemma, [64, 64, 64, 8]), (tiny_fp32, [200])):
        forwards.clear()
        with torch.inference_mode():
            generate.prefill(loaded.model, kvcache.new_cache(loaded.model.config), ids)
        assert forwards == expected
    # Eager attention's softmax never saw more rows than a chunk's: the scores it held were chunk x keys.
    assert score_rows and max(score_rows) == 64
