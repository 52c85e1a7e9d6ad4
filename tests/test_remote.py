"""The remote backend (chatapp.remote, RemoteClient, `ask --backend`) against real servers on 127.0.0.1:
`transformers serve` (a peer we don't write) and our own `chatapp serve`; a stub server stands in only for
servers that fail (a refused key, a cut stream, a server too slow to answer).
"""

from __future__ import annotations

import queue
import subprocess
import sys
from dataclasses import replace

import pytest
from servehelpers import StubServer, serving, transformers_serve

from chatapp import protocol as p
from chatapp.errors import RemoteError
from chatapp.remote import Remote, api_key, choose_model
from chatapp.remote_client import RemoteClient
from chatapp.sampling import SamplingParams

KEY = "remote-test-key"
SHORT = SamplingParams(8, temperature=0.0)


class Events:
    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def __call__(self, event):
        self.queue.put(event)

    def until(self, kind, timeout=300):
        """Every event up to and including the first of `kind` (or an Error)."""
        seen = []
        while True:
            event = self.queue.get(timeout=timeout)
            seen.append(event)
            if isinstance(event, kind | p.Error):
                return seen


def client_for(settings, url):
    events = Events()
    client = RemoteClient(replace(settings, backend_url=url), events)
    client.start()
    return client, events


@pytest.fixture(scope="module")
def peer(starter_folder):
    with transformers_serve(starter_folder) as base:
        yield f"{base}/v1"


@pytest.fixture(scope="module")
def ours(tiny_words_fp32):
    from chatapp.server.slots import Engine

    engine = Engine(tiny_words_fp32, slots=2)
    with serving(engine, api_key=KEY) as base:
        yield f"{base}/v1", engine
    engine.close()


def test_against_transformers_serve_a_reply_streams_and_a_cancel_keeps_the_partial_text(settings, peer):
    client, events = client_for(settings, peer)
    try:
        client.send(p.Load("smollm2-135m-local", "auto"))
        loaded = events.until(p.Loaded)[-1]
        assert isinstance(loaded, p.Loaded), loaded
        assert loaded.device == "remote: " + peer.split("//")[1].removesuffix("/v1") and loaded.preset == "remote"
        assert loaded.notes and "using" in loaded.notes[0]  # it serves the folder, under its path
        client.send(p.Generate(1, 1, [("user", "What is the capital of France?")], SHORT))
        seen = events.until(p.Finished)
        finished = seen[-1]
        assert isinstance(finished, p.Finished), finished
        deltas = "".join(e.text for e in seen if isinstance(e, p.Delta))
        assert finished.text == deltas and deltas.strip()
        assert finished.stats.remote and finished.stats.generated_tokens >= 1
        assert finished.stats.finish_reason in ("stop", "length")
        # It refuses top_k by name (422): asked again without it, and not sent to it again.
        client.send(p.Generate(3, 1, [("user", "Hi")], SamplingParams(4, temperature=0.0, top_k=5)))
        assert isinstance(events.until(p.Finished)[-1], p.Finished) and client.server.extras is False
        # A long reply, stopped after its first words: the partial text comes back, marked cancelled.
        client.send(p.Generate(2, 1, [("user", "Write a long story about a river.")], SamplingParams(400)))
        first = events.until(p.Delta)[-1]
        assert isinstance(first, p.Delta), first
        client.send(p.Cancel(2))
        stopped = events.until(p.Finished)
        assert stopped[-1].stats.finish_reason == "cancelled"
        assert stopped[-1].text.startswith(first.text) and stopped[-1].stats.generated_tokens < 400
    finally:
        client.stop()


