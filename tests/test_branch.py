"""A branch starts from a copy of its parent's KV cache (issue 11 §3), on tiny random models in fp32."""

from __future__ import annotations

import pytest
import torch
from chathelpers import Chat, greedy, run
from modelhelpers import build_family_model

from chatapp.engine import kvcache
from chatapp.engine.bench import naive_turn
from chatapp.engine.session import Message, common_prefix_len, render_ids

QUESTIONS = [
    "Hello there, who are you?",
    "Tell me about the river town and its old stone bridge.",
    "Why were the bakers' ovens upstairs?",
    "What did the clockmaker leave inside the case?",
    "Summarise our chat in one line.",
]
EDIT = "Tell me about the glassworks instead."


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def plain(messages) -> list[Message]:
    return [Message(m.role, m.content) for m in messages]


def snapshot(session) -> dict:
    """The values of a session's cache tensors now (a greedy reply alone can miss a cache that changed under it)."""
    named, seen = kvcache.tensors(session._cache)
    return {"seen": seen, **{name: t.clone() for name, t in named.items()}}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and a["seen"] == b["seen"] and all(torch.equal(a[k], b[k]) for k in a if k != "seen")


def test_a_branch_prefills_only_its_new_message_and_its_parent_goes_on_untouched(tiny_words_fp32):
    loaded, tok = tiny_words_fp32, tiny_words_fp32.tokenizer
    parent = Chat(loaded)
    for question in QUESTIONS[:4]:
        last = parent.send(question, max_new_tokens=8)
    history = plain(parent.session.messages)
    held = parent.session.cache_ids
    before = snapshot(parent.session)

    branch = parent.session.copy()
    assert branch.cache_ids == held and branch.messages == parent.session.messages
    assert branch.messages[0] is not parent.session.messages[0]
    # Branched at the reply to the second user message: the branch holds four messages, then its own.
    kept = [*history[:4], Message("user", EDIT)]
    first = run(branch.reply_to(kept, greedy(max_new_tokens=8)))
    assert first.stats.prefilled_tokens == count(tok, f"{EDIT}<|im_end|>\n<|im_start|>assistant\n")
    assert first.stats.prefilled_tokens < first.stats.prompt_tokens / 4
    assert first.tokens == naive_turn(loaded, kept, 8)[0]
    second = run(branch.reply_to([*plain(branch.messages), Message("user", "And then?")], greedy(max_new_tokens=8)))
    assert second.tokens == naive_turn(loaded, [*plain(branch.messages[:-1])], 8)[0]

    # The parent's cache is its own: the branch's crop and prefill did not touch it.
    assert parent.session.cache_ids == held and same(snapshot(parent.session), before)
    after = parent.send(QUESTIONS[4], max_new_tokens=8)
    glue = f"<|im_end|>\n<|im_start|>user\n{QUESTIONS[4]}<|im_end|>\n<|im_start|>assistant\n"
    unfed = 0 if last.stats.finish_reason == "stop" else 1  # a reply cut by length leaves its last word unfed
    assert after.stats.prefilled_tokens == count(tok, glue) + unfed
    assert after.tokens == naive_turn(loaded, [*history, Message("user", QUESTIONS[4])], 8)[0]


def test_a_branch_of_a_session_without_a_cache_reads_everything(tiny_words_fp32):
    branch = Chat(tiny_words_fp32).session.copy()
    turn = run(branch.reply_to([Message("user", EDIT)], greedy(max_new_tokens=4)))
    assert turn.stats.prefilled_tokens == turn.stats.prompt_tokens


@pytest.fixture(scope="module")
def gemma3_fp32(starter_folder, tmp_path_factory, settings):
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp("gemma3"), "gemma3", words_only=True)
    return load_model(str(folder), "fp32", settings=settings)


def test_a_sliding_window_branch_crops_within_the_last_turn_and_rebuilds_further_back(gemma3_fp32):
    """The copy keeps the sliding layers' record of the last turn (16-token window, a chat of many windows)."""
    loaded = gemma3_fp32
    parent = Chat(loaded)
    for question in QUESTIONS:
        parent.send(question, max_new_tokens=16)
    history = plain(parent.session.messages)
    held = list(parent.session.cache_ids)
    before = snapshot(parent.session)

    def new_tokens(messages: list[Message]) -> int:
        """What a cache holding `held` has to read for this conversation: all from the first id that differs."""
        prompt = render_ids(loaded.tokenizer, messages)
        return len(prompt) - common_prefix_len(prompt, held)

    near = [*history[:-2], Message("user", EDIT)]  # branched at the reply before the last user message
    turn = run(parent.session.copy().reply_to(near, greedy(max_new_tokens=16)))
    assert turn.tokens == naive_turn(loaded, near, 16)[0]
    assert turn.stats.cache_note == "" and turn.stats.prefilled_tokens == new_tokens(near)
    assert turn.stats.prompt_tokens > 8 * 16 > 4 * turn.stats.prefilled_tokens

    far = [*history[:2], Message("user", EDIT)]
    turn = run(parent.session.copy().reply_to(far, greedy(max_new_tokens=16)))
    assert turn.tokens == naive_turn(loaded, far, 16)[0]
    assert turn.stats.prefilled_tokens == turn.stats.prompt_tokens and "could not roll back" in turn.stats.cache_note

    assert same(snapshot(parent.session), before)
    more = [*history, Message("user", "One more thing.")]
    after = parent.send("One more thing.", max_new_tokens=16)
    assert after.tokens == naive_turn(loaded, more, 16)[0]
    assert after.stats.cache_note == "" and after.stats.prefilled_tokens == new_tokens(more)
