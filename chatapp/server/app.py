"""The HTTP side of `chatapp serve`: a FastAPI app over an Engine, and `run` to serve it with uvicorn.

Every refusal is an OpenAI-style error body with one line, never a traceback. With an API key, every
endpoint but /health wants `Authorization: Bearer KEY`; /health stays open so that a load balancer's or a
script's liveness check needs no secret, and it tells nothing but the model and the queue.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from . import openai_schema as api
from .openai_schema import ApiError

#: The largest request body accepted: a long chat with pasted files, with room to spare.
MAX_BODY_BYTES = 4 * 1024 * 1024
NEED_KEY = "a valid API key is required: Authorization: Bearer KEY"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES):
    app = FastAPI(title="chatapp serve", docs_url=None, redoc_url=None, openapi_url=None)

    def refuse(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return refuse(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return refuse(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        from ..errors import first_line

        return refuse(ApiError(500, f"{type(exc).__name__}: {first_line(exc)}"))

    # A plain ASGI middleware, not @app.middleware: that one wraps `receive`, and then a request can't see
    # its client leave (request.is_disconnected), which is how a non-streaming reply gets cancelled.
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.get("/health")
    async def _health():
        return {"status": "ok", "model": engine.name, "queue": engine.queue_length}

    @app.get("/v1/models")
    async def _models():
        return api.models_list(engine.name, engine.context_length)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        chat = api.parse_chat(await _body(request, max_body_bytes))
        if chat.model != engine.name:
            raise ApiError(404, f"no model '{chat.model}' here; this server has '{engine.name}'", param="model",
                           code="model_not_found")  # fmt: skip
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = engine.submit(chat, lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        watcher = asyncio.create_task(_watch(request, job))
        try:
            first = await events.get()
        except BaseException:
            job.cancel.set()
            watcher.cancel()
            raise
        if first[0] == "error":
            watcher.cancel()
            raise first[1]
        if not chat.stream:
            try:
                return _collect(chat, await _rest(first, events))
            finally:
                watcher.cancel()
        return StreamingResponse(_stream(chat, first, events, job, watcher), media_type="text/event-stream")

    return app


class Guard:
    """The key check and the body size check, before any route runs (the body is also counted as it is read)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
            error = None
            if self.api_key and scope["path"] != "/health" and not _authorized(headers, self.api_key):
                error = ApiError(401, NEED_KEY, code="invalid_api_key")
            length = headers.get("content-length", "")
            if error is None and length.isdigit() and int(length) > self.max_body_bytes:
                error = _too_big(self.max_body_bytes)
            if error is not None:
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorized(headers: dict, api_key: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def _too_big(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the {limit:,}-byte limit", code="request_too_large")


async def _body(request, limit: int) -> bytes:
    """The body, read up to the limit (a chunked body has no Content-Length to refuse it by)."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_big(limit)
        parts.append(part)
    return b"".join(parts)


async def _watch(request, job) -> None:
    """Cancel the job when its client goes away (a closed stream, a request it gave up on): once the body is
    read, the next ASGI message is the disconnect (after the response, it is harmless)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


async def _rest(first, events: asyncio.Queue) -> list:
    """The job's events from `first` to its end; an empty reply (a stop at once) has no delta: `first` ends it."""
    out = [first]
    while out[-1][0] not in ("done", "error"):
        out.append(await events.get())
    return out


def _collect(chat, rest: list):
    kind, value = rest[-1]
    if kind == "error":
        raise value
    text, stats = value
    return api.completion(api.new_id(), chat.model, text, stats)


async def _stream(chat, first, events: asyncio.Queue, job, watcher):
    rid = api.new_id()
    created = int(time.time())
    try:
        yield api.sse(api.chunk(rid, chat.model, {"role": "assistant", "content": ""}, created=created))
        kind, value = first
        while True:
            if kind == "delta":
                yield api.sse(api.chunk(rid, chat.model, {"content": value}, created=created))
            elif kind == "error":  # after the headers went out: the error travels as an event, as OpenAI's do
                yield api.sse(value.body())
                return
            else:
                _, stats = value
                finish = api.FINISH.get(stats.finish_reason, "stop")
                yield api.sse(api.chunk(rid, chat.model, {}, finish, created=created))
                if chat.include_usage:
                    yield api.sse(api.usage_chunk(rid, chat.model, stats, created=created))
                yield api.sse("[DONE]")
                return
            kind, value = await events.get()
    finally:
        job.cancel.set()  # the client left mid-stream (or the reply ended, when this changes nothing)
        watcher.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before the URL is printed, so it is true."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(engine, sock: socket.socket, api_key: str | None, max_body_bytes: int) -> None:
    """Serve on sock until interrupted; says where, first, in one line (the key never)."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(
        f"chatapp serve: http://{where}:{port}/v1 (model {engine.name}, {len(engine.slots)} cache slot(s)"
        f"{', API key required' if api_key else ''})",
        flush=True,
    )
    config = uvicorn.Config(create_app(engine, api_key, max_body_bytes), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