def test_ask_with_a_backend_prints_the_server_s_reply_without_torch(peer, tmp_path):
    argv = ["ask", "--backend", peer, "--max-new-tokens", "8", "Hi"]
    script = (
        "import sys; from chatapp.cli import main; code = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'no torch', file=sys.stderr); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "remote: 127.0.0.1" in done.stderr and "no torch" in done.stderr


def test_backend_local_uses_the_worker_whatever_backend_url_says(tiny_words_folder):
    import os

    env = {**os.environ, "CHATAPP_BACKEND_URL": "http://127.0.0.1:9/v1"}  # nothing answers there
    argv = ["ask", "--model", str(tiny_words_folder), "--preset", "fp32", "--max-new-tokens", "3", "Hi"]
    command = [sys.executable, "-m", "chatapp.cli", *argv]
    away = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert away.returncode == 1 and "can't reach http://127.0.0.1:9/v1" in away.stderr
    here = subprocess.run([*command, "--backend", "local"], capture_output=True, text=True, timeout=300, env=env)
    assert here.returncode == 0 and here.stdout.strip(), here.stderr


def test_without_a_keyring_key_set_says_so_in_one_line(monkeypatch):
    import keyring
    from keyring.backends import fail

    monkeypatch.delenv("CHATAPP_API_KEY", raising=False)
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    try:
        from chatapp.remote import store_key

        with pytest.raises(RemoteError, match=r"^no system keyring on this machine; use \$CHATAPP_API_KEY instead$"):
            store_key("http://gpu-box:8000/v1", "k")
        assert api_key("http://gpu-box:8000/v1") is None  # a lookup without a keyring is no key, silently
    finally:
        keyring.set_keyring(previous)


def test_against_chatapp_serve_usage_shows_the_cache_and_the_key_is_needed(settings, ours, monkeypatch):
    url, engine = ours
    monkeypatch.setenv("CHATAPP_API_KEY", KEY)
    client, events = client_for(settings, url)
    try:
        client.send(p.Load(engine.name, "auto"))
        assert isinstance(events.until(p.Loaded)[-1], p.Loaded)
        history = [("user", "Tell me about rivers")]
        client.send(p.Generate(1, 1, history, SHORT))
        first = events.until(p.Finished)[-1]
        history += [("assistant", first.text), ("user", "And bridges?")]
        client.send(p.Generate(2, 1, history, SHORT))
        second = events.until(p.Finished)[-1].stats
        assert second.usage_reported and second.prompt_tokens > first.stats.prompt_tokens
        # The server's cache held the first turn: only the new message was prefilled.
        assert second.prefilled_tokens < second.prompt_tokens - first.stats.prompt_tokens
    finally:
        client.stop()
    monkeypatch.setenv("CHATAPP_API_KEY", "wrong")
    with pytest.raises(RemoteError, match=r"refused the API key \(401\); set CHATAPP_API_KEY") as refused:
        Remote(url, api_key(url)).models()
    assert "\n" not in str(refused.value) and "wrong" not in str(refused.value)


def test_an_unknown_model_names_the_ones_there(ours):
    url, engine = ours
    with pytest.raises(RemoteError, match=f"no model 'nope'; it has: {engine.name}"):
        list(Remote(url, KEY).reply("nope", [("user", "hi")], SHORT))
    with pytest.raises(RemoteError, match="no model 'nope'"):
        choose_model([{"id": "a", "context_length": 0}], "nope", "a")
    chosen = choose_model([{"id": "a", "context_length": 9}], None, "b")
    assert chosen == ("a", 9, "the server has no model 'b'; using 'a'")


def test_a_refused_connection_is_one_line(settings):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    client, events = client_for(settings, f"http://127.0.0.1:{port}/v1")
    try:
        client.send(p.Load("any", "auto"))
        error = events.until(p.Loaded)[-1]
        assert isinstance(error, p.Error) and error.request_id is None
        assert error.message == f"can't reach http://127.0.0.1:{port}/v1: connection refused"
    finally:
        client.stop()


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("401", "refused the API key (401)"),
        ("cut", "closed the stream mid-reply; the partial reply is kept"),
        ("slow", "did not answer within 0.5 s"),
    ],
)
def test_a_failing_server_is_one_line_and_the_partial_reply_is_kept(settings, mode, words):
    stub = StubServer(mode, delay=3)
    try:
        events = Events()
        client = RemoteClient(replace(settings, backend_url=stub.url), events)
        client.start()
        client.server = Remote(stub.url, timeout=0.5)
        client.model = "stub"
        client.send(p.Generate(1, 1, [("user", "hi")], SHORT))
        seen = events.until(p.Finished)
        error = seen[-1]
        assert isinstance(error, p.Error) and error.request_id == 1 and words in error.message
        assert "\n" not in error.message
        if mode == "cut":  # what arrived before the cut reached the UI, which keeps it
            assert "".join(e.text for e in seen if isinstance(e, p.Delta)) == "Hello there"
        client.stop()
    finally:
        stub.close()


