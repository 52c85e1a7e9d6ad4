"""The static-cache decode path (CUDA's, with a compiled step there), run eagerly here on the CPU.

It must keep the cache contract of the dynamic path: the same greedy tokens and the same prefill counts,
through rollbacks (regenerate, edit), speculative drafts, bucket growths, snapshots and branches.
"""

from __future__ import annotations

import pytest
from chathelpers import Chat
from modelhelpers import build_family_model

from chatapp.engine import kvcache, static_decode
from chatapp.engine.session import ChatSession

FULL = ["llama", "phi3", "qwen2", "qwen3"]
SLIDING = ["gemma2", "gemma3", "mistral"]
QUESTIONS = [
    "Tell me about the bridge, and then some more about the town around it, please.",
    "And the mill pond? Repeat: the mill pond, the mill pond.",
    "What of the floods, then?",
    "One more: the library.",
]


@pytest.fixture(scope="module", params=FULL)
def full_family(request, starter_folder, tmp_path_factory, settings):
    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path_factory.mktemp(request.param), request.param, words_only=True)
    return load_model(str(folder), "fp32", settings=settings)


def _chat_through(chat: Chat, turns: list | None = None) -> list:
    """Six turns (three sent, a regenerate, an edit, one more), each as what the plain loop must match; `turns`
    gets the turns themselves."""
    turns = [] if turns is None else turns
    turns += [chat.send(q, max_new_tokens=14) for q in QUESTIONS[:3]]
    turns.append(chat.regenerate(max_new_tokens=14))
    turns.append(chat.edit(len(chat.history) - 2, QUESTIONS[3], max_new_tokens=14))
    turns.append(chat.send(QUESTIONS[0], max_new_tokens=14))
    return [(t.tokens, t.stats.prefilled_tokens, t.stats.cache_tokens, t.stats.cache_note) for t in turns]


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_the_static_path_gives_the_dynamic_paths_tokens_and_prefill_counts(full_family, speculative, monkeypatch):
    monkeypatch.setattr(static_decode, "BUCKET", 32)  # a few bucket growths within the chat
    dynamic = Chat(full_family, decode="dynamic", speculative=speculative)
    static = Chat(full_family, decode="static", speculative=speculative)
    assert _chat_through(static) == _chat_through(dynamic)
    assert static_decode.is_static(static.session._cache)
    assert not static_decode.is_static(dynamic.session._cache)
    assert static_decode.room(static.session._cache) > 32
    assert static.session._cache.get_seq_length() == static.session.cache_tokens


def test_a_static_cache_takes_whole_buckets(tiny_fp32, monkeypatch):
    monkeypatch.setattr(static_decode, "BUCKET", 64)
    chat = Chat(tiny_fp32, decode="static")
    chat.send(QUESTIONS[0], max_new_tokens=4)
    cache = chat.session._cache
    assert static_decode.room(cache) == 64 and chat.session.cache_tokens < 64
    layer = cache.layers[0]
    assert kvcache.nbytes(cache) == len(cache.layers) * (layer.keys.nbytes + layer.values.nbytes)
    assert layer.keys.shape[-2] == 64


def test_a_static_chat_snapshot_restores_and_a_branch_goes_on_alike(tiny_fp32):
    chat = Chat(tiny_fp32, decode="static")
    chat.send(QUESTIONS[0], max_new_tokens=10)
    ids, named, seen = chat.session.export()
    assert seen == [len(ids)] * len(seen) and named["k.0"].shape[-2] == len(ids)

    twin = chat.session.copy()
    assert twin.static
    restored = ChatSession(tiny_fp32, decode="static")
    restored.adopt(kvcache.from_tensors(tiny_fp32.model.config, named, seen, "cpu"), ids, 0.0)
    reference = ChatSession(tiny_fp32, decode="dynamic")
    history = [*chat.history]
    from chathelpers import greedy, run

    from chatapp.engine.session import Message

    ask = [*history, Message("user", QUESTIONS[2])]
    outs = [run(s.reply_to(ask, greedy(max_new_tokens=10))) for s in (chat.session, twin, restored, reference)]
    assert len({tuple(o.tokens) for o in outs}) == 1
    assert [o.stats.prefilled_tokens for o in outs[:3]] == [outs[0].stats.prefilled_tokens] * 3
    assert outs[3].stats.prefilled_tokens == outs[3].stats.prompt_tokens  # the reference started cold
    assert static_decode.is_static(restored._cache)


