"""The cache contract on a tiny random model of every architecture family in the catalog, in fp32.

Sliding-window families (Gemma 2 and 3, and a Mistral with a window) get a 16-token window, so each chat
here is dozens of windows long.
"""

from __future__ import annotations

import pytest
from chathelpers import Chat
from modelhelpers import FAMILIES, build_family_model

from chatapp.engine.bench import naive_turn, run_bench
from chatapp.engine.session import Message, common_prefix_len, render_ids

TOPICS = ["the bridge", "the floods", "the clock", "the railway", "the mill pond", "the library", "the glassworks"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_fp32(request, starter_folder, tmp_path_factory, settings):
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp(request.param), request.param, words_only=True)
    return load_model(str(folder), "fp32", settings=settings)


def _question(i: int) -> str:
    return f"Tell me about {TOPICS[i % len(TOPICS)]}, and then some more about the town around it, please."


def _history(chat: Chat) -> list[Message]:
    return [Message(m.role, m.content) for m in chat.history]


def test_each_family_reuses_its_cache_and_matches_a_full_reencode(family_fp32):
    loaded = family_fp32
    tokenizer = loaded.tokenizer
    chat = Chat(loaded, system="You are terse.")
    previous: list[int] = []
    held: list[int] = []  # what the cache must hold after each turn: the prompt and all of the reply but its end
    for i in range(8):
        before = _history(chat)
        turn = chat.send(_question(i), max_new_tokens=16)
        prompt = render_ids(tokenizer, [*before, Message("user", _question(i))])
        assert turn.tokens == naive_turn(loaded, [*before, Message("user", _question(i))], 16)[0], f"turn {i + 1}"
        assert turn.stats.prompt_tokens == len(prompt)
        # Only what differs from what the cache held is run: the new message and its template glue (plus,
        # for a template that rewrites the last reply, that reply), never the history before it.
        assert turn.stats.prefilled_tokens == len(prompt) - common_prefix_len(prompt, held)
        assert turn.stats.cache_note == ""
        held = prompt + turn.tokens[:-1]
        if i:
            # At most the new message as the template renders it alone, the last reply's end, and (qwen3) the reply.
            new = len(render_ids(tokenizer, [Message("user", _question(i))])) + 12
            assert turn.stats.prefilled_tokens <= new + (len(previous) if tokenizer.chat_template.count("think") else 0)
        previous = turn.tokens
    assert turn.stats.prompt_tokens > 250


def test_a_regenerate_and_an_edit_of_the_last_message_reuse_the_cache_past_the_window(family_fp32):
    chat = Chat(family_fp32)
    for i in range(5):
        chat.send(_question(i), max_new_tokens=16)
    history = _history(chat)
    regenerated = chat.regenerate(max_new_tokens=16)
    assert regenerated.tokens == naive_turn(family_fp32, history[:-1], 16)[0]
    assert regenerated.stats.prefilled_tokens <= 3 and regenerated.stats.cache_note == ""
    edited = chat.edit(len(history) - 2, "Tell me about something else instead.", max_new_tokens=16)
    assert edited.stats.prefilled_tokens < 30 and edited.stats.cache_note == ""


def test_each_family_keeps_the_contract_when_its_cache_grows_every_few_tokens(family_fp32, monkeypatch):
    from chatapp.engine import kvcache

    monkeypatch.setattr(kvcache, "STEP", 5)  # many growths, and rollbacks and window moves across them
    test_each_family_reuses_its_cache_and_matches_a_full_reencode(family_fp32)
    test_a_regenerate_and_an_edit_of_the_last_message_reuse_the_cache_past_the_window(family_fp32)


@pytest.fixture(scope="module")
def gemma3_fp32(starter_folder, tmp_path_factory, settings):
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp("gemma3"), "gemma3", words_only=True)
    return load_model(str(folder), "fp32", settings=settings)


def test_an_edit_further_back_than_the_last_turn_rebuilds_a_sliding_cache_and_says_so_once(gemma3_fp32):
    chat = Chat(gemma3_fp32)
    for i in range(4):
        chat.send(_question(i), max_new_tokens=16)
    history = _history(chat)
    edited = chat.edit(2, "Something else entirely.", max_new_tokens=16)
    assert edited.tokens == naive_turn(gemma3_fp32, [*history[:2], Message("user", "Something else entirely.")], 16)[0]
    assert edited.stats.prefilled_tokens == edited.stats.prompt_tokens  # re-read, and counted as prefill
    assert "could not roll back" in edited.stats.cache_note
    chat.send(_question(5), max_new_tokens=16)
    again = chat.edit(0, "Start over.", max_new_tokens=16)
    assert again.stats.prefilled_tokens == again.stats.prompt_tokens and again.stats.cache_note == ""  # once


def test_a_sliding_layer_holds_its_window_plus_the_last_turn_only(gemma3_fp32):
    chat = Chat(gemma3_fp32)
    for i in range(6):
        stats = chat.send(_question(i), max_new_tokens=16).stats
    cache = chat.session._cache
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    assert sliding
    last_turn = stats.prefilled_tokens + stats.generated_tokens - 1
    for layer in sliding:
        assert layer.keys.shape[-2] == layer.sliding_window - 1 + last_turn
        assert layer.cumulative_length == chat.session.cache_tokens


