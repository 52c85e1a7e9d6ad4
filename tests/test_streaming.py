"""Streaming text must never split a multi-byte character or garble token boundaries."""

from __future__ import annotations

import pytest

from chatapp.engine.generate import Sampler, StreamDecoder

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

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    assert Sampler(0.0)(logits) == 1
    a = [Sampler(1.0, 0.9, seed=3)(logits) for _ in range(5)]
    b = [Sampler(1.0, 0.9, seed=3)(logits) for _ in range(5)]
    assert a == b
    # top_p this small keeps only the most likely token.
    assert {Sampler(1.0, 0.01, seed=s)(logits) for s in range(20)} == {1}
    with pytest.raises(ValueError):
        Sampler(1.0, 0.0)
