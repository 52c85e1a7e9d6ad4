"""The OpenAI chat API, read and written: a request body checked into a ChatRequest, and the response, chunk
and error bodies. Plain Python, so every rule is testable without a server.

Sampling values are checked against sampling.LIMITS, as everywhere else in chatapp. Fields we don't use
(user, logprobs: false, metadata...) are ignored, as OpenAI-compatible servers do; ones whose meaning we
can't honour (n > 1, tools, images) are refused with a 400 naming them, rather than silently answered wrong.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..sampling import LIMITS

#: Request fields carrying sampling values, by their name in SamplingParams.
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "seed": "seed",
    "max_completion_tokens": "max_new_tokens",
    "max_tokens": "max_new_tokens",
}
#: OpenAI's roles, as the chat templates name them ("developer" is the new name of "system").
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: How many stop strings a request may give (OpenAI's own limit).
MAX_STOP = 4


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body; the message is one line."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ChatRequest:
    model: str
    #: (role, content) pairs, oldest first, the last one the user's.
    messages: list[tuple[str, str]]
    #: The sampling values the request sets, by SamplingParams' names; the rest come from the model's defaults.
    sampling: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    #: chat_template_kwargs.enable_thinking, for a template with the switch (None: its default).
    thinking: bool | None = None


def parse_chat(raw: bytes) -> ChatRequest:
    """A /v1/chat/completions body, checked; ApiError(400) naming the first thing wrong with it."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "missing required field 'model' (a string)", param="model")
    messages = _messages(body.get("messages"))
    n = body.get("n", 1)
    if n not in (1, None):
        raise ApiError(400, "'n' must be 1: this server makes one reply per request", param="n")
    for name in ("tools", "functions"):
        if body.get(name):
            raise ApiError(400, f"'{name}' are not supported by this server", param=name)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    kwargs = body.get("chat_template_kwargs") or {}
    thinking = kwargs.get("enable_thinking") if isinstance(kwargs, dict) else None
    return ChatRequest(
        model=model,
        messages=messages,
        sampling=_sampling(body),
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=stream and _flag(options, "include_usage", "stream_options.include_usage"),
        thinking=thinking if isinstance(thinking, bool) else None,
    )


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{param or name}' must be true or false", param=param or name)
    return value


def _messages(value) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "missing required field 'messages' (a non-empty list)", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = ROLES.get(message.get("role"))
        if role is None:
            raise ApiError(
                400, f"'{where}.role' must be one of {', '.join(ROLES)}, got {message.get('role')!r}", param=where
            )
        messages.append((role, _content(message.get("content"), f"{where}.content", role)))
    if messages[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's: the reply answers it", param="messages")
    return messages


def _content(value, where: str, role: str) -> str:
    if isinstance(value, str):
        return _unicode(value, where)
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"'{where}' may hold only text parts, got {kind!r}", param=where)
            texts.append(part["text"])
        return _unicode("".join(texts), where)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", param=where)


def _unicode(text: str, where: str) -> str:
    # JSON lets "\ud800" through as a lone surrogate, which no tokenizer can encode: the client's mistake, not a 500.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'{where}' is not valid Unicode text ({exc.reason} at {exc.start})", param=where) from None
    return text


def _sampling(body: dict) -> dict:
    values = {}
    for name, ours in SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None or (ours in values and name == "max_tokens"):  # max_completion_tokens wins
            continue
        limit = LIMITS[ours]
        if isinstance(value, float) and limit.kind is int and value.is_integer():
            value = int(value)
        if limit.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not limit.accepts(value):
            raise ApiError(400, f"'{name}' {limit.rule()}, got {value!r}", param=name)
        values[ours] = value
    return values


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    return tuple(_unicode(s, "stop") for s in stops)


# -- what goes back ----------------------------------------------------------------------------------


#: Our finish reasons in OpenAI's words (a cancelled reply goes to no one: its client left).
FINISH = {"stop": "stop", "length": "length", "overflow-trimmed": "stop", "cancelled": "stop"}


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(stats) -> dict:
    """OpenAI's usage from a turn's TurnStats; cached_tokens are the prompt tokens the KV cache already held."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": stats.reused_tokens},
    }


def completion(rid: str, model: str, text: str, stats) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH.get(stats.finish_reason, "stop"),
            }
        ],
        "usage": usage(stats),
    }


def chunk(rid: str, model: str, delta: dict, finish: str | None = None, created: int | None = None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(rid: str, model: str, stats, created: int | None = None) -> dict:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(stats),
    }


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models_list(model: str, context_length: int) -> dict:
    # max_model_len: vLLM's name for the context, which clients such as ours read.
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 0, "owned_by": "chatapp", "max_model_len": context_length}
        ],
    }
