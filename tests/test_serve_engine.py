"""`chatapp serve` beyond the happy path: the queue as /health counts it, arrival order, an engine that fails,
a reply over a trimmed history, the unknown model's code, and cache reuse as a share of the prompt.

Its own server and Engine (the model fixture is shared), so a test that breaks the engine on purpose can't
leave test_serve.py's slots in a state those tests don't expect.
"""

from __future__ import annotations

import json
import threading
import time

import httpx2 as httpx
import openai
import pytest
from servehelpers import TALK, ask, user

from chatapp.server.openai_schema import ChatRequest


def queue(url) -> int:
    return httpx.get(f"{url}/health", timeout=30).json()["queue"]


def wait_for(predicate, what: str) -> None:
    """Poll until predicate() holds; the deadline only keeps a broken build from hanging the suite."""
    deadline = time.monotonic() + 120
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_health_counts_the_waiting_and_the_running_and_replies_go_in_order(url, client, engine):
    started, release = threading.Event(), threading.Event()
    events: list[tuple[str, str]] = []

    def held(kind, value):  # runs on the engine thread: holding it holds every request behind this one
        events.append(("held", kind))
        started.set()
        release.wait(timeout=120)

    def later(kind, value):
        events.append(("later", kind))

    request = ChatRequest(engine.name, [("user", TALK)], {"temperature": 0.0, "max_new_tokens": 2})
    first = engine.submit(request, held)
    second = engine.submit(request, later)
    assert started.wait(timeout=120)
    assert queue(url) == 2
    over_http = {}
    thread = threading.Thread(target=lambda: over_http.update(reply=ask(client, engine, [user("hi")], max_tokens=2)))
    thread.start()
    try:
        wait_for(lambda: queue(url) == 3, "the HTTP request was not counted as waiting")
    finally:
        release.set()
    thread.join(timeout=120)
    assert first.done.wait(timeout=120) and second.done.wait(timeout=120)
    assert over_http["reply"].usage.completion_tokens <= 2
    assert queue(url) == 0
    # Arrival order: everything of the first job came before anything of the second.
    owners = [owner for owner, _ in events]
    assert owners == sorted(owners, key=["held", "later"].index) and owners[-1] == "later"
    assert ("held", "done") in events and ("later", "done") in events


def test_an_engine_failure_is_a_one_line_500_and_the_server_goes_on(url, client, engine, monkeypatch):
    from chatapp.engine.session import ChatSession

    def broken(self, messages, *args, **kwargs):
        raise RuntimeError("the engine broke\n  at some internal frame")

    def breaks_mid_reply(self, messages, *args, **kwargs):
        from chatapp.engine.generate import GenerationResponse

        yield GenerationResponse("Some")
        raise RuntimeError("the engine broke mid-reply")

    body = {"model": engine.name, "messages": [user("hi")], "max_tokens": 4, "temperature": 0}
    monkeypatch.setattr(ChatSession, "reply_to", broken)
    for stream in (False, True):
        response = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream}, timeout=120)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["message"] == "RuntimeError: the engine broke" and error["type"] == "server_error"
        assert "Traceback" not in response.text and "internal frame" not in response.text

    # Once the stream's headers are out, the error can only travel as an event, and the stream ends there.
    monkeypatch.setattr(ChatSession, "reply_to", breaks_mid_reply)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        data = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == {
        "error": {"message": "RuntimeError: the engine broke mid-reply", "type": "server_error", "param": None,
                  "code": None}
    }  # fmt: skip
    assert [d["choices"][0]["delta"].get("content") for d in data[:-1]] == ["", "Some"]

    monkeypatch.undo()
    assert queue(url) == 0
    assert ask(client, engine, [user("hi")], max_tokens=2).usage.completion_tokens <= 2


def test_an_empty_reply_is_answered_streamed_or_not(client, engine):
    """A stop string that matches the reply's first characters leaves no text, so no delta ever comes."""
    full = ask(client, engine, [user(TALK)]).choices[0].message.content
    empty = ask(client, engine, [user(TALK)], stop=[full[:2]], timeout=60)
    assert empty.choices[0].message.content == "" and empty.choices[0].finish_reason == "stop"
    chunks = list(ask(client, engine, [user(TALK)], stop=[full[:2]], stream=True, timeout=60))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_an_unknown_model_is_404_model_not_found(url, client):
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "gpt-4o", "messages": [user("hi")]}, timeout=30)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'gpt-4o'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[user("hi")])


def test_a_reply_over_a_trimmed_history_that_runs_out_says_length(client, engine, tiny_words_fp32):
    """The engine's overflow-trimmed is not an OpenAI reason: a client reads "length" to know to ask for more."""
    from chatapp.engine.session import Message, render_ids

    tokenizer = tiny_words_fp32.tokenizer
    filler = " ".join(["river"] * (engine.context_length // 3))
    history = []
    for i in range(3):
        history += [user(f"Part {i}: {filler}"), {"role": "assistant", "content": f"Noted {i}: {filler}"}]
    messages = [*history, user(TALK)]
    whole = render_ids(tokenizer, [Message(m["role"], m["content"]) for m in messages])
    assert len(whole) > engine.context_length  # only a trimmed history fits
    reply = ask(client, engine, messages, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert reply.usage.prompt_tokens + 3 <= engine.context_length
    assert engine.last.dropped_messages >= 2


def test_from_turn_two_the_cache_holds_nine_tenths_of_each_prompt(client, engine):
    """With a system prompt of a usual size; the share only says how small each new message is next to the
    conversation, the bound that the whole previous conversation is reused is the exact one."""
    messages = [{"role": "system", "content": "You answer in plain words, briefly and kindly. " * 25}]
    before = None
    for turn in range(6):
        messages.append(user(f"Turn {turn}: say more about the words"))
        reply = ask(client, engine, messages, max_tokens=12)
        usage = reply.usage
        if before is not None:
            cached = usage.prompt_tokens_details.cached_tokens
            assert cached >= 0.9 * usage.prompt_tokens, (turn, usage)
            assert cached >= before.prompt_tokens + before.completion_tokens - 1, (turn, usage, before)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        before = usage
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": [user("\ud800 hi")]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, "messages[0].content"),
        ({"messages": [user("hi")], "stop": ["\ud800"]}, "stop"),
    ],
)
def test_a_lone_surrogate_is_the_client_s_400_not_a_tokenizer_crash(url, engine, fields, param):
    # json.dumps writes the lone surrogate as the escape \ud800, which JSON parsers accept.
    body = json.dumps({"model": engine.name, **fields}).encode()  # ascii: the surrogate as its escape
    response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "not valid Unicode" in error["message"]


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_without_the_serve_extra_serve_says_how_to_get_it_in_one_line(missing, tiny_words_folder):
    import subprocess
    import sys

    # None in sys.modules makes `import fastapi` fail as if it weren't installed.
    script = f"import sys; sys.modules[{missing!r}] = None; from chatapp.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", script, "serve", "--port", "0", "--model", str(tiny_words_folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "pip install 'chatapp[serve]'" in done.stderr, done.stderr
    assert missing in done.stderr and "Traceback" not in done.stderr