@pytest.mark.parametrize("family", SLIDING)
def test_a_sliding_window_model_is_refused_the_static_path_in_one_line(family, starter_folder, tmp_path, settings):
    from chatapp.engine import load_model

    loaded = load_model(str(build_family_model(starter_folder, tmp_path, family)), "fp32", settings=settings)
    why = static_decode.unsupported(loaded.model)
    assert why and "sliding-window layers" in why and "\n" not in why
    with pytest.raises(ValueError, match="no static decode path: .* has sliding-window layers"):
        ChatSession(loaded, decode="static")
    assert ChatSession(loaded).static is False  # auto: the dynamic cache, as on every CPU


def test_the_loader_keeps_the_static_path_for_one_whole_cuda_device(tiny_fp32):
    model = tiny_fp32.model
    assert tiny_fp32.decode_path == "dynamic"
    assert "one CUDA GPU" in static_decode.why_not(model, "cpu")
    assert "one CUDA GPU" in static_decode.why_not(model, "cpu+cuda")
    assert "decode eagerly" in static_decode.why_not(model, "cuda", quantized=True)
    assert static_decode.why_not(model, "cuda") is None


def test_an_unknown_decode_option_is_refused_in_one_line(tiny_fp32):
    with pytest.raises(ValueError, match="decode must be one of auto, dynamic, static, got 'fast'"):
        ChatSession(tiny_fp32, decode="fast")


def test_a_step_that_fails_to_compile_decodes_eagerly_with_the_same_tokens(full_family):
    """Where torch.compile can't build the step (Triton without a C compiler, say), the reply still comes, the
    same as the dynamic path's, and the model decodes eagerly from then on."""
    import torch

    calls = []

    class FailsToCompile:
        """What compiled_step makes on CUDA (the model, compiled on its first call), failing as such a box would."""

        device = full_family.model.device

        def __call__(self, *args, **kwargs):
            calls.append(1)
            raise torch._inductor.exc.InductorError(RuntimeError("Failed to find C compiler"), None)

    dynamic = Chat(full_family, decode="dynamic")
    full_family.compiled_step = FailsToCompile()
    try:
        static = Chat(full_family, decode="static")
        assert _chat_through(static) == _chat_through(dynamic)
        assert calls == [1] and full_family.compiled_step is full_family.model
        assert "decode: the compiled step failed (RuntimeError: Failed to find C compiler)" in full_family.reasons[-1]
        assert "so it runs eagerly on the static cache" in full_family.reasons[-1]
    finally:
        full_family.compiled_step = None
        full_family.reasons[:] = [r for r in full_family.reasons if "compiled step failed" not in r]


# -- one step ahead (speculate.stream_ahead): GPU-only by default, run here by asking for it ----------------------


