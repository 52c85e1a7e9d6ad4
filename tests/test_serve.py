"""`chatapp serve`, driven as clients drive it: the official `openai` client, and raw HTTP for what it won't send.

The server runs in this process on 127.0.0.1 (uvicorn on a thread) over the tiny words-only model, whose
replies re-tokenize to the ids sampled, so the cache counts below are exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx2 as httpx
import openai
import pytest
from servehelpers import TALK, ask, serving, user

from chatapp.server.openai_schema import ApiError, parse_chat

KEY = "sekret-test-key"


def post(url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=data, headers=headers or {}, timeout=120)


def test_models_and_health(client, engine, url):
    assert [m.id for m in client.models.list().data] == [engine.name]
    health = httpx.get(f"{url}/health").json()
    assert health == {"status": "ok", "model": engine.name, "queue": 0}


def test_a_reply_is_the_engine_s_own_and_streams_the_same(client, engine, tiny_words_fp32):
    from chatapp.engine.session import ChatSession, Message
    from chatapp.sampling import SamplingParams

    direct = ChatSession(tiny_words_fp32)
    expected = "".join(
        r.text for r in direct.reply_to([Message("user", "Hello there")], SamplingParams(8, temperature=0.0))
    )
    reply = ask(client, engine, [user("Hello there")])
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == direct._last_prompt.__len__()
    assert reply.usage.completion_tokens <= 8
    chunks = list(ask(client, engine, [user("Hello there")], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # The same prompt again: everything but the last prompt token came from the cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_max_tokens_and_stop(client, engine):
    short = ask(client, engine, [user(TALK)], max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = ask(client, engine, [user(TALK)], max_tokens=12).choices[0].message.content
    cut_at = full.split()[3]
    stopped = ask(client, engine, [user(TALK)], max_tokens=12, stop=[cut_at])
    assert stopped.choices[0].message.content == full[: full.index(cut_at)]
    assert stopped.choices[0].finish_reason == "stop"


def test_a_six_turn_chat_reads_only_the_new_message(client, engine):
    messages = [{"role": "system", "content": "You are terse."}]
    before = None
    for turn in range(6):
        messages.append(user(f"Question {turn}: what comes next in the list of words?"))
        chunks = list(ask(client, engine, messages, stream=True, stream_options={"include_usage": True}))
        usage = chunks[-1].usage
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        if before is not None:
            # The whole previous conversation, its reply included, came from the cache (the reply's last
            # sampled token was never fed to the model, so it is read with the new message).
            assert usage.prompt_tokens_details.cached_tokens >= before.prompt_tokens + before.completion_tokens - 1
        before = usage
        messages.append({"role": "assistant", "content": text})


def test_interleaved_conversations_each_keep_their_slot(client, engine):
    a = [user("Tell me about rivers and bridges")]
    b = [{"role": "system", "content": "Another chat."}, user("Tell me about clocks")]
    replies = {}
    for name, chat in (("a", a), ("b", b)):
        replies[name] = ask(client, engine, chat)
        chat += [{"role": "assistant", "content": replies[name].choices[0].message.content}, user("And then?")]
    for name, chat in (("a", a), ("b", b)):
        again = ask(client, engine, chat)
        first = replies[name].usage
        assert again.usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens + first.completion_tokens - 1


def test_a_client_that_disconnects_mid_stream_cancels_its_reply(url, client, engine):
    body = {"model": engine.name, "messages": [user(TALK)], "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first words came: leaving the block closes the connection
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health").json()["queue"]:
        assert time.monotonic() < deadline, "the reply went on after its client left"
        time.sleep(0.1)
    session = engine.last
    assert session.messages[-1].cut  # stopped before its 1,500 tokens
    # The slot's cache is consistent: the next turn of that chat reuses it.
    nxt = ask(client, engine, [user(TALK), {"role": "assistant", "content": session.messages[-1].content}, user("Ok")])
    assert nxt.usage.prompt_tokens_details.cached_tokens > 0


def test_a_non_streaming_client_that_gives_up_cancels_its_reply_too(url, client, engine):
    body = {"model": engine.name, "messages": [user(TALK + " please")], "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/health").json()["queue"]:
        assert time.monotonic() < deadline, "the reply went on after its client left"
        time.sleep(0.1)
    assert engine.last.messages[-1].cut  # stopped before its 1,500 tokens


def test_a_seed_makes_a_sampled_reply_repeatable(client, engine):
    replies = {
        ask(client, engine, [user("Pick words")], temperature=1.0, seed=7).choices[0].message.content for _ in "ab"
    }
    assert len(replies) == 1


HI = [{"role": "user", "content": "hi"}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}


def request_body(**fields) -> dict:
    return {"model": "MODEL", "messages": HI, **fields}


@pytest.mark.parametrize(
    ("body", "status", "words", "param"),
    [
        (b"{not json", 400, "not valid JSON", None),
        ({"messages": HI}, 400, "'model'", "model"),
        ({"model": "MODEL"}, 400, "'messages'", "messages"),
        (request_body(temperature=5), 400, "<= 2", "temperature"),
        (request_body(max_tokens=0), 400, ">= 1", "max_tokens"),
        (request_body(messages=[{"role": "assistant", "content": "hi"}]), 400, "user's", "messages"),
        (request_body(messages=[{"role": "user", "content": [IMAGE]}]), 400, "text", "messages[0].content"),
        (request_body(n=2), 400, "'n'", "n"),
        (request_body(model="other/model"), 404, "no model 'other/model'", "model"),
    ],
)
def test_bad_requests_get_openai_errors(url, engine, body, status, words, param):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body["model"] = engine.name
    response = post(url, body)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and "\n" not in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_a_prompt_over_the_context_is_refused_with_the_numbers(url, engine):
    words = " ".join(["word"] * (engine.context_length + 10))
    response = post(url, {"model": engine.name, "messages": [{"role": "user", "content": words}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"{engine.context_length}-token context" in error["message"]


def test_a_body_over_the_limit_and_an_unknown_path(url):
    assert post(url, b"x" * (64 * 1024 + 1)).status_code == 413
    chunked = httpx.post(f"{url}/v1/chat/completions", content=iter([b"x" * 40_000, b"y" * 40_000]), timeout=30)
    assert chunked.status_code == 413 and "limit" in chunked.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_with_a_key_every_request_needs_it(engine):
    with serving(engine, api_key=KEY) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.get(f"{base}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        assert ask(good, engine, [user("hi")], max_tokens=2).usage.completion_tokens <= 2
        assert httpx.get(f"{base}/health").status_code == 200  # liveness checks carry no secret


def test_the_schema_reads_what_clients_send():
    chat = parse_chat(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "assistant", "content": None},
                    {"role": "user", "content": "c"},
                ],
                "max_tokens": 5,
                "max_completion_tokens": 7,
                "temperature": 1,
                "seed": 3,
                "stop": "END",
                "stream": True,
                "stream_options": {"include_usage": True},
                "user": "ignored",
            }
        ).encode()
    )
    assert chat.messages == [("system", "Be brief."), ("user", "ab"), ("assistant", ""), ("user", "c")]
    assert chat.sampling == {"temperature": 1.0, "seed": 3, "max_new_tokens": 7}
    assert chat.stop == ("END",) and chat.stream and chat.include_usage
    with pytest.raises(ApiError, match="stop"):
        parse_chat(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["", "a"]}')


def test_serving_beyond_this_machine_needs_a_key(tiny_words_folder, tmp_path):
    command = [sys.executable, "-m", "chatapp.cli", "serve", "--host", "0.0.0.0", "--model", str(tiny_words_folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env(tmp_path, key=None))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "API key" in done.stderr and "loading" not in done.stderr


def test_chatapp_serve_says_where_and_answers(tiny_words_folder, tmp_path):
    command = [sys.executable, "-m", "chatapp.cli", "serve", "--port", "0", "--model", str(tiny_words_folder)]
    command += ["--preset", "fp32", "--slots", "1"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path, key=KEY)
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("chatapp serve: http://127.0.0.1:") and "1 cache slot" in line, line
        assert "API key required" in line
        base = line.split()[2].removesuffix("/v1")
        assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
        answer = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert answer.status_code == 200
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert KEY not in line + out + err  # the key is never printed or logged


def _env(tmp_path, key=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != "CHATAPP_API_KEY"}
    if key:
        env["CHATAPP_API_KEY"] = key
    return env


def test_a_restarted_server_starts_from_its_slots_snapshots(tiny_words_fp32, settings, tmp_path):
    """Snapshots work here too: the first request after a restart reads the chat from disk, not the model."""
    from dataclasses import replace

    from chatapp.server.slots import Engine, disk_cache

    own = replace(settings, data_dir=tmp_path / "data", kv_disk_budget=1.0)
    chat = [user(TALK)]
    first = Engine(tiny_words_fp32, slots=2, disk=disk_cache(tiny_words_fp32, own))
    with serving(first) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        reply = ask(client, first, chat, max_tokens=40)
    first.close()
    assert list((tmp_path / "data" / "kv" / "serve").glob("*"))
    chat += [{"role": "assistant", "content": reply.choices[0].message.content}, user("Go on")]
    again = Engine(tiny_words_fp32, slots=2, disk=disk_cache(tiny_words_fp32, own))
    try:
        with serving(again) as base:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
            nxt = ask(client, again, chat)
    finally:
        again.close()
    cached = nxt.usage.prompt_tokens_details.cached_tokens
    assert cached >= reply.usage.prompt_tokens + reply.usage.completion_tokens - 1


def test_snapshots_wait_until_the_server_is_quiet(tiny_words_fp32, settings, tmp_path):
    """A slot is written once no request has come for quiet_s, not while the next turn may be prefilling."""
    from dataclasses import replace

    from chatapp.server.openai_schema import ChatRequest
    from chatapp.server.slots import Engine, disk_cache

    own = replace(settings, data_dir=tmp_path / "data", kv_disk_budget=1.0)
    folder = tmp_path / "data" / "kv" / "serve"
    sleepy = Engine(tiny_words_fp32, slots=2, disk=disk_cache(tiny_words_fp32, own), quiet_s=3600)
    try:
        job = sleepy.submit(ChatRequest(sleepy.name, [("user", TALK)], {"max_new_tokens": 8}), lambda *event: None)
        assert job.done.wait(120)
        sleepy.disk.flush()
        assert not list(folder.glob("chat*"))  # answered, but the server has not been quiet long enough
    finally:
        sleepy.close()
    assert len(list(folder.glob("chat*"))) == 1  # closing writes what is unsaved

    def on_disk() -> dict:
        return {path.name: path.stat().st_mtime_ns for path in folder.glob("chat*")}

    before = on_disk()
    quick = Engine(tiny_words_fp32, slots=2, disk=disk_cache(tiny_words_fp32, own), quiet_s=0.2)
    try:
        request = ChatRequest(quick.name, [("user", "Hello there")], {"max_new_tokens": 8, "temperature": 0.0})
        assert quick.submit(request, lambda *event: None).done.wait(120)
        deadline = time.monotonic() + 60
        while on_disk() == before:  # written on its own once the server is quiet, with no close
            assert time.monotonic() < deadline, "the quiet server never wrote its slot"
            time.sleep(0.05)
    finally:
        quick.close()


def test_a_request_whose_client_left_while_queued_is_skipped_and_still_ends(engine):
    from chatapp.server.openai_schema import ChatRequest

    long = ChatRequest(engine.name, [("user", TALK)], {"max_new_tokens": 1500, "temperature": 0.0})
    heard: dict[str, list] = {"long": [], "queued": []}
    first = engine.submit(long, lambda kind, value: heard["long"].append(kind))
    queued = engine.submit(ChatRequest(engine.name, [("user", "hi")]), lambda *event: heard["queued"].append(event))
    deadline = time.monotonic() + 120
    while "delta" not in heard["long"]:
        assert time.monotonic() < deadline, "the long reply did not start"
        time.sleep(0.05)
    queued.cancel.set()  # its client left while the long reply ran
    first.cancel.set()
    assert queued.done.wait(120) and first.done.wait(1)
    [(kind, error)] = heard["queued"]
    assert kind == "error" and error.code == "cancelled"  # its handler hears an end instead of waiting forever
    assert heard["long"][-1] == "done" and engine.queue_length == 0
