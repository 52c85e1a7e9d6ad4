"""The KV cache contract (DESIGN.md §3) on tiny random-weight models, in fp32 where outputs must be identical."""

from __future__ import annotations

import threading

import pytest

from chatapp.engine import ChatSession
from chatapp.engine.bench import naive_turn
from chatapp.engine.session import Message, render_ids
from chatapp.errors import ContextOverflow
from chatapp.protocol import TurnStats

QUESTIONS = [
    "Hello there, who are you?",
    "Tell me about the river town and its old stone bridge.",
    "Why were the bakers' ovens upstairs?",
    "Écris une phrase en français, s'il te plaît. 日本語も少し。",
    "Summarise our chat in one line.",
    "One more: what colour is the sky?",
]


def run(turn) -> tuple[str, TurnStats]:
    items = list(turn)
    assert isinstance(items[-1], TurnStats)
    assert all(isinstance(i, str) for i in items[:-1])
    return "".join(items[:-1]), items[-1]


def naive_reply_ids(loaded, session: ChatSession) -> list[int]:
    """What a fresh model.generate says to the session's conversation minus its last reply."""
    history = [Message(m.role, m.content) for m in session._context_messages()[:-1]]
    ids, _stats = naive_turn(loaded, history, len(session.last_reply_ids) or 1)
    return ids


def test_cached_replies_identical_to_full_reencode_over_six_turns(tiny_fp32):
    session = ChatSession(tiny_fp32, system_prompt="You are terse.")
    history: list[Message] = [Message("system", "You are terse.")]
    for turn, question in enumerate(QUESTIONS, 1):
        text, stats = run(session.send(question, max_new_tokens=12))
        history.append(Message("user", question))
        expected_ids, _ = naive_turn(tiny_fp32, history, 12)
        assert session.last_reply_ids == expected_ids, f"turn {turn} differs from a full re-encode"
        history.append(Message("assistant", session.messages[-1].content))
        assert stats.generated_tokens == len(expected_ids)
        assert stats.prompt_tokens == len(render_ids(tiny_fp32.tokenizer, history[:-1]))
        if turn > 1:
            assert stats.prefilled_tokens < stats.prompt_tokens / 2
        assert stats.cache_tokens == stats.prompt_tokens + stats.generated_tokens - 1


def test_prefill_after_first_turn_is_new_message_plus_template_glue(tiny_words_fp32):
    tok = tiny_words_fp32.tokenizer
    session = ChatSession(tiny_words_fp32)
    _, first = run(session.send("Good morning!", max_new_tokens=8))
    assert first.prefilled_tokens == first.prompt_tokens
    for question in QUESTIONS[:4]:
        previous = session.last_stats
        _, stats = run(session.send(question, max_new_tokens=8))
        # The reply's final token is sampled but never fed: <|im_end|> if it stopped, a word if cut by length.
        glue = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        expected = len(tok(glue, add_special_tokens=False)["input_ids"])
        expected += 0 if previous.finish_reason == "stop" else 1
        assert stats.prefilled_tokens == expected
        assert stats.reused_tokens == stats.prompt_tokens - expected


def test_cancel_from_another_thread_stops_within_one_token_and_keeps_cache_consistent(tiny_fp32):
    session = ChatSession(tiny_fp32)
    run(session.send("First question", max_new_tokens=6))
    turn = session.send("Write a very long story", max_new_tokens=200)
    pieces = []
    for item in turn:
        if isinstance(item, str):
            pieces.append(item)
            if len(pieces) == 2:
                worker = threading.Thread(target=session.cancel)
                worker.start()
                worker.join()
        else:
            stats = item
    assert stats.finish_reason == "cancelled"
    assert stats.generated_tokens <= 3
    assert session.messages[-1].cut is True
    assert session.messages[-1].content == "".join(pieces)
    # The cache is what it claims to be: the next turn matches a full re-encode.
    _, after = run(session.send("Go on", max_new_tokens=8))
    assert after.finish_reason in ("stop", "length")
    assert session.last_reply_ids == naive_reply_ids(tiny_fp32, session)


def test_stopping_iteration_early_keeps_the_partial_reply(tiny_fp32):
    session = ChatSession(tiny_fp32)
    turn = session.send("Hi", max_new_tokens=50)
    first = next(turn)
    turn.close()
    assert session.messages[-1].role == "assistant" and session.messages[-1].cut
    assert session.messages[-1].content.startswith(first)
    run(session.send("Again", max_new_tokens=5))
    assert session.last_reply_ids == naive_reply_ids(tiny_fp32, session)