def _spy_ahead(monkeypatch) -> list:
    """Each call of speculate.stream_ahead: whether it was given a drafter."""
    from chatapp.engine import speculate

    calls = []
    real = speculate.stream_ahead

    def spied(*args, **kwargs):
        calls.append(args[-1] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(speculate, "stream_ahead", spied)
    return calls


def _same_cache(a: ChatSession, b: ChatSession, exact: bool = True) -> None:
    """The same ids and the same K/V; bit for bit unless a side verified drafts, whose wider forwards may round
    differently."""
    import torch

    assert a.cache_ids == b.cache_ids and -1 not in a.cache_ids
    n = a.cache_tokens
    assert int(a._cache.get_seq_length()) == int(b._cache.get_seq_length()) == n
    same = torch.equal if exact else lambda x, y: torch.allclose(x, y, atol=1e-5)
    for x, y in zip(a._cache.layers, b._cache.layers, strict=True):
        assert same(x.keys[..., :n, :], y.keys[..., :n, :])
        assert same(x.values[..., :n, :], y.values[..., :n, :])


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_one_step_ahead_gives_the_plain_loops_tokens_prefill_counts_and_cache(full_family, speculative, monkeypatch):
    monkeypatch.setattr(static_decode, "BUCKET", 32)  # bucket moves while a step is ahead
    calls = _spy_ahead(monkeypatch)
    plain = Chat(full_family, decode="static", speculative="off", ahead=False)
    plain_turns = _chat_through(plain)
    assert not calls
    ahead = Chat(full_family, decode="static", speculative=speculative, ahead=True)
    turns: list = []
    assert _chat_through(ahead, turns) == plain_turns
    assert calls == [speculative == "ngram"] * 6  # every turn of the chat
    _same_cache(ahead.session, plain.session, exact=speculative == "off")
    tally = [(t.stats.drafted_tokens, t.stats.accepted_tokens) for t in turns]
    if speculative == "off":
        assert tally == [(0, 0)] * 6
    else:  # the same drafts at the same tokens as the loop that reads every token back
        read_back: list = []
        _chat_through(Chat(full_family, decode="static", speculative=speculative, ahead=False), read_back)
        assert tally == [(t.stats.drafted_tokens, t.stats.accepted_tokens) for t in read_back]
        assert sum(accepted for _, accepted in tally) > 0


@pytest.mark.parametrize("speculative", ["off", "ngram"])
@pytest.mark.parametrize("end", ["stop token", "one token", "length", "cancel", "caller stops reading", "sampled"])
def test_however_a_reply_ends_one_step_ahead_leaves_the_cache_as_the_plain_loop_does(
    end, speculative, tiny_words_fp32, monkeypatch
):
    """This tiny model soon repeats one token, so with ngram most of the reply comes from accepted drafts, and the
    length, cancel and close endings fall inside a verified run."""
    import threading
    from dataclasses import replace

    from chathelpers import greedy

    from chatapp.engine.session import Message

    calls = _spy_ahead(monkeypatch)
    ask = [Message("user", QUESTIONS[0])]
    first = ChatSession(tiny_words_fp32, decode="static", speculative="off", ahead=False)
    tokens = [r.token for r in first.reply_to(ask, greedy(max_new_tokens=16)) if r.token is not None]
    stop_at = {tokens[4]} if end == "stop token" else set()
    loaded = replace(tiny_words_fp32, stop_token_ids=frozenset(stop_at | tiny_words_fp32.stop_token_ids))
    params = greedy(max_new_tokens={"one token": 1, "length": 11}.get(end, 16))
    if end == "sampled":
        params = replace(params, temperature=0.8, seed=3)

    def reply(options: dict) -> tuple[ChatSession, list, int]:
        session = ChatSession(loaded, decode="static", **options)
        cancel = threading.Event()
        stream = session.reply_to(ask, params, cancel)
        got = []
        for response in stream:
            got.append((response.token, response.finish_reason))
            if len(got) == 10 and end == "cancel":
                cancel.set()
            if len(got) == 10 and end == "caller stops reading":
                stream.close()
                break
        return session, got, (response.stats.accepted_tokens if response.stats else None)

    # A sampled reply with drafts draws differently from one without (the same distribution, other draws).
    plain, plain_got, _ = reply({"speculative": speculative if end == "sampled" else "off", "ahead": False})
    ahead, ahead_got, accepted = reply({"speculative": speculative, "ahead": True})
    assert ahead_got == plain_got
    _same_cache(ahead, plain, exact=speculative == "off")
    assert calls == ([] if end == "sampled" else [speculative == "ngram"])  # greedy only
    if speculative == "ngram" and end in ("length", "cancel"):
        assert accepted > 4
    # And the next turn on each goes on alike.
    follow = [*ahead.messages, Message("user", QUESTIONS[2])]
    assert [r.token for r in ahead.reply_to(follow, greedy(max_new_tokens=6))] == [
        r.token for r in plain.reply_to(follow, greedy(max_new_tokens=6))
    ]


def test_one_step_ahead_is_for_greedy_replies_on_a_gpus_static_path(tiny_fp32):
    assert ChatSession(tiny_fp32, decode="static").ahead is False  # a CPU: it would only cost a step
    assert ChatSession(tiny_fp32, decode="static", ahead=True).ahead is True
    assert ChatSession(tiny_fp32, decode="dynamic", ahead=True).ahead is False  # a dynamic cache


# -- the compiled step: dynamo's graphs and guards, with the "eager" backend on the CPU --------------------------


def _nine_buckets(loaded, compiled: bool, turns: int = 8) -> list:
    """A chat with drafts through nine buckets of 16 tokens (with all 8 turns), its step compiled or not: each
    reply's tokens."""
    import torch
    from chathelpers import greedy
    from torch._dynamo.utils import counters

    from chatapp.engine.session import Message

    torch._dynamo.reset()
    counters.clear()
    loaded.compiled_step = static_decode.compile_model(loaded.model, backend="eager") if compiled else None
    session = ChatSession(loaded, decode="static", speculative="ngram", ahead=compiled)
    messages, replies = [], []
    try:
        for question in (QUESTIONS * 2)[:turns]:
            messages.append(Message("user", question))
            replies.append([r.token for r in session.reply_to(messages, greedy(max_new_tokens=12))])
            messages = list(session.messages)
    finally:
        loaded.compiled_step = None
    assert static_decode.room(session._cache) >= 9 * 16 or turns < 8
    return replies


def test_a_chat_through_many_buckets_keeps_its_compiled_step(tiny_words_fp32, monkeypatch):
    """Two graphs a bucket (a token, a padded verify): dynamo's default limit of 8 made the step of a chat past
    four buckets raise FailOnRecompileLimitHit. Nine buckets here, with drafts, and the same tokens as eager."""
    import torch
    from torch._dynamo.utils import counters

    monkeypatch.setattr(static_decode, "BUCKET", 16)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    eager = _nine_buckets(tiny_words_fp32, False)
    reasons = list(tiny_words_fp32.reasons)
    assert _nine_buckets(tiny_words_fp32, True) == eager
    assert counters["stats"]["unique_graphs"] > 16
    assert tiny_words_fp32.reasons == reasons  # no "the compiled step failed"


def test_a_chat_past_the_recompile_limit_decodes_eagerly_in_one_line(tiny_words_fp32, monkeypatch):
    import torch

    monkeypatch.setattr(static_decode, "BUCKET", 16)
    monkeypatch.setattr(static_decode, "RECOMPILE_LIMIT", 4)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 4)
    monkeypatch.setattr(tiny_words_fp32, "reasons", list(tiny_words_fp32.reasons))
    eager = _nine_buckets(tiny_words_fp32, False)
    assert _nine_buckets(tiny_words_fp32, True) == eager
    assert tiny_words_fp32.reasons[-1] == (
        "decode: the compiled step failed (the chat outgrew its 4 graphs, two per 16 tokens), so it runs eagerly on the"
        " static cache"
    )


