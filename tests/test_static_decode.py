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


def _chat_through(chat: Chat) -> list:
    turns = [chat.send(q, max_new_tokens=14) for q in QUESTIONS[:3]]
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


# -- one step ahead (generate.stream_ahead): GPU-only by default, run here by asking for it -------------------------


def _spy_ahead(monkeypatch) -> list:
    from chatapp.engine import session as session_module

    calls = []

    def spied(*args):
        calls.append(1)
        return session_module_stream_ahead(*args)

    session_module_stream_ahead = session_module.stream_ahead
    monkeypatch.setattr(session_module, "stream_ahead", spied)
    return calls


def _same_cache(a: ChatSession, b: ChatSession) -> None:
    import torch

    assert a.cache_ids == b.cache_ids and -1 not in a.cache_ids
    n = a.cache_tokens
    assert int(a._cache.get_seq_length()) == int(b._cache.get_seq_length()) == n
    for x, y in zip(a._cache.layers, b._cache.layers, strict=True):
        assert torch.equal(x.keys[..., :n, :], y.keys[..., :n, :])
        assert torch.equal(x.values[..., :n, :], y.values[..., :n, :])


def test_one_step_ahead_gives_the_plain_loops_tokens_prefill_counts_and_cache(full_family, monkeypatch):
    monkeypatch.setattr(static_decode, "BUCKET", 32)  # bucket moves while a step is ahead
    calls = _spy_ahead(monkeypatch)
    plain = Chat(full_family, decode="static", speculative="off", ahead=False)
    plain_turns = _chat_through(plain)
    assert not calls
    ahead = Chat(full_family, decode="static", speculative="off", ahead=True)
    assert _chat_through(ahead) == plain_turns
    assert len(calls) == 6  # every turn of the chat
    _same_cache(ahead.session, plain.session)


@pytest.mark.parametrize("end", ["stop token", "one token", "cancel", "caller stops reading", "sampled"])
def test_however_a_reply_ends_one_step_ahead_leaves_the_cache_as_the_plain_loop_does(end, tiny_fp32, monkeypatch):
    import threading
    from dataclasses import replace

    from chathelpers import greedy

    from chatapp.engine.session import Message

    calls = _spy_ahead(monkeypatch)
    ask = [Message("user", QUESTIONS[0])]
    first = ChatSession(tiny_fp32, decode="static", speculative="off", ahead=False)
    tokens = [r.token for r in first.reply_to(ask, greedy(max_new_tokens=12)) if r.token is not None]
    loaded = replace(tiny_fp32, stop_token_ids=frozenset({tokens[4]})) if end == "stop token" else tiny_fp32
    params = greedy(max_new_tokens=1 if end == "one token" else 12)
    if end == "sampled":
        params = replace(params, temperature=0.8, seed=3)

    def reply(ahead: bool) -> tuple[ChatSession, list]:
        session = ChatSession(loaded, decode="static", speculative="off", ahead=ahead)
        cancel = threading.Event()
        stream = session.reply_to(ask, params, cancel)
        got = []
        for response in stream:
            got.append((response.token, response.finish_reason))
            if len(got) == 3 and end == "cancel":
                cancel.set()
            if len(got) == 3 and end == "caller stops reading":
                stream.close()
                break
        return session, got

    plain, plain_got = reply(False)
    ahead, ahead_got = reply(True)
    assert ahead_got == plain_got
    _same_cache(ahead, plain)
    assert len(calls) == (0 if end == "sampled" else 1)  # greedy only
    # And the next turn on each goes on alike.
    follow = [*ahead.messages, Message("user", QUESTIONS[2])]
    assert [r.token for r in ahead.reply_to(follow, greedy(max_new_tokens=6))] == [
        r.token for r in plain.reply_to(follow, greedy(max_new_tokens=6))
    ]


def test_one_step_ahead_is_for_greedy_replies_on_a_gpus_static_path(tiny_fp32):
    assert ChatSession(tiny_fp32, decode="static").ahead is False  # a CPU: it would only cost a step
    assert ChatSession(tiny_fp32, decode="static", ahead=True).ahead is True
    assert ChatSession(tiny_fp32, decode="dynamic", ahead=True).ahead is False  # a dynamic cache
