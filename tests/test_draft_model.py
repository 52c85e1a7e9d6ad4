"""Speculative decoding with a draft model: the acceptance rule with the draft's q, and turns that must be
the turns without drafts (greedy: the same tokens, the same cache, the same next prefill) however the draft
guesses and however the reply ends."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from chathelpers import drafted_and_plain, run
from modelhelpers import build_chain_model, build_family_model

from chatapp.engine.generate import Sampler
from chatapp.engine.session import ChatSession, Message, common_prefix_len, render_ids
from chatapp.engine.speculate import verify
from chatapp.errors import ModelLoadError
from chatapp.sampling import SamplingParams

# -- the acceptance rule, with the draft's distribution q ---------------------------------------

ROWS = torch.tensor([[0.0, 3.0, 1.0, -1.0, 2.0], [4.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0, 0.0]])

#: Draft distributions over the same 5 tokens: near p, far from p, one that puts mass where p has none
#: (outside the nucleus at top_p 0.8), and a point mass.
Q = {
    "near": [0.05, 0.55, 0.1, 0.05, 0.25],
    "far": [0.4, 0.05, 0.05, 0.4, 0.1],
    "outside-the-nucleus": [0.1, 0.1, 0.1, 0.6, 0.1],
    "certain": [0.0, 0.0, 1.0, 0.0, 0.0],
}


def _chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token outside the distribution was emitted"
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("q", list(Q.values()), ids=list(Q))
def test_sampled_verify_with_a_draft_distribution_emits_tokens_distributed_as_the_sampler_would(q, top_p):
    """The drafted token is drawn from q, kept with probability min(1, p/q), else replaced from max(0, p - q):
    the emitted token follows p. Treating q as a point mass (accepting with p alone), or redrawing from p, is
    off by far more than the bound."""
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=4))
    p = sampler.distribution(ROWS[:1])[0]
    q = torch.tensor([q])
    draws = 20_000
    drafted = torch.multinomial(q[0], draws, replacement=True, generator=torch.Generator().manual_seed(5))
    counts = torch.zeros(5)
    for token in drafted.tolist():
        counts[verify(ROWS[:2], [token], sampler, q)[0]] += 1
    # 4 degrees of freedom: P(chi2 > 25) is about 5e-5.
    assert _chi_square(counts, p) < 25, (counts / draws, p)


@pytest.mark.parametrize("q", list(Q.values()), ids=list(Q))
def test_sampled_verify_keeps_a_draft_as_often_as_p_and_q_overlap(q):
    """P(accept) = sum over x of min(p(x), q(x)): what passing q buys over treating the draft as certain, which
    keeps it with sum q(x) p(x) only."""
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=8))
    p = sampler.distribution(ROWS[:1])[0]
    q = torch.tensor([q])
    draws = 10_000
    drafted = torch.multinomial(q[0], draws, replacement=True, generator=torch.Generator().manual_seed(9))
    kept = sum(len(verify(ROWS[:2], [token], sampler, q)) == 2 for token in drafted.tolist())
    expected = float(torch.minimum(p, q[0]).sum())
    # Five standard deviations of a binomial share.
    assert abs(kept / draws - expected) < 5 * (expected * (1 - expected) / draws) ** 0.5 + 1e-9, (
        kept / draws,
        expected,
    )


def test_sampled_verify_with_the_models_own_distribution_keeps_every_draft():
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=6))
    q = sampler.distribution(ROWS[:2])
    for _ in range(2_000):
        draft = [int(torch.multinomial(q[i], 1).item()) for i in range(2)]
        assert verify(ROWS, draft, sampler, q)[:2] == draft


# -- models ----------------------------------------------------------------------------------


def _load(folder, settings):
    from chatapp.engine import load_model

    return load_model(str(folder), "fp32", settings=settings)


@pytest.fixture(scope="module")
def other_llama(starter_folder, tmp_path_factory, settings):
    """Random weights of their own over the same tokenizer: a draft that is mostly wrong."""
    folder = build_family_model(starter_folder, tmp_path_factory.mktemp("other"), "llama", words_only=True, seed=99)
    return _load(folder, settings)


@pytest.fixture(scope="module")
def family(starter_folder, tmp_path_factory, settings):
    """family -> a tiny random model of it (words only), built once per module."""
    built = {}

    def get(name):
        if name not in built:
            folder = build_family_model(starter_folder, tmp_path_factory.mktemp(name), name, words_only=True)
            built[name] = _load(folder, settings)
        return built[name]

    return get


#: Llama, and two with sliding-window layers (Gemma 3's alternate with full ones, Mistral's are all sliding).
@pytest.fixture(params=["llama", "gemma3", "mistral"])
def target(request, family):
    return family(request.param)


@pytest.fixture
def llama(family):
    return family("llama")


QUESTIONS = [
    "Tell me about the bridge, and then some more about the town around it, please.",
    "And the floods?",
    "What about the clock in the tower, who repaired it and when?",
    "Thanks. One more: the railway.",
]


def _chat(loaded, mode, draft=None, params=None):
    """Four turns on one session: each turn's (tokens, stats), the cache ids after each.

    With a draft model, its cache must follow the conversation: after a turn it holds the target's ids (the
    last sampled token included) and at most the tail of one draft, no stale tokens from rejected drafts or
    from a reply's end the template rewrote, and exactly as many tokens as its ids say.
    """
    params = params or SamplingParams(temperature=0.0, max_new_tokens=16)
    session = ChatSession(loaded, speculative=mode, draft=draft)
    turns, held = [], []
    for question in QUESTIONS:
        turn = run(session.reply_to([*session.messages, Message("user", question)], params))
        turns.append(turn)
        held.append(list(session.cache_ids))
        if mode == "draft" and turn.stats.drafted_tokens:
            drafter = session._drafter
            target_ids = [*session.cache_ids, turn.tokens[-1]]
            assert common_prefix_len(drafter.cache_ids, target_ids) >= len(drafter.cache_ids) - (drafter.k - 1)
            assert drafter.cache.get_seq_length() == len(drafter.cache_ids)
    return turns, held


@pytest.mark.parametrize("which", ["itself", "another model"])
def test_greedy_replies_with_a_draft_model_are_plain_decodings_tokens(target, other_llama, which):
    draft = target if which == "itself" else other_llama
    turns, held = _chat(target, "draft", draft)
    plain, plain_held = _chat(target, "off")
    assert [t.tokens for t in turns] == [t.tokens for t in plain]
    assert [t.text for t in turns] == [t.text for t in plain]
    assert held == plain_held
    for turn, base in zip(turns, plain, strict=True):
        assert turn.stats.prefilled_tokens == base.stats.prefilled_tokens
        assert turn.stats.finish_reason == base.stats.finish_reason
        assert turn.stats.cache_tokens == base.stats.cache_tokens
    drafted = sum(t.stats.drafted_tokens for t in turns)
    accepted = sum(t.stats.accepted_tokens for t in turns)
    assert drafted > 0
    if which == "itself":
        assert accepted == drafted  # the same weights guess every token
    else:
        assert accepted < drafted / 2  # mostly rejected, and the replies are still the plain ones


def test_a_draft_with_another_vocabulary_size_is_fine_when_the_tokenizer_is_the_same(llama, other_llama):
    """Qwen2.5 0.5B and 7B share a tokenizer but pad their embeddings to different sizes."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_pretrained(other_llama.folder)
    wide.resize_token_embeddings(wide.config.vocab_size + 64)
    with torch.no_grad():
        wide.get_output_embeddings().weight[-64:] = 50.0  # padding rows that would win every argmax if read
    draft = replace(other_llama, model=wide.eval())
    turns, _ = _chat(llama, "draft", draft)
    plain, _ = _chat(llama, "off")
    assert [t.tokens for t in turns] == [t.tokens for t in plain]
    assert sum(t.stats.drafted_tokens for t in turns) > 0


