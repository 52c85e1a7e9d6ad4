"""chatapp.thinking: markers from a tokenizer and template, the switch, and splitting replies as they stream."""

from __future__ import annotations

import pytest
from modelhelpers import QWEN3_HISTORY

from chatapp.thinking import MOVED, Splitter, apply, has_switch, markers, split, starts_inside

#: Qwen3's template in short: thinking switched by enable_thinking, earlier turns' thinking dropped.
QWEN3_SWITCH_TEMPLATE = (
    QWEN3_HISTORY + "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
#: DeepSeek-R1's newer way: the generation prompt opens the block, so the reply only closes it.
R1_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}{% else %}<|Assistant|>"
    "{{ m.content.split('</think>')[-1] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"

OPEN, CLOSE = "<think>", "</think>"


def pieces_of(deltas: list[str], starts: bool = False) -> tuple[tuple[str, str], bool]:
    splitter = Splitter(OPEN, CLOSE, starts_inside=starts)
    thinking, answer = "", ""
    for delta in deltas:
        thinking, answer = apply(splitter.feed(delta), thinking, answer)
    return apply(splitter.finish(), thinking, answer), splitter.unclosed


CASES = [
    # (reply, starts_inside, thinking, answer, unclosed)
    ("<think>\nLet me add.\n</think>\n\nFour.", False, "Let me add.\n", "Four.", False),
    ("Sure. <think>hmm</think> Four.", False, "hmm", "Sure. Four.", False),
    ("Counting on fingers.\n</think>\n\nFour.", True, "Counting on fingers.\n", "Four.", False),
    ("R1 distills skip the open marker.</think>Four.", False, "R1 distills skip the open marker.", "Four.", False),
    ("<think>\nstill going when the tokens ran out", False, "still going when the tokens ran out", "", True),
    ("out of tokens before closing", True, "out of tokens before closing", "", True),
    ("Four, no markers at all <thin", False, "", "Four, no markers at all <thin", False),
    ("<think>a</think>b<think>c</think>", False, "a", "b<think>c</think>", False),
    ("<think></think>Four.", False, "", "Four.", False),
    ("", False, "", "", False),
]


@pytest.mark.parametrize(("reply", "starts", "thinking", "answer", "unclosed"), CASES)
def test_every_split_point_gives_the_same_parts(reply, starts, thinking, answer, unclosed):
    assert pieces_of([reply], starts) == ((thinking, answer), unclosed)
    for cut in range(len(reply) + 1):
        assert pieces_of([reply[:cut], reply[cut:]], starts) == ((thinking, answer), unclosed), cut
    assert pieces_of(list(reply), starts) == ((thinking, answer), unclosed)
    assert split(reply, OPEN, CLOSE, starts) == (thinking, answer, not unclosed)


def test_a_marker_split_across_deltas_is_held_back_not_shown():
    splitter = Splitter(OPEN, CLOSE)
    assert splitter.feed("Hi <thi") == [("answer", "Hi ")]
    assert splitter.feed("nk>why") == [("thinking", "why")]
    assert splitter.feed(" so</") == [("thinking", " so")]
    assert splitter.unclosed
    assert splitter.feed("think>ok") == [("answer", "ok")]
    assert splitter.finish() == []
    assert not splitter.unclosed


def test_a_close_with_no_open_moves_what_was_shown_as_answer():
    splitter = Splitter(OPEN, CLOSE)
    assert splitter.feed("I should ") == [("answer", "I should ")]
    assert splitter.feed("add.</think>Four") == [("answer", "add."), (MOVED, "I should add."), ("answer", "Four")]


def test_a_held_back_tail_that_is_no_marker_comes_out_at_the_end():
    splitter = Splitter(OPEN, CLOSE)
    assert splitter.feed("<think>x <") == [("thinking", "x ")]
    assert splitter.finish() == [("thinking", "<")]
    assert splitter.unclosed


def test_markers_come_from_the_added_tokens_or_else_the_template():
    assert markers(["<|im_start|>", "<think>", "</think>"], None) == (OPEN, CLOSE)
    assert markers(["<|begin_of_thought|>", "<|end_of_thought|>"], PLAIN_TEMPLATE) == (
        "<|begin_of_thought|>",
        "<|end_of_thought|>",
    )
    assert markers([], R1_TEMPLATE) == (OPEN, CLOSE)
    assert markers(["<think>"], PLAIN_TEMPLATE) is None  # half a pair is no pair
    assert markers(["<|im_start|>"], PLAIN_TEMPLATE) is None
    assert markers([], None) is None
    assert markers([], "{{ '<thinking>' }}{{ m.content }}{{ '</thinking>' }}") == ("<thinking>", "</thinking>")