def test_regenerate_reuses_the_whole_prompt(tiny_fp32):
    session = ChatSession(tiny_fp32)
    run(session.send("One", max_new_tokens=6))
    first_reply, _ = run(session.send("Two", max_new_tokens=6))
    again, stats = run(session.regenerate(max_new_tokens=6))
    assert again == first_reply  # greedy: same prompt, same answer
    assert stats.prefilled_tokens == 1  # only the last prompt token is run again, for its logits
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
    sampled, _ = run(session.regenerate(max_new_tokens=6, temperature=1.0, seed=7))
    assert session.last_stats.prefilled_tokens == 1
    assert sampled == run(session.regenerate(max_new_tokens=6, temperature=1.0, seed=7))[0]


def test_edit_reruns_only_from_the_first_changed_token(tiny_fp32):
    tok = tiny_fp32.tokenizer
    session = ChatSession(tiny_fp32)
    for q in QUESTIONS[:3]:
        run(session.send(q, max_new_tokens=6))
    # Message 2 was "Tell me about the river town ...": the first four tokens stay, the rest changes.
    edited = "Tell me about the glassworks instead."
    _, stats = run(session.edit(2, edited, max_new_tokens=6))
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[2].content == edited
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    changed = count(edited + "<|im_end|>\n<|im_start|>assistant\n") - count("Tell me about the")
    assert stats.prefilled_tokens == changed
    assert session.last_reply_ids == naive_reply_ids(tiny_fp32, session)
    with pytest.raises(ValueError):
        session.edit(1, "not a user message")


def test_overflow_drops_oldest_turns_keeps_system_prompt_and_counts_the_reprefill(tiny_fp32):
    session = ChatSession(tiny_fp32, system_prompt="Stay brief.", context_length=160)
    reasons = []
    for q in QUESTIONS:
        _, stats = run(session.send(q, max_new_tokens=10))
        reasons.append(stats.finish_reason)
        assert stats.prompt_tokens + 10 <= 160
    assert "overflow-trimmed" in reasons
    trimmed_turn = reasons.index("overflow-trimmed")
    assert session.messages[0].role == "system"
    assert session._context_messages()[0].content == "Stay brief."
    assert session.dropped_messages >= 2
    assert len(session.messages) == 1 + 2 * len(QUESTIONS)  # nothing is lost from the record
    assert trimmed_turn >= 1  # the first turn fits; trimming starts once history piles up


def test_overflow_prefill_is_counted(tiny_fp32):
    session = ChatSession(tiny_fp32, system_prompt="Stay brief.", context_length=120)
    stats = None
    for q in QUESTIONS:
        _, stats = run(session.send(q, max_new_tokens=10))
        if stats.finish_reason == "overflow-trimmed":
            break
    assert stats.finish_reason == "overflow-trimmed" and stats.trimmed_messages >= 2
    assert stats.prefilled_tokens > len(QUESTIONS[0])  # far more than the new message: the kept history again
    assert session.last_reply_ids == naive_reply_ids(tiny_fp32, session)


def test_a_message_too_long_for_the_context_is_a_clear_error_and_is_not_kept(tiny_fp32):
    session = ChatSession(tiny_fp32, context_length=64)
    with pytest.raises(ContextOverflow, match="64-token context"):
        run(session.send("word " * 200, max_new_tokens=8))
    assert session.messages == []
    _, stats = run(session.send("Short", max_new_tokens=4))
    assert stats.generated_tokens >= 1


def test_reset_forgets_history_but_keeps_system_prompt(tiny_fp32):
    session = ChatSession(tiny_fp32, system_prompt="S")
    run(session.send("a", max_new_tokens=3))
    session.reset()
    assert [m.role for m in session.messages] == ["system"]
    _, stats = run(session.send("b", max_new_tokens=3))
    assert stats.prefilled_tokens == stats.prompt_tokens


def test_min_new_tokens_and_a_cache_copy_continue_like_generate(tiny_words_fp32):
    import torch

    loaded = tiny_words_fp32
    session = ChatSession(loaded)
    _, stats = run(session.send("Hello", max_new_tokens=20, min_new_tokens=20))
    assert stats.generated_tokens == 20
    assert not set(session.last_reply_ids) & loaded.stop_token_ids
    prompt = render_ids(loaded.tokenizer, [Message("user", "Hello")])
    stop = sorted(loaded.stop_token_ids)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            cache=session.cache_copy(len(prompt) - 1),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[0],
        )
    assert out[0, len(prompt) :].tolist() == session.last_reply_ids
    assert session.cache_tokens == len(prompt) + 19  # the copy left the session's own cache alone
    with pytest.raises(ValueError):
        session.cache_copy(10_000)