def test_the_bench_runs_on_a_sliding_window_model_with_identical_outputs(gemma3_fp32):
    result = run_bench(gemma3_fp32, turns=3, max_new_tokens=8, user_tokens=24, doc_tokens=120, repeats=1)
    assert result["identical_outputs"]
    assert all(turn["prefilled_tokens"] < 24 + 60 and not turn["cache_note"] for turn in result["cached"][1:])


def test_a_thinking_template_costs_the_last_reply_without_its_thinking_plus_the_new_message(
    starter_folder, tmp_path_factory, settings
):
    """Qwen3's template drops earlier replies' <think> blocks. We render what the template renders, so the
    cache is reused up to the previous reply and that reply, without its thinking, is read again."""
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp("qwen3"), "qwen3", words_only=True)
    loaded = load_model(str(folder), "fp32", settings=settings)
    tokenizer = loaded.tokenizer
    chat = Chat(loaded)
    first = chat.send("What is the old bridge made of?", max_new_tokens=16)
    reply = chat.session.messages[-1].content
    assert "</think>" not in reply  # the think block is the template's, the reply is the model's
    question = "And the clock?"
    second = chat.send(question, max_new_tokens=16)
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    new_message = render_ids(tokenizer, [Message("user", question)])
    think = tokenizer("<think>\n\n</think>\n\n", add_special_tokens=False)["input_ids"]
    # Re-read: the reply (its thinking gone), its end, the new message with its glue; not the first prompt.
    assert second.stats.prefilled_tokens >= len(reply_ids) + len(new_message) - len(think)
    assert second.stats.prefilled_tokens <= len(reply_ids) + len(new_message) + 2
    assert second.stats.reused_tokens >= first.stats.prompt_tokens - len(think) - 1


def _foreign(layer):
    """The same keys and values in a layer kind kvcache doesn't know (as a quantized or offloaded cache's)."""
    from transformers.cache_utils import DynamicLayer

    other = DynamicLayer()
    other.update(layer.keys.clone(), layer.values.clone())
    return other


def test_a_cache_that_cannot_roll_back_is_rebuilt_and_counted(tiny_fp32):
    chat = Chat(tiny_fp32)
    chat.send("Hello there.", max_new_tokens=6)
    chat.session._cache.layers[0] = _foreign(chat.session._cache.layers[0])
    regenerated = chat.regenerate(max_new_tokens=6)
    assert regenerated.stats.prefilled_tokens == regenerated.stats.prompt_tokens
    assert "could not roll back" in regenerated.stats.cache_note


def test_can_drop_refuses_layers_it_does_not_know(tiny_fp32):
    import torch

    from chatapp.engine import kvcache

    cache = kvcache.new_cache(tiny_fp32.model.config)
    with torch.inference_mode():
        tiny_fp32.model(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
    assert kvcache.can_drop(cache, 2)
    cache.layers[0] = _foreign(cache.layers[0])
    assert kvcache.can_drop(cache, 0) and not kvcache.can_drop(cache, 1)


def test_a_model_without_sdpa_loads_with_the_attention_it_supports(family_fp32):
    expected = "eager" if type(family_fp32.model).__name__.startswith("Gemma2") else "sdpa"
    assert family_fp32.attn_implementation == expected
    if expected == "eager":
        # The plan says so already (facts.eager_attention), so the loader has nothing to swap.
        assert (
            "attention: eager (transformers has no SDPA for this model's soft-capped attention)" in family_fp32.reasons
        )


_QUOTED = (
    "The river town kept its market on the old stone bridge, where traders sold wool, salt and dried fish. "
    "Every spring the floods reached the lower streets."
)
QUOTING = [f"Repeat this exactly: {_QUOTED}", f"Again, repeat: {_QUOTED}", _question(0), _question(1)]


def test_speculative_drafts_change_no_token_and_no_prefill_count_on_each_family(family_fp32):
    """Prompt-lookup drafts on and off, turn by turn: the same replies, the same cache, the same prefill.

    The tiny random models loop on phrases and these messages repeat text, so drafts get accepted too."""
    spec, plain = Chat(family_fp32, speculative="ngram"), Chat(family_fp32, speculative="off")
    drafted = accepted = 0
    for i, text in enumerate(QUOTING):
        turn, expected = spec.send(text, max_new_tokens=40), plain.send(text, max_new_tokens=40)
        assert turn.tokens == expected.tokens, f"turn {i + 1}"
        assert turn.stats.prefilled_tokens == expected.stats.prefilled_tokens
        assert spec.session.cache_ids == plain.session.cache_ids
        assert turn.stats.accepted_tokens <= turn.stats.drafted_tokens
        drafted += turn.stats.drafted_tokens
        accepted += turn.stats.accepted_tokens
    assert drafted > 0 and accepted > 0