def test_the_switch_is_read_from_the_template_code():
    assert has_switch(QWEN3_SWITCH_TEMPLATE)
    assert has_switch("{%- if enable_thinking %}x{% endif %}")
    assert not has_switch(R1_TEMPLATE)
    assert not has_switch(PLAIN_TEMPLATE)
    assert not has_switch(None)
    assert not has_switch("This text mentions enable_thinking outside of any tag.")
    assert not has_switch("{{ enable_thinking_budget }}")


def test_starts_inside_when_the_generation_prompt_opens_the_block():
    assert starts_inside("<|Assistant|><think>\n", OPEN)
    assert not starts_inside("<|im_start|>assistant\n<think>\n\n</think>\n\n", OPEN)
    assert not starts_inside("<|im_start|>assistant\n", OPEN)


# -- the engine: a tiny Qwen3 whose replies are scripted ---------------------------------------------------

#: What the scripted model says with thinking on (or the template's default), and with it off.
THOUGHT = "<think> Two plus two</think> Four."
ANSWER_ONLY = " Four."
ASK = "What is two plus two?"


@pytest.fixture(scope="module")
def thinker_folder(starter_folder, tmp_path_factory):
    """A tiny random Qwen3 with <think> and </think> as added tokens and a template with the switch, made a bigram
    model that, after its generation prompt, says THOUGHT (thinking on) or ANSWER_ONLY (off), then ends its turn."""
    from modelhelpers import build_family_model, follow_chains
    from transformers import AutoTokenizer

    from chatapp.engine.session import Message, render_ids

    out = tmp_path_factory.mktemp("thinker")
    build_family_model(starter_folder, out, "qwen3", tokens=(OPEN, CLOSE), template=QWEN3_SWITCH_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(out)
    on_end = render_ids(tokenizer, [Message("user", ASK)])[-1]
    off_end = render_ids(tokenizer, [Message("user", ASK)], thinking=False)[-1]

    def said(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    return follow_chains(out, [[on_end, *said(THOUGHT), eos], [off_end, *said(ANSWER_ONLY), eos]])


@pytest.fixture(scope="module")
def thinker(thinker_folder, settings):
    from chatapp.engine import load_model

    return load_model(str(thinker_folder), "fp32", settings=settings)


def fresh_tokenizer(folder, template=None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if template:
        tokenizer.chat_template = template
    return tokenizer


def test_the_prompt_passes_enable_thinking_only_when_given(thinker):
    from chatapp.engine.session import Message, render_ids

    tokenizer = thinker.tokenizer
    ask = [Message("user", ASK)]

    def tail(thinking):
        return tokenizer.decode(render_ids(tokenizer, ask, thinking))[-60:]

    assert tail(None).endswith("<|im_start|>assistant\n")
    assert tail(True) == tail(None)
    assert tail(False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_template_without_the_switch_is_passed_nothing(thinker_folder, monkeypatch):
    from chatapp.engine.session import Message, render_ids

    for template, passed in ((R1_TEMPLATE, {}), (QWEN3_SWITCH_TEMPLATE, {"enable_thinking": True})):
        tokenizer = fresh_tokenizer(thinker_folder, template)
        seen = []
        real = tokenizer.apply_chat_template

        def recording(*args, real=real, seen=seen, **kwargs):
            seen.append({k: v for k, v in kwargs.items() if k == "enable_thinking"})
            return real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, "apply_chat_template", recording)
        render_ids(tokenizer, [Message("user", ASK)], True)
        render_ids(tokenizer, [Message("user", ASK)])
        assert seen == [passed, {}]


def test_a_thinking_reply_counts_its_thinking_and_answer_tokens(thinker):
    from chathelpers import greedy, run

    from chatapp.engine.session import ChatSession, Message

    for thinking in (None, True):
        turn = run(ChatSession(thinker).reply_to([Message("user", ASK)], greedy(), thinking=thinking))
        assert turn.text == THOUGHT and turn.stats.finish_reason == "stop"
        assert turn.tokens[:5] == thinker.tokenizer(THOUGHT, add_special_tokens=False)["input_ids"][:5]
        # <think>, three words, </think>; then " Four", "." and the end of the turn.
        assert (turn.stats.thinking_tokens, turn.stats.answer_tokens) == (5, 3)
        assert split(turn.text, OPEN, CLOSE) == ("Two plus two", "Four.", True)

    off = run(ChatSession(thinker).reply_to([Message("user", ASK)], greedy(), thinking=False))
    assert off.text == ANSWER_ONLY
    assert (off.stats.thinking_tokens, off.stats.answer_tokens) == (0, 3)


def test_a_block_cut_by_max_new_tokens_is_all_thinking(thinker):
    from chathelpers import greedy, run

    from chatapp.engine.session import ChatSession, Message

    turn = run(ChatSession(thinker).reply_to([Message("user", ASK)], greedy(max_new_tokens=3)))
    assert turn.stats.finish_reason == "length" and turn.text == "<think> Two plus"
    assert (turn.stats.thinking_tokens, turn.stats.answer_tokens) == (3, 0)
    assert split(turn.text, OPEN, CLOSE) == ("Two plus", "", False)


def test_the_next_turn_re_prefills_from_the_dropped_thinking(thinker):
    """The template drops the last reply's thinking from the history, so the cache (which holds it) is reused up to
    the reply's start only: the answer, its end and the new message are prefilled again, and the stats say so."""
    from chathelpers import greedy, run

    from chatapp.engine.session import ChatSession, Message, common_prefix_len, render_ids

    session = ChatSession(thinker)
    first = run(session.reply_to([Message("user", ASK)], greedy()))
    prompt = render_ids(thinker.tokenizer, [Message("user", ASK)])
    held = list(session.cache_ids)
    assert held == prompt + first.tokens[:-1]  # the thinking is in the cache

    history = [*session.messages, Message("user", "And three plus three?")]
    second = run(session.reply_to(history, greedy()))
    ids = render_ids(thinker.tokenizer, history)
    assert thinker.tokenizer.decode(ids).count(CLOSE) == 0  # the history lost its thinking
    assert common_prefix_len(ids, held) == len(prompt)
    assert second.stats.prefilled_tokens == len(ids) - len(prompt)
    assert second.stats.reused_tokens == len(prompt)
    assert second.stats.thinking_tokens == 5


def test_where_the_prompt_opens_the_block_the_reply_starts_inside(thinker_folder):
    from chatapp.engine import reasoning

    r1 = fresh_tokenizer(thinker_folder, R1_TEMPLATE)
    assert reasoning.starts_inside(r1, None) and not reasoning.switch(r1)
    qwen3 = fresh_tokenizer(thinker_folder)
    assert not any(reasoning.starts_inside(qwen3, value) for value in (None, True, False))
    assert reasoning.switch(qwen3) and reasoning.marker_pair(qwen3) == (OPEN, CLOSE)
    open_id, close_id = reasoning.marker_ids(qwen3)
    assert qwen3.convert_ids_to_tokens([open_id, close_id]) == [OPEN, CLOSE]


@pytest.mark.parametrize(
    ("tokens", "inside", "count", "words"),
    [
        ([1, 7, 7, 2, 9], False, 4, 2),  # open, two words, close: the answer after it
        ([9, 1, 7, 2, 9], False, 3, 1),  # an answer word before the block
        ([7, 7, 2, 9], True, 3, 2),  # the prompt opened the block
        ([7, 7, 2, 9], False, 3, 2),  # a close with no open: all before it was thinking
        ([1, 7, 7], False, 3, 2),  # never closed
        ([9, 1, 7], False, 2, 1),
        ([7, 9], False, 0, 0),  # no markers
        ([1, 2, 9, 1, 7, 2], False, 2, 0),  # a second block is answer
    ],
)
def test_thinking_tokens_part_ids_as_the_splitter_parts_text(tokens, inside, count, words):
    from chatapp.engine.reasoning import thinking_tokens

    assert thinking_tokens(tokens, (1, 2), inside) == count
    assert thinking_tokens(tokens, None, inside) == 0
    spelled = "".join({1: OPEN, 2: CLOSE}.get(t, f"w{t} ") for t in tokens)
    assert split(spelled, OPEN, CLOSE, inside)[0].count("w") == words


def test_the_worker_says_what_the_model_thinks_with_and_passes_the_switch(settings, thinker_folder, tmp_path):
    import queue
    from dataclasses import replace

    from workerhelpers import load_result

    from chatapp import protocol as p
    from chatapp.sampling import SamplingParams
    from chatapp.worker_client import WorkerClient

    events: queue.Queue = queue.Queue()
    client = WorkerClient(replace(settings, data_dir=tmp_path / "data"), events.put, log_path=tmp_path / "worker.log")
    client.start()
    try:
        loaded = load_result(client, events, p.Load(str(thinker_folder), "fp32"))
        assert isinstance(loaded, p.Loaded), loaded
        assert (loaded.thinking_markers, loaded.thinking_switch) == ((OPEN, CLOSE), True)
        assert loaded.thinking_starts_inside == {None: False, True: False, False: False}
        for thinking, text, count in ((False, ANSWER_ONLY, 0), (True, THOUGHT, 5)):
            rid = client.request_id()
            client.send(p.Generate(rid, rid, [("user", ASK)], SamplingParams(temperature=0.0), thinking=thinking))
            while not isinstance(event := events.get(timeout=60), (p.Finished, p.Error)):
                pass
            assert isinstance(event, p.Finished), event
            assert (event.text, event.stats.thinking_tokens) == (text, count)
    finally:
        client.stop()
