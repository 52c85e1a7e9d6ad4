"""Servers on 127.0.0.1 for tests: `chatapp serve` in this process, and `transformers serve` as a real peer."""

from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def serving(engine, api_key=None, max_body_bytes=64 * 1024):
    import uvicorn

    from chatapp.server.app import bind, create_app

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key, max_body_bytes), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


#: A prompt the tiny words-only model answers at length (greedy), for acting mid-reply.
TALK = "Talk for a long time"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def ask(client, engine, messages, **options):
    """A greedy, short, non-streaming reply unless options say otherwise."""
    options = {"temperature": 0.0, "max_tokens": 8, **options}
    return client.chat.completions.create(model=engine.name, messages=messages, **options)


@contextlib.contextmanager
def transformers_serve(folder, timeout: float = 180):
    """`transformers serve` on the folder, on 127.0.0.1: a real OpenAI-compatible server that isn't ours.

    float32: this box may lack native bf16, where transformers' default (the weights' bf16) crawls."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(folder), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "transformers serve did not start"
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


class StubServer:
    """A misbehaving OpenAI-style server (stdlib http.server): it stands in for a third-party server that fails,
    never for our own code. `mode`: "401", "cut" (two chunks, then the connection drops), "slow" (answers
    nothing for `delay` seconds), "stall" (its first words, then nothing for `delay` seconds), "reasoning" (a
    reasoning_content delta, then content)."""

    def __init__(self, mode: str, delay: float = 5.0):
        import http.server
        import json

        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if stub.mode == "401":
                    return self._json(401, {"error": {"message": "Incorrect API key provided", "code": "x"}})
                self._json(200, {"object": "list", "data": [{"id": "stub", "object": "model", "created": 0}]})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if stub.mode == "401":
                    return self.do_GET()
                if stub.mode == "slow":
                    time.sleep(stub.delay)
                try:
                    self._stream()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the slow mode's point)

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                deltas = [{"content": "Hello"}, {"content": " there"}]
                if stub.mode == "reasoning":
                    deltas = [{"reasoning_content": "Let me think."}, *deltas]
                for delta in deltas:
                    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if stub.mode == "stall":  # the first words, then nothing for a long time
                        time.sleep(stub.delay)
                if stub.mode == "cut":
                    self.close_connection = True
                    return
                end = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}  # fmt: skip
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
                self.close_connection = True

        self.mode, self.delay = mode, delay
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
