"""A remote backend: any OpenAI-compatible server (vLLM, TGI, SGLang, Ollama, llama-server, `chatapp serve`),
through the official `openai` client. Plain Python: the UI and the CLI use it without torch.

The server decides the precision, the memory and its own KV cache; we send the whole conversation each turn,
as every OpenAI client does, and measure time to first token and tokens/s on our side. Prompt and cached
tokens come from the server's usage, where it reports them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import RemoteError, first_line
from .protocol import Message, TurnStats
from .sampling import LIMITS, SamplingParams

#: The system keyring's service name for the API keys of remote servers (one entry per base URL).
KEYRING_SERVICE = "chatapp"
#: Seconds to wait for a server to connect or to send the next piece of a reply.
TIMEOUT_S = 60.0
#: Sampling fields beyond OpenAI's that vLLM, SGLang, llama-server and chatapp serve take.
EXTRAS = ("top_k", "min_p", "repetition_penalty")
#: The markers a server's separate reasoning text is wrapped in, so the app's thinking blocks show it.
THINKING = ("<think>", "</think>")


def api_key(url: str, explicit: str | None = None) -> str | None:
    """The key for url: --api-key, else $CHATAPP_API_KEY, else the system keyring (None: send none)."""
    if explicit:
        return explicit
    if os.environ.get("CHATAPP_API_KEY"):
        return os.environ["CHATAPP_API_KEY"]
    try:
        import keyring

        return keyring.get_password(KEYRING_SERVICE, url)
    except Exception:  # no keyring backend here (a headless box): no key, as if none was stored
        return None


def store_key(url: str, key: str | None) -> None:
    """Put url's key in the system keyring (None: delete it); RemoteError when there is no keyring."""
    import keyring
    from keyring.errors import KeyringError, NoKeyringError, PasswordDeleteError

    try:
        if key is None:
            keyring.delete_password(KEYRING_SERVICE, url)
        else:
            keyring.set_password(KEYRING_SERVICE, url, key)
    except PasswordDeleteError:
        raise RemoteError(f"no key is stored for {url}") from None
    except NoKeyringError:
        raise RemoteError("no system keyring on this machine; use $CHATAPP_API_KEY instead") from None
    except (KeyringError, RuntimeError) as exc:
        raise RemoteError(
            f"no system keyring to store the key in ({first_line(exc)}); use $CHATAPP_API_KEY instead"
        ) from None


def host(url: str) -> str:
    """HOST or HOST:PORT of a base URL, for the status bar."""
    return urlsplit(url).netloc or url


@dataclass
class RemoteResponse:
    """One piece of a remote reply, shaped as the engine's GenerationResponse: text, and stats at the end."""

    text: str
    finish_reason: str | None = None
    stats: TurnStats | None = None


