"""Sampling: the table of defaults and bounds, where each value comes from, and the filters the engine applies."""

from __future__ import annotations

import pytest
import torch
from chathelpers import run

from chatapp.engine.generate import Sampler
from chatapp.engine.session import ChatSession, Message, render_ids
from chatapp.sampling import LIMITS, SamplingParams, model_defaults, parse, resolve, resolve_with_sources

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]])


def test_every_parameter_has_its_default_and_bounds_in_one_table():
    assert set(LIMITS) == {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed"}
    defaults = SamplingParams()
    for name, limit in LIMITS.items():
        assert getattr(defaults, name) == limit.default
        assert limit.help


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("top_k", "40", 40),
        ("min_p", "0.05", 0.05),
        ("repetition_penalty", "1.1", 1.1),
        ("seed", "7", 7),
        ("seed", "", None),
    ],
)
def test_parse_reads_a_typed_value(name, text, value):
    assert parse(name, text) == value


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("top_k", "2.5", "top_k must be a whole number, got '2.5'"),
        ("top_k", "-1", "top_k must be a whole number >= 0 and <= 1000, got -1"),
        ("min_p", "1.5", "min_p must be >= 0 and <= 1, got 1.5"),
        ("repetition_penalty", "0", "repetition_penalty must be > 0 and <= 3, got 0.0"),
        ("seed", "-3", "seed must be a whole number >= 0"),
        ("seed", "x", "seed must be a whole number, got 'x'"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
    ],
)
def test_a_value_out_of_bounds_is_one_line_naming_the_rule(name, text, error):
    with pytest.raises(ValueError, match="^" + error.replace("(", r"\(").replace(".", r"\.")):
        parse(name, text)
    assert "\n" not in error


def test_each_value_comes_from_the_most_specific_layer_that_sets_it():
    chat = {"temperature": 0.3, "top_k": None}
    persona = {"top_k": 20, "min_p": 0.1}
    model = {"top_k": 64, "top_p": 0.95, "repetition_penalty": 1.05}
    config = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 100}
    params, sources = resolve_with_sources([("chat", chat), ("persona", persona), ("model", model), ("config", config)])
    assert (params.temperature, params.top_k, params.min_p, params.top_p) == (0.3, 20, 0.1, 0.95)
    assert (params.repetition_penalty, params.max_new_tokens, params.seed) == (1.05, 100, None)
    assert sources == {
        "temperature": "chat",
        "top_k": "persona",
        "min_p": "persona",
        "top_p": "model",
        "repetition_penalty": "model",
        "max_new_tokens": "config",
        "seed": "default",
    }
    assert resolve(chat, persona) == resolve_with_sources([("a", chat), ("b", persona)])[0]


def test_top_k_keeps_the_k_likeliest():
    probs = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=2, seed=1)).distribution(LOGITS)[0]
    assert set(torch.nonzero(probs).flatten().tolist()) == {1, 3}
    assert probs.sum().item() == pytest.approx(1.0)
    top1 = Sampler(SamplingParams(temperature=1.0, top_p=1.0, top_k=1, seed=2))
    assert {top1(LOGITS) for _ in range(20)} == {1}


def test_min_p_drops_tokens_far_below_the_likeliest():
    full = torch.softmax(LOGITS, dim=-1)[0]
    probs = Sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.2, seed=1)).distribution(LOGITS)[0]
    kept = {i for i in range(5) if full[i] >= 0.2 * full.max()}
    assert set(torch.nonzero(probs).flatten().tolist()) == kept == {1, 3}


def test_a_repetition_penalty_turns_greedy_away_from_a_token_already_said():
    history = [1, 4]
    plain = Sampler(SamplingParams(temperature=0.0), history=history)
    penalised = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5), history=history)
    assert plain(LOGITS) == 1
    # 3.0 / 1.5 = 2.0 falls below token 3's 2.9.
    assert penalised(LOGITS) == 3
    history.append(3)  # the caller's list grows as tokens are fed: the penalty sees it, 2.9 / 1.5 < 2.0
    assert penalised(LOGITS) == 1


def test_a_seeded_sampled_reply_is_reproducible(tiny_fp32):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, min_p=0.02, repetition_penalty=1.2, seed=11)
    ask = [Message("user", "Tell me a story.")]

    def reply(p):
        return run(ChatSession(tiny_fp32).reply_to(ask, p)).tokens

    first = reply(params)
    assert reply(params) == first
    assert len(first) > 1
    others = {tuple(reply(SamplingParams(**{**params.__dict__, "seed": seed}))) for seed in (12, 13, 14)}
    assert others != {tuple(first)}


def test_a_penalised_greedy_reply_matches_transformers_generate_over_the_whole_chat(tiny_fp32):
    """Across turns, the cached reply applies the penalty over the same ids model.generate would see."""
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=16)
    session = ChatSession(tiny_fp32)
    messages = []
    for question in ("Hello there, who are you?", "And what do you like?"):
        messages.append(Message("user", question))
        turn = run(session.reply_to(messages, params))
        ids = render_ids(tiny_fp32.tokenizer, messages)
        with torch.inference_mode():
            out = tiny_fp32.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                repetition_penalty=1.3,
                max_new_tokens=16,
                eos_token_id=list(tiny_fp32.stop_token_ids),
                pad_token_id=0,
            )
        assert turn.tokens == out[0, len(ids) :].tolist()
        assert turn.stats.drafted_tokens == 0  # penalised replies decode plainly
        messages = list(session.messages)


def test_the_models_defaults_come_from_generation_config_with_the_catalogs_over_them():
    qwen3 = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "bos_token_id": 1}
    assert model_defaults(qwen3) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    catalog = {"temperature": 0.7, "min_p": 0.05}
    assert model_defaults(qwen3, catalog) == {"temperature": 0.7, "top_k": 20, "top_p": 0.95, "min_p": 0.05}
    # do_sample false is greedy in model.generate; a value outside our bounds falls back to ours.
    assert model_defaults({"do_sample": False, "top_p": 1.5}) == {"temperature": 0.0}
    assert model_defaults({"do_sample": False, "temperature": 0.3}) == {"temperature": 0.3}
    assert model_defaults({}) == {}


def test_a_loaded_models_defaults_read_its_generation_config(tiny_fp32):
    generation = tiny_fp32.model.generation_config
    saved = (generation.do_sample, generation.temperature, generation.top_k)
    try:
        generation.do_sample, generation.temperature, generation.top_k = True, 0.6, 20
        assert tiny_fp32.sampling_defaults() == {"temperature": 0.6, "top_k": 20}
    finally:
        generation.do_sample, generation.temperature, generation.top_k = saved
