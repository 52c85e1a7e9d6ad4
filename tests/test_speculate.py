"""Prompt-lookup speculative decoding: the drafter, the acceptance rule, the gate, and a turn's contract.

The reply of a turn with drafts must be the reply without them (greedy: the same tokens; sampling: the
same distribution), and the cache must hold the same ids afterwards, however the reply ends.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from chathelpers import Chat, drafted_and_plain
from modelhelpers import build_chain_model
from transformers.cache_utils import DynamicLayer

from chatapp.engine.generate import Sampler
from chatapp.engine.session import ChatSession, Message, render_ids
from chatapp.engine.speculate import DRAFT_TOKENS, Drafter, Gate, verify
from chatapp.sampling import SamplingParams

# -- the drafter ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "draft"),
    [
        # The longest n-gram wins over a shorter one that occurred later.
        ([1, 2, 3, 40, 41, 9, 3, 50, 51, 1, 2, 3], [40, 41, 9, 3, 50, 51]),
        # Of equal n-grams, the latest occurrence.
        ([5, 6, 70, 5, 6, 80, 81, 5, 6], [80, 81, 5, 6, 80, 81]),
        # A single-token match still drafts.
        ([7, 60, 61, 62, 1, 7], [60, 61, 62, 1, 7, 60]),
        # A loop is drafted whole: the copy runs on through the draft itself.
        ([4, 4, 4], [4] * DRAFT_TOKENS),
        ([9, 1, 2, 1, 2], [1, 2, 1, 2, 1, 2]),
        # Nothing to go on.
        ([1, 2, 3], []),
        ([1], []),
    ],
)
def test_the_drafter_proposes_what_followed_the_longest_latest_match(ids, draft):
    assert Drafter(ids).propose() == draft


def test_the_drafter_follows_the_ids_as_they_grow():
    drafter = Drafter([10, 11, 12, 13])
    assert drafter.propose() == []
    drafter.push(10)
    assert drafter.propose() == [11, 12, 13, 10, 11, 12]
    drafter.push(11)
    drafter.push(99)
    assert drafter.propose() == []


# -- the acceptance rule, on given logits ----------------------------------------------------

ROWS = torch.tensor([[0.0, 3.0, 1.0, -1.0, 2.0], [4.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0, 0.0]])


@pytest.mark.parametrize(
    ("draft", "emitted"),
    [
        ([1, 0], [1, 0, 3]),  # all agree: the drafts and the bonus token of the last row
        ([1, 2], [1, 0]),  # the second is wrong: kept up to it, then the model's own choice
        ([4, 0], [1]),  # the first is wrong
        ([1], [1, 0]),
    ],
)
def test_greedy_verify_keeps_the_longest_prefix_the_model_agrees_with(draft, emitted):
    sampler = Sampler(SamplingParams(temperature=0.0))
    assert verify(ROWS[: len(draft) + 1], draft, sampler) == emitted


def _chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token outside the distribution was emitted"
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("drafted", [1, 4, 0, 3], ids=["likely", "middling", "unlikely", "outside-the-nucleus"])
def test_sampled_verify_emits_tokens_distributed_as_the_sampler_would(drafted, top_p):
    """Whatever was drafted, the first emitted token follows p: a wrong rule (always accept, or redraw
    from p with the drafted token still in it) is off by far more than the bound."""
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=1))
    p = sampler.distribution(ROWS[:1])[0]
    draws = 20_000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[verify(ROWS[:2], [drafted], sampler)[0]] += 1
    # 4 degrees of freedom: P(chi2 > 25) is about 5e-5; always accepting gives thousands.
    assert _chi_square(counts, p) < 25, (counts / draws, p)


def test_sampled_verify_takes_a_bonus_token_from_the_last_row_after_a_sure_draft():
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=2))
    rows = torch.tensor([[0.0, 100.0, 0.0], [1.0, 0.0, 2.0]])
    p = sampler.distribution(rows[1:])[0]
    counts = torch.zeros(3)
    for _ in range(10_000):
        emitted = verify(rows, [1], sampler)
        assert emitted[0] == 1 and len(emitted) == 2
        counts[emitted[1]] += 1
    assert _chi_square(counts, p) < 20


# -- the gate --------------------------------------------------------------------------------


def test_the_gate_rests_after_drafts_that_do_not_pay_then_tries_again():
    gate = Gate()
    for _ in range(-(-Gate.WINDOW // DRAFT_TOKENS)):  # one window of drafts with nothing accepted
        assert gate.open()
        gate.record(DRAFT_TOKENS, 0)
    for _ in range(Gate.REST):
        assert not gate.open()
        gate.rested()
    assert gate.open()


def test_the_gate_stays_open_while_drafts_are_accepted_often_enough():
    gate = Gate()
    for i in range(200):
        gate.record(DRAFT_TOKENS, 2 if i % 2 else 1)  # 25% accepted: just pays
        assert gate.open()


def test_a_dearer_verify_needs_more_of_each_draft_accepted():
    """A verify that costs 4.7 steps: 50% accepted (4 tokens a verify) doesn't pay."""
    dear, cheap = Gate(4.7), Gate()
    for _ in range(-(-Gate.WINDOW // DRAFT_TOKENS)):
        for gate in (dear, cheap):
            assert gate.open()
            gate.record(DRAFT_TOKENS, DRAFT_TOKENS // 2)
    assert cheap.open() and not dear.open()
    steady = Gate(4.7)
    for _ in range(200):
        steady.record(DRAFT_TOKENS, 5)  # 83%: 6 tokens for the price of 4.7 steps
        assert steady.open()


# -- a turn with drafts, on a model whose replies are known ------------------------------------

WORDS = " river town bridge"


@pytest.fixture(scope="module")
def chain_fp32(starter_folder, tmp_path_factory, settings):
    """Greedy replies to a prompt ending in the template's "assistant\\n" are " river town bridge<|im_end|>"."""
    from transformers import AutoTokenizer

    from chatapp.engine import load_model

    tokenizer = AutoTokenizer.from_pretrained(starter_folder)
    opening = render_ids(tokenizer, [Message("user", "x")])[-1]
    words = tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    assert len(words) == 3
    chain = [opening, *words, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    folder = build_chain_model(starter_folder, tmp_path_factory.mktemp("chain"), chain)
    return load_model(str(folder), "fp32", settings=settings)


#: The user's message ends with the words, so the prompt holds "river town bridge<|im_end|>": after the first
#: word the drafter proposes the rest, the stop token and the template's next turn.
ASK = "Say it back:" + WORDS


def _both(loaded, *, params: SamplingParams, cancel_after: int | None = None):
    """One turn with prompt-lookup drafts and one without: (turn, cache ids, next turn's stats) each."""
    return drafted_and_plain(loaded, ASK, params, cancel_after, speculative="ngram")


def _check_same(loaded, spec, plain) -> None:
    (turn, held, after), (plain_turn, plain_held, plain_after) = spec, plain
    assert turn.tokens == plain_turn.tokens and turn.text == plain_turn.text
    assert turn.stats.finish_reason == plain_turn.stats.finish_reason
    assert turn.stats.generated_tokens == len(turn.tokens)
    prompt = render_ids(loaded.tokenizer, [Message("user", ASK)])
    assert held == plain_held == prompt + turn.tokens[:-1]  # the last sampled token is never in the cache
    assert turn.stats.cache_tokens == len(held)
    assert after.prefilled_tokens == plain_after.prefilled_tokens
    assert plain_turn.stats.drafted_tokens == plain_turn.stats.accepted_tokens == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_stop_token_inside_an_accepted_draft_ends_the_reply_there(chain_fp32, temperature):
    params = SamplingParams(temperature=temperature, top_p=1.0, seed=3, max_new_tokens=50)
    spec, plain = _both(chain_fp32, params=params)
    _check_same(chain_fp32, spec, plain)
    turn = spec[0]
    assert turn.text == WORDS and turn.stats.finish_reason == "stop"
    assert turn.tokens[-1] == chain_fp32.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # One verify drafted past the stop token and accepted up to it; nothing after it came out.
    assert turn.stats.drafted_tokens == DRAFT_TOKENS and turn.stats.accepted_tokens >= 3


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4])
def test_max_new_tokens_cuts_an_accepted_draft(chain_fp32, max_new_tokens):
    spec, plain = _both(chain_fp32, params=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    _check_same(chain_fp32, spec, plain)
    assert len(spec[0].tokens) == max_new_tokens


@pytest.mark.parametrize("stop", [" town", "bri", "wn b"])
def test_a_stop_string_inside_an_accepted_draft_ends_the_reply_there(chain_fp32, stop):
    loaded = replace(chain_fp32, stop_strings=(stop,))
    spec, plain = _both(loaded, params=SamplingParams(temperature=0.0, max_new_tokens=50))
    _check_same(loaded, spec, plain)
    assert spec[0].text == WORDS[: WORDS.index(stop)] and spec[0].stats.drafted_tokens > 0


@pytest.mark.parametrize("after", [1, 2])
def test_a_cancel_during_an_accepted_draft_stops_where_plain_decoding_does(chain_fp32, after):
    spec, plain = _both(chain_fp32, params=SamplingParams(temperature=0.0, max_new_tokens=50), cancel_after=after)
    _check_same(chain_fp32, spec, plain)
    assert spec[0].stats.finish_reason == "cancelled" and len(spec[0].tokens) == after + 1


def test_a_caller_that_stops_reading_mid_draft_leaves_the_cache_right(chain_fp32):
    session = ChatSession(chain_fp32)
    stream = session.reply_to([Message("user", ASK)], SamplingParams(temperature=0.0, max_new_tokens=50))
    next(stream), next(stream)
    stream.close()
    # The verify accepted " town bridge<|im_end|>"; the reader took " river town", so the cache holds the
    # prompt and " river", as it does when plain decoding is stopped there.
    prompt = render_ids(chain_fp32.tokenizer, [Message("user", ASK)])
    river = chain_fp32.tokenizer(" river", add_special_tokens=False)["input_ids"]
    assert session.messages[-1].content == " river town" and session.messages[-1].cut
    assert list(session.cache_ids) == prompt + river
    assert session.cache_tokens == session._cache.get_seq_length()


class RemoteLayer(DynamicLayer):
    """A cache layer of a type chatapp doesn't know (as remote code brings): it must not be cropped."""


def _remote(layer) -> RemoteLayer:
    other = RemoteLayer()
    other.update(layer.keys.clone(), layer.values.clone())
    return other


def test_a_cache_that_cannot_be_cropped_gets_no_drafts(chain_fp32):
    chat = Chat(chain_fp32)
    first = chat.send(ASK, max_new_tokens=50)
    assert first.stats.drafted_tokens > 0 and first.stats.finish_reason == "stop"
    chat.session._cache.layers = [_remote(layer) for layer in chat.session._cache.layers]
    second = chat.send(ASK, max_new_tokens=50)
    assert second.stats.reused_tokens > first.stats.prompt_tokens  # the same cache went on
    assert second.stats.drafted_tokens == 0
    assert second.tokens == first.tokens


def test_an_unknown_speculative_mode_is_refused_in_one_line(chain_fp32):
    with pytest.raises(ValueError, match="speculative must be one of ngram, draft, off, got 'fast'"):
        ChatSession(chain_fp32, speculative="fast")


def test_stats_stored_before_drafts_still_load_and_show():
    from chatapp.protocol import TurnStats
    from chatapp.ui.widgets import stats_line

    new = TurnStats(100, 10, 20, 0.1, 30.0, 119, "stop", drafted_tokens=18, accepted_tokens=12).as_dict()
    old = {k: v for k, v in new.items() if k not in ("drafted_tokens", "accepted_tokens")}
    assert TurnStats(**old).drafted_tokens == 0
    assert "drafts" not in stats_line(old, 2048)
    assert stats_line(new, 2048).endswith("· drafts 12/18 kept")