class Remote:
    """One OpenAI-compatible server at a base URL (…/v1)."""

    def __init__(self, url: str, key: str | None = None, timeout: float = TIMEOUT_S):
        import openai

        self.url = url.rstrip("/")
        self.timeout = timeout
        #: Whether to send EXTRAS; False once this server refused them.
        self.extras = True
        # No retries: a refused connection or a 401 is said at once, not after three silent tries.
        self.client = openai.OpenAI(base_url=self.url, api_key=key or "none", max_retries=0, timeout=timeout)

    def models(self) -> list[dict]:
        """The server's models: [{"id", "context_length"}], the context where it says (vLLM's max_model_len)."""
        try:
            listed = self.client.models.list().data
        except Exception as exc:
            raise self._error(exc) from None
        return [{"id": m.id, "context_length": (m.model_extra or {}).get("max_model_len") or 0} for m in listed]

    def reply(
        self,
        model: str,
        messages: list[tuple[str, str]],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        thinking: bool | None = None,
    ) -> Iterator[RemoteResponse]:
        """Stream the reply to messages; the last item has the stats. Setting cancel closes the stream."""
        cancel = cancel or threading.Event()
        started = time.perf_counter()
        try:
            stream = self._create(self._request(model, messages, params, thinking))
        except Exception as exc:
            raise self._error(exc, model) from None
        usage, finish, pieces, times, inside = None, None, 0, [], False
        ended = threading.Event()
        # A cancel closes the connection at once, from a thread: a server that is slow to send the next token
        # (a long prefill, a stall) would otherwise hold the stop until that token came.
        threading.Thread(target=_close_on, args=(cancel, ended, stream), daemon=True, name="remote-cancel").start()
        try:
            for chunk in stream:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    text, inside = _text(choice.delta, inside)
                    finish = choice.finish_reason or finish
                    if text:
                        pieces += 1
                        times.append(time.perf_counter())
                        yield RemoteResponse(text)
        except Exception as exc:
            if not cancel.is_set():
                raise self._error(exc, model, midway=bool(times)) from None
        finally:
            ended.set()
            stream.close()
        if finish is None and cancel.is_set():
            finish = "cancelled"
        if finish is None:  # the stream ended without saying why: the server went away mid-reply
            raise RemoteError(f"{self.url} closed the stream mid-reply; the partial reply is kept")
        if inside:
            yield RemoteResponse(THINKING[1])
        yield RemoteResponse("", finish, _stats(usage, finish, pieces, times, started))

    def _create(self, request: dict):
        """The streaming request; a server that refuses our sampling extras by name gets it again without them,
        and never gets them again (transformers serve answers 422 to top_k)."""
        import openai

        try:
            return self.client.chat.completions.create(**request)
        except openai.APIStatusError as exc:
            extra = request.get("extra_body") or {}
            named = [name for name in EXTRAS if name in extra and name in _message(exc)]
            if exc.status_code not in (400, 422) or not named:
                raise
        self.extras = False
        request["extra_body"] = {k: v for k, v in extra.items() if k not in EXTRAS} or None
        return self.client.chat.completions.create(**request)

    def _request(self, model: str, messages, params: SamplingParams, thinking: bool | None) -> dict:
        extra = {}
        # Beyond OpenAI's own fields: vLLM, SGLang, llama-server and chatapp serve take these; others ignore them.
        for name in EXTRAS if self.extras else ():
            if getattr(params, name) != LIMITS[name].default:
                extra[name] = getattr(params, name)
        if thinking is not None:
            extra["chat_template_kwargs"] = {"enable_thinking": thinking}
        request = {
            "model": model,
            "messages": [{"role": role, "content": content} for role, content in messages],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            request["seed"] = params.seed
        if extra:
            request["extra_body"] = extra
        return request

    def _error(self, exc: Exception, model: str | None = None, midway: bool = False) -> RemoteError:
        """One line for what went wrong talking to the server."""
        import openai

        if isinstance(exc, RemoteError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return RemoteError(f"{self.url} did not answer within {self.timeout:g} s")
        if isinstance(exc, openai.APIConnectionError) and not midway:
            cause = exc.__cause__
            why = "connection refused" if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause) else ""
            return RemoteError(f"can't reach {self.url}: {why or first_line(cause or exc)}")
        if isinstance(exc, openai.AuthenticationError):
            return RemoteError(
                f"{host(self.url)} refused the API key (401); set CHATAPP_API_KEY or run `chatapp key set {self.url}`"
            )
        if isinstance(exc, openai.NotFoundError) and model:
            return RemoteError(f"{host(self.url)} has no model '{model}'{self._listing()}")
        if isinstance(exc, openai.APIStatusError):
            return RemoteError(f"{host(self.url)} answered {exc.status_code}: {first_line(_message(exc))}")
        if midway:
            return RemoteError(f"{self.url} closed the stream mid-reply ({first_line(exc)}); the partial reply is kept")
        return RemoteError(f"{self.url}: {type(exc).__name__}: {first_line(exc)}")

    def _listing(self) -> str:
        try:
            ids = [m["id"] for m in self.models()]
        except RemoteError:
            return ""
        return f"; it has: {', '.join(ids)}" if ids else ""


def _close_on(cancel: threading.Event, ended: threading.Event, stream) -> None:
    while not ended.is_set():
        if cancel.wait(0.1):
            _hang_up(stream)
            return


def _hang_up(stream) -> None:
    """End the connection under a stream, waking a read blocked on it in another thread: closing the socket
    alone doesn't wake a blocked recv on Linux, shutting it down does."""
    import socket

    try:
        network = stream.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # no socket to reach (another transport): closing the stream below is what is left
        pass
    try:
        stream.close()
    except Exception:  # a connection going away anyway
        pass


def _message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("detail"):  # FastAPI's own refusals (transformers serve's among them)
            return str(body["detail"])
    return str(getattr(exc, "message", exc))


def _text(delta, inside: bool) -> tuple[str, bool]:
    """A delta's text, its separate reasoning (reasoning_content, or reasoning) wrapped in THINKING markers."""
    extra = delta.model_extra or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    text = ""
    if reasoning:
        text += "" if inside else THINKING[0]
        text += reasoning
        inside = True
    if delta.content:
        text += THINKING[1] if inside else ""
        text += delta.content
        inside = False
    return text, inside


def _stats(usage, finish: str, pieces: int, times: list[float], started: float) -> TurnStats:
    prompt = getattr(usage, "prompt_tokens", 0) or 0
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) or 0
    generated = getattr(usage, "completion_tokens", None) or pieces
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return TurnStats(
        prompt_tokens=prompt,
        prefilled_tokens=prompt - cached,
        generated_tokens=generated,
        ttft_s=(times[0] if times else time.perf_counter()) - started,
        decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 else 0.0,
        cache_tokens=prompt + generated if usage is not None else 0,
        finish_reason=finish if finish in ("length", "cancelled") else "stop",
        remote=True,
        usage_reported=usage is not None,
    )


def choose_model(models: list[dict], explicit: str | None, default: str) -> tuple[str, int, str]:
    """(model id, its context or 0, a line saying why when it isn't the one asked for) among the server's
    models: `explicit` must be there; else `default` when it is, else the server's first."""
    ids = [m["id"] for m in models]
    if not ids:
        raise RemoteError("the server lists no models at /v1/models")
    wanted = explicit or default
    if wanted in ids:
        chosen, why = wanted, ""
    elif explicit:
        raise RemoteError(f"the server has no model '{explicit}'; it has: {', '.join(ids)}")
    else:
        chosen, why = ids[0], f"the server has no model '{default}'; using '{ids[0]}'"
    return chosen, next(m["context_length"] for m in models if m["id"] == chosen), why


class RemoteSession:
    """`ask` and `repl` on a remote server: ChatSession's reply_to and messages, without torch."""

    def __init__(self, remote: Remote, model: str, context_length: int = 0):
        self.remote, self.model, self.context_length = remote, model, context_length
        self.messages: list = []
        self.dropped_messages = 0
        #: What the CLI asks of a loaded model: the server applies its own sampling defaults.
        self.loaded = self

    def sampling_defaults(self) -> dict:
        return {}

    def reply_to(self, messages, params: SamplingParams, cancel=None, thinking=None):
        pairs = [(m.role, m.content) for m in messages]
        parts: list[str] = []
        try:
            for response in self.remote.reply(self.model, pairs, params, cancel, thinking):
                parts.append(response.text)
                yield response
        finally:
            self.messages = [*messages, Message("assistant", "".join(parts))]