def test_compiled_decode_steps_with_packed_heads_give_the_eager_tokens(tiny_fp32, monkeypatch):
    """On CUDA the compiled step packs grouped heads under the step's mask (cpu_attention.PACKED_UNDER_MASK), where
    transformers would copy the cache to every query head. Here on the CPU, through dynamo's graphs."""
    from chatapp.engine import cpu_attention

    monkeypatch.setattr(static_decode, "BUCKET", 16)
    eager = _nine_buckets(tiny_fp32, False, turns=3)
    packed = []
    real = cpu_attention._packed
    monkeypatch.setattr(cpu_attention, "_packed", lambda *args: packed.append(1) or real(*args))
    monkeypatch.setattr(cpu_attention, "PACKED_UNDER_MASK", ("cuda", "cpu"))
    assert _nine_buckets(tiny_fp32, True, turns=3) == eager
    assert packed  # traced into the graphs


def test_a_verify_on_the_static_path_is_padded_to_one_width(tiny_fp32, monkeypatch):
    """Whatever the draft's length, the compiled verify sees VERIFY_WIDTH tokens; the padding leaves the cache at
    once, and the real rows are the unpadded forward's."""
    import torch

    from chatapp.engine.generate import forward, prefill

    widths = []
    real_forward = static_decode.forward

    def spied(model, cache, ids, rows=1):
        widths.append((len(ids), rows))
        return real_forward(model, cache, ids, rows)

    monkeypatch.setattr(static_decode, "forward", spied)
    model = tiny_fp32.model
    prompt = list(range(5, 40))
    for draft in ([7], [7, 8, 9], list(range(7, 7 + static_decode.VERIFY_WIDTH))):
        padded, plain = (static_decode.new_cache(model.config, 64) for _ in range(2))
        with torch.inference_mode():
            prefill(model, padded, prompt)
            prefill(model, plain, prompt)
            got = static_decode.rows(tiny_fp32, padded, draft)
            want = forward(model, plain, draft, rows=len(draft))
        assert widths[-1] == (static_decode.VERIFY_WIDTH, static_decode.VERIFY_WIDTH)
        assert got.shape == want.shape == (len(draft), want.shape[-1])
        assert torch.allclose(got, want, atol=1e-5)
        assert int(padded.get_seq_length()) == len(prompt) + len(draft)


class ReusesItsOutput:
    """A compiled step as CUDA graphs run it: every call's logits land in one buffer, which the next call (of either
    graph) overwrites."""

    def __init__(self, model):
        self.model, self.device = model, model.device
        self.buffer = None

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        n = out.logits.numel()
        if self.buffer is None:  # room for any call's logits: a step's or a verify's
            self.buffer = out.logits.new_empty(n * 2 * static_decode.VERIFY_WIDTH)
        out.logits = self.buffer[:n].view_as(out.logits).copy_(out.logits)
        return out


def test_drafts_one_step_ahead_hold_nothing_a_graphs_next_replay_overwrites(full_family, monkeypatch):
    """The first GPU run of drafts one step ahead parted from a re-encode in fp32 only: the step's logits, held while
    the verify ran, were the graph's own output, and fp32's .float() is no copy."""
    monkeypatch.setattr(static_decode, "BUCKET", 32)
    plain = _chat_through(Chat(full_family, decode="static", speculative="off"))
    full_family.compiled_step = ReusesItsOutput(full_family.model)
    turns: list = []
    try:
        assert _chat_through(Chat(full_family, decode="static", speculative="ngram", ahead=True), turns) == plain
    finally:
        full_family.compiled_step = None
    assert sum(t.stats.drafted_tokens for t in turns) > 0