def test_sampled_replies_with_a_draft_model_keep_the_cache_right(target, other_llama):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_new_tokens=16)
    turns, held = _chat(target, "draft", other_llama, params)
    messages: list[Message] = []
    for question, turn, ids in zip(QUESTIONS, turns, held, strict=True):
        messages.append(Message("user", question))
        assert ids == render_ids(target.tokenizer, messages) + turn.tokens[:-1]
        assert turn.stats.cache_tokens == len(ids)
        messages.append(Message("assistant", turn.text))
    assert sum(t.stats.drafted_tokens for t in turns) > 0


# -- how a reply ends, on a model whose replies are known ------------------------------------

WORDS = " river town bridge"
ASK = "Say it back:" + WORDS


@pytest.fixture(scope="module")
def chain_fp32(starter_folder, tmp_path_factory, settings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(starter_folder)
    opening = render_ids(tokenizer, [Message("user", "x")])[-1]
    words = tokenizer(WORDS, add_special_tokens=False)["input_ids"]
    chain = [opening, *words, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return _load(build_chain_model(starter_folder, tmp_path_factory.mktemp("chain"), chain), settings)


def _both(loaded, params, cancel_after=None):
    out = drafted_and_plain(loaded, ASK, params, cancel_after, speculative="draft", draft=loaded)
    (turn, held, after), (plain, plain_held, plain_after) = out
    assert turn.tokens == plain.tokens and turn.text == plain.text
    assert turn.stats.finish_reason == plain.stats.finish_reason
    assert held == plain_held and after.prefilled_tokens == plain_after.prefilled_tokens
    return turn


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_stop_token_inside_a_drafted_run_ends_the_reply_there(chain_fp32, temperature):
    turn = _both(chain_fp32, SamplingParams(temperature=temperature, top_p=1.0, seed=3, max_new_tokens=50))
    assert turn.text == WORDS and turn.stats.finish_reason == "stop" and turn.stats.accepted_tokens >= 3


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4])
def test_max_new_tokens_cuts_a_drafted_run(chain_fp32, max_new_tokens):
    turn = _both(chain_fp32, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    assert len(turn.tokens) == max_new_tokens


@pytest.mark.parametrize("after", [1, 2])
def test_a_cancel_during_a_drafted_run_stops_where_plain_decoding_does(chain_fp32, after):
    turn = _both(chain_fp32, SamplingParams(temperature=0.0, max_new_tokens=50), cancel_after=after)
    assert turn.stats.finish_reason == "cancelled" and len(turn.tokens) == after + 1


def test_a_branch_copies_the_draft_models_cache_too(llama, other_llama):
    session = ChatSession(llama, speculative="draft", draft=other_llama)
    run(session.reply_to([Message("user", QUESTIONS[0])], SamplingParams(temperature=0.0, max_new_tokens=16)))
    twin = session.copy()
    assert twin._drafter.cache_ids == session._drafter.cache_ids and twin._drafter.cache is not session._drafter.cache
    assert twin.cache_bytes() == session.cache_bytes() > 0


# -- which drafts are refused ----------------------------------------------------------------


def _edit_tokenizer(folder, out, change):
    shutil.copytree(folder, out)
    data = json.loads((out / "tokenizer.json").read_text())
    change(data)
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


def _swap_two_ids(data):
    vocab = data["model"]["vocab"]
    vocab["river"], vocab["town"] = vocab["town"], vocab["river"]


def _add_a_token(data):
    top = max(data["model"]["vocab"].values())
    data["added_tokens"].append(
        {"id": top + 1, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (_swap_two_ids, "token 'river' is id"),
        (_add_a_token, "its vocabulary has 49,153 tokens, the model's 49,152"),
    ],
    ids=["same size, other ids", "another size"],
)
def test_a_draft_with_another_tokenizer_is_refused_in_one_line(llama, tmp_path, settings, change, why):
    draft = _load(_edit_tokenizer(llama.folder, tmp_path / "draft", change), settings)
    with pytest.raises(ModelLoadError) as caught:
        ChatSession(llama, speculative="draft", draft=draft)
    message = str(caught.value)
    assert "\n" not in message and "can't draft for" in message and "its tokenizer differs" in message
    assert why in message


def test_draft_mode_without_a_draft_model_is_refused(llama):
    with pytest.raises(ValueError, match="needs a draft model"):
        ChatSession(llama, speculative="draft")


# -- which draft a load brings ---------------------------------------------------------------


def _settings_with_catalog(settings, tmp_path, entry: str):
    from dataclasses import replace

    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_text(f"[models.smollm2-135m-local]\n{entry}\n")
    return replace(settings, config_dir=config)


def test_the_draft_the_catalog_names_loads_beside_the_model_and_drafts_by_default(settings, tmp_path):
    from chatapp.engine import load_model

    own = _settings_with_catalog(settings, tmp_path, 'draft = "smollm2-135m-local"')
    loaded = load_model("smollm2-135m-local", "fp32", settings=own)
    assert loaded.draft is not None and loaded.draft.dtype == "fp32"
    assert "drafting with smollm2-135m-local (fp32) for speculative decoding" in loaded.notes
    session = ChatSession(loaded)
    assert session.speculative == "draft"
    turn = run(session.reply_to([Message("user", "Name three colours.")], SamplingParams(max_new_tokens=12)))
    assert turn.stats.drafted_tokens > 0 and turn.stats.accepted_tokens == turn.stats.drafted_tokens
    # The worker's budget for live caches counts each chat's draft cache too, in whole chats.
    from chatapp.engine.worker import _cache_budgets
    from chatapp.facts import facts_from_config
    from chatapp.planner import LIVE_CONTEXTS, kv_cache_bytes

    facts = facts_from_config("x", loaded.model.config.to_dict(), params=0)
    per_chat = 2 * kv_cache_bytes(facts, loaded.context_length, "fp32")
    live, _parked = _cache_budgets(loaded)
    # Test machines have far more RAM than 4 chats of a 135M model need, so the budget is the 4 chats' caches.
    assert live == LIVE_CONTEXTS * per_chat
    assert load_model("smollm2-135m-local", "fp32", settings=own, draft="none").draft is None


def test_a_draft_the_catalog_names_is_not_downloaded_for_the_user(settings, tmp_path):
    """The Hub is out of reach here (HF_HUB_OFFLINE) and the cache is empty: the model loads, drafting by
    prompt lookup, and a note says how to get the draft."""
    from chatapp.engine import load_model

    own = _settings_with_catalog(settings, tmp_path, 'draft = "smollm2-135m"')
    loaded = load_model("smollm2-135m-local", "fp32", settings=own)
    assert loaded.draft is None and ChatSession(loaded).speculative == "ngram"
    assert "no draft: smollm2-135m isn't downloaded (`chatapp pull smollm2-135m` lets it draft, faster replies)" in (
        loaded.notes
    )


@pytest.mark.parametrize("command", ["ask", "repl"])
def test_ask_and_repl_take_a_draft_model(tiny_words_folder, command):
    import subprocess
    import sys

    model = str(tiny_words_folder)
    args = [sys.executable, "-m", "chatapp.cli", command, "--model", model, "--preset", "fp32", "--stats"]
    args += ["--max-new-tokens", "8", "--draft", model]
    if command == "ask":
        args.append("Hello there")
    out = subprocess.run(args, input="Hello there\n/exit\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"drafting with {model} (fp32) for speculative decoding" in out.stderr
    stats = next(line for line in out.stderr.splitlines() if "prefilled" in line)
    drafted = int(stats.split("drafted ")[1].split(",")[0])
    assert drafted > 0 and stats.endswith(f"accepted {drafted}")