def test_a_cancel_stops_a_stalled_stream_at_once(settings):
    """The server sent its first words and then nothing: Esc must not wait for the next token (here never)."""
    stub = StubServer("stall", delay=600)
    try:
        events = Events()
        client = RemoteClient(replace(settings, backend_url=stub.url), events)
        client.start()
        client.model = "stub"
        client.send(p.Generate(1, 1, [("user", "hi")], SHORT))
        assert isinstance(events.until(p.Delta)[-1], p.Delta)
        client.send(p.Cancel(1))
        finished = events.until(p.Finished, timeout=30)[-1]
        assert isinstance(finished, p.Finished), finished
        assert finished.stats.finish_reason == "cancelled" and finished.text == "Hello"
        client.stop()
    finally:
        stub.close()


def test_reasoning_sent_apart_becomes_a_thinking_block():
    from chatapp.thinking import ANSWER, THINKING, Splitter

    stub = StubServer("reasoning")
    try:
        pieces = [r.text for r in Remote(stub.url).reply("stub", [("user", "hi")], SHORT)]
    finally:
        stub.close()
    assert "".join(pieces) == "<think>Let me think.</think>Hello there"
    splitter = Splitter("<think>", "</think>")
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.finish()
    assert "".join(text for kind, text in parts if kind == THINKING) == "Let me think."
    assert "".join(text for kind, text in parts if kind == ANSWER) == "Hello there"


def test_the_key_comes_from_the_flag_then_the_environment_then_the_keyring(monkeypatch, tmp_path):
    import keyring
    from keyring.backend import KeyringBackend

    class Memory(KeyringBackend):
        priority = 1
        store: dict = {}

        def get_password(self, service, user):
            return self.store.get((service, user))

        def set_password(self, service, user, password):
            self.store[(service, user)] = password

        def delete_password(self, service, user):
            self.store.pop((service, user))

    previous = keyring.get_keyring()
    keyring.set_keyring(Memory())
    try:
        url = "http://gpu-box:8000/v1"
        monkeypatch.delenv("CHATAPP_API_KEY", raising=False)
        assert api_key(url) is None
        import argparse

        from chatapp.cli_remote import cmd_key

        monkeypatch.setattr("getpass.getpass", lambda prompt: "from-keyring")
        config = tmp_path / "config"
        config.mkdir()
        cmd_key(argparse.Namespace(action="set", url=url), replace(_settings(), config_dir=config))
        assert api_key(url) == "from-keyring"
        assert not any("from-keyring" in f.read_text() for f in config.rglob("*") if f.is_file())
        monkeypatch.setenv("CHATAPP_API_KEY", "from-env")
        assert api_key(url) == "from-env"
        assert api_key(url, "from-flag") == "from-flag"
        cmd_key(argparse.Namespace(action="delete", url=url), _settings())
        monkeypatch.delenv("CHATAPP_API_KEY")
        assert api_key(url) is None
    finally:
        keyring.set_keyring(previous)


def _settings():
    from chatapp.config import load_settings

    return load_settings()


def test_backend_url_is_checked_in_the_config(tmp_path):
    from chatapp.config import load_settings_checked

    path = tmp_path / "config.toml"
    path.write_text('backend_url = "gpu-box:8000"\n')
    settings, errors = load_settings_checked(path)
    assert settings.backend_url == "" and any("backend_url" in e and "http://" in e for e in errors)
    path.write_text('backend_url = "http://gpu-box:8000/v1"\n')
    assert load_settings_checked(path)[0].backend_url == "http://gpu-box:8000/v1"
