"""A worker client that speaks chatapp.protocol from a script, on a thread: the UI's tests without torch.

FakeWorkerClient has the interface the Backend uses from chatapp.worker_client.WorkerClient and answers
requests in order, one at a time, as the real worker does. It imitates what the UI can see of the engine:
a load (or a scripted load failure), replies streamed word by word, a cancel that stops at the next word,
a per-conversation "cache" whose reuse shows in the prefill counts (a branch starts from a copy of its
parent's), trimming of old messages to fit the context, evictions and failures on demand, and a kill that
reports WorkerDied. Tokens are words here: the conversation is rendered as `role:` plus the words of each
message, then `assistant:`.

    app = make_app(settings, FAKE_MODEL, client_factory=FakeWorkerClient.factory(reply="Hi there"))
    app.backend.client.evict_after_next([1], 4096)
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from chatapp import protocol as p

#: What the fake calls a model's footprint in memory.
FOOTPRINT_BYTES = 52_000_000
#: Bytes of "KV cache" per token the fake reports when it evicts without being told how much.
BYTES_PER_TOKEN = 512

_pids = itertools.count(40_000)


def echo(messages: list[tuple[str, str]]) -> str:
    """The default script: "Echo: <last user message>" (repeated up to max_new_tokens words)."""
    last = next((content for role, content in reversed(messages) if role == "user"), "")
    return f"Echo: {last}"


def long_reply_to(*prompts: str, words: int = 5000) -> Callable[[list[tuple[str, str]]], str]:
    """A script that answers these prompts at length (to be stopped or killed mid-reply) and echoes the rest once."""

    def script(messages: list[tuple[str, str]]) -> str:
        if messages and messages[-1][1] in prompts:
            return " ".join(f"word{i}" for i in range(words))
        return echo(messages)

    return script


def _thinking_words(words: list[str], markers: tuple[str, str] | None) -> int:
    """As the engine counts thinking tokens, a word a token: from the open marker through the close one."""
    if not markers or markers[0] not in words:
        return 0
    start = words.index(markers[0])
    end = words.index(markers[1], start) + 1 if markers[1] in words[start:] else len(words)
    return end - start


def fails_to_load(ref: str) -> bool:
    """The default: a model whose reference says it is broken (or names nothing) fails to load."""
    return "broken" in ref or "no-such" in ref


def render(messages: list[tuple[str, str]]) -> list[str]:
    """The fake's tokens for a conversation: a role marker and the words of each message, then the reply's marker."""
    tokens: list[str] = []
    for role, content in messages:
        tokens += [f"{role}:", *content.split()]
    return [*tokens, "assistant:"]


def common_prefix_len(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class _Conversation:
    """What the fake worker keeps per conversation: the messages it last saw, the cache, what was dropped."""

    def __init__(self):
        self.messages: list[tuple[str, str]] = []
        self.cache: list[str] = []
        self.dropped = 0


class FakeWorkerClient:
    """A scripted stand-in for WorkerClient (see the module doc); `FakeWorkerClient.factory(...)` for ChatApp."""

    def __init__(
        self,
        settings,
        on_event: Callable[[object], None],
        log_path: Path | None = None,
        *,
        reply: str | Iterable[str] | Callable[[list[tuple[str, str]]], str] | None = None,
        repeat: bool | None = None,
        delay: float = 0.02,
        load_delay: float = 0.0,
        status: bool = True,
        fail_load: Callable[[str], bool] = fails_to_load,
        context_length: int = 2048,
        thinking: tuple[str, str] | None = None,
        switch: bool = False,
    ):
        """reply: the script of replies: a string, a list (one per Generate, the last one kept), or a callable of
        the conversation's (role, content) pairs. repeat: repeat the reply's words up to max_new_tokens (the
        default for the default echo script only). delay: seconds between streamed words, so a test can act
        mid-reply. load_delay: seconds a load takes. fail_load: which model references fail to load."""
        self.settings = settings
        self.on_event = on_event
        self.log_path = log_path
        if reply is None:
            self._script: Callable[[list[tuple[str, str]]], str] = echo
        elif callable(reply):
            self._script = reply
        elif isinstance(reply, str):
            self._script = lambda messages, text=reply: text
        else:
            replies = list(reply)
            self._script = lambda messages: replies.pop(0) if len(replies) > 1 else replies[0]
        self.repeat = reply is None if repeat is None else repeat
        self.delay = delay
        self.load_delay = load_delay
        self.status = status
        self.fail_load = fail_load
        self.max_context = context_length
        #: A reasoning model's markers, and whether its template has the thinking switch (as Loaded says them).
        self.thinking, self.switch = thinking, switch
        #: Every request sent while running, in order (Cancel and Shutdown too).
        self.received: list[object] = []
        #: How many times the fake worker was started.
        self.starts = 0
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._next_request = 0
        self._evictions: list[p.Evicted] = []
        self._failures: list[str] = []
        self._saved: set[int] = set()
        self._reset_run_state()

    @classmethod
    def factory(cls, **options) -> Callable[..., FakeWorkerClient]:
        """A client_factory for ChatApp that makes fake clients with these options (see __init__)."""

        def make(settings, on_event, log_path=None):
            return cls(settings, on_event, log_path, **options)

        return make

    def _reset_run_state(self) -> None:
        """What a fresh worker process has: nothing loaded, no caches, no requests."""
        self._requests: queue.Queue = queue.Queue()
        self._alive = False
        self._stopping = False
        self._closing = False
        self._killed = threading.Event()
        self._cancelled: set[int] = set()
        self._finished = 0
        self.loaded: p.Loaded | None = None
        self.context_length = self.max_context
        self._conversations: dict[int, _Conversation] = {}

    # -- the WorkerClient interface ----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self) -> None:
        self._reset_run_state()
        self._alive = True
        self._pid = next(_pids)
        self.starts += 1
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-worker")
        self._thread.start()

    def request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    def send(self, request) -> bool:
        if not self._alive:
            return False
        self.received.append(request)
        if isinstance(request, p.Cancel):
            # Out of band, as the real worker's reader thread does: it acts on the reply in progress.
            with self._lock:
                if request.request_id > self._finished:
                    self._cancelled.add(request.request_id)
            return True
        if isinstance(request, p.Shutdown):
            with self._lock:
                self._closing = True
        self._requests.put(request)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self._thread is None:
            return
        if self._alive:
            self.send(p.Shutdown())
        self._thread.join(timeout)
        self._alive = False

    def kill(self) -> None:
        """As SIGKILL: nothing more is sent, then WorkerDied(exitcode=-9)."""
        if not self._alive:
            return
        self._alive = False
        self._killed.set()
        self._requests.put(None)  # wakes the thread if it is waiting for a request

    # -- what a test can script ------------------------------------------------------------------

    def evict_after_next(self, conversation_ids: list[int], freed_bytes: int | None = None) -> None:
        """After the next Generate, report these conversations' caches as evicted (and forget them)."""
        self._evictions.append(p.Evicted(list(conversation_ids), freed_bytes or 0))

    def fail_next(self, message: str = "RuntimeError: scripted failure") -> None:
        """Make the next Generate fail with Error(message, request_id) instead of replying."""
        self._failures.append(message)

    # -- the fake worker's thread ------------------------------------------------------------------

    def _emit(self, event) -> bool:
        """Send an event unless the worker was killed; False when it was."""
        if self._killed.is_set():
            return False
        self.on_event(event)
        return True

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if self._killed.is_set():
                break
            if isinstance(request, p.Shutdown):
                return
            if self._closing:
                continue
            if isinstance(request, p.Load):
                self._load(request)
            elif isinstance(request, p.Generate):
                self._generate(request)
            elif isinstance(request, p.Branch):
                parent = self._conversations.get(request.parent_id)
                if parent is not None:
                    self._conversations[request.conversation_id] = copy.deepcopy(parent)
            elif isinstance(request, p.Reset):
                self._conversations.pop(request.conversation_id, None)
            elif isinstance(request, p.Count):
                self._count(request)
            if self._killed.is_set():
                break
        if not self._stopping:
            self.on_event(p.WorkerDied(-9, ""))

    def _load(self, request: p.Load) -> None:
        self.loaded = None
        self._conversations.clear()
        if self.status and not self._emit(p.Status(f"loading {request.model} ({request.preset})")):
            return
        if self.load_delay:
            time.sleep(self.load_delay)
        if self.fail_load(request.model):
            self._emit(p.Error(f"can't load '{request.model}': the weights are not a model (scripted)"))
            return
        preset = "fp32" if request.preset == "auto" else request.preset
        limits = [self.max_context, request.context_tokens, getattr(self.settings, "context_cap", None)]
        self.context_length = min(limit for limit in limits if limit)
        self.loaded = p.Loaded(
            model=request.model,
            preset=preset,
            dtype=preset if preset in ("fp32", "bf16", "fp16") else "fp32",
            device="cpu",
            attn_implementation=request.attn_implementation or "sdpa",
            context_length=self.context_length,
            footprint_bytes=FOOTPRINT_BYTES,
            notes=[],
            reasons=["auto: fp32 fits in RAM (scripted)"] if request.preset == "auto" else [],
            thinking_markers=self.thinking,
            thinking_switch=self.switch,
        )
        self._emit(self.loaded)

    def _fit(self, messages: list[tuple[str, str]], dropped: int, room: int) -> tuple[list[str], int]:
        """As the engine does: drop the oldest user/assistant pairs (never the system prompt) until it fits."""
        system = [m for m in messages if m[0] == "system"]
        rest = [m for m in messages if m[0] != "system"]
        while True:
            tokens = render(system + rest[dropped:])
            if len(tokens) + room <= self.context_length:
                return tokens, dropped
            kept = rest[dropped:]
            step = 2 if len(kept) > 1 and kept[0][0] == "user" and kept[1][0] == "assistant" else 1
            if len(kept) - step < 1:
                raise ValueError(
                    f"the message needs {len(tokens)} tokens plus {room} for the reply, "
                    f"more than the {self.context_length}-token context; shorten it or lower max_new_tokens"
                )
            dropped += step

    def _count(self, request: p.Count) -> None:
        """As the worker counts: the new message's words, the whole chat's tokens, and whether it can fit at all."""
        if self.loaded is None:
            self._emit(p.Error("no model is loaded yet", request.request_id))
            return
        try:
            self._fit(request.messages, 0, request.max_new_tokens)
            too_long = False
        except ValueError:
            too_long = True
        self._emit(
            p.Counted(
                request.request_id,
                len(request.messages[-1][1].split()),
                len(render(request.messages)),
                self.context_length - request.max_new_tokens,
                self.context_length,
                too_long,
            )
        )

    def _generate(self, request: p.Generate) -> None:
        self._reply(request)
        if self._evictions and not self._killed.is_set():
            evicted = self._evictions.pop(0)
            freed = evicted.freed_bytes
            for gone in evicted.conversation_ids:
                held = self._conversations.pop(gone, None)
                if not evicted.freed_bytes and held is not None:
                    freed += len(held.cache) * BYTES_PER_TOKEN
            self._emit(p.Evicted(evicted.conversation_ids, freed))
        if not self._killed.is_set():
            # As the real worker: a chat in memory is live; every chat that had a turn was saved to disk after it.
            self._saved.add(request.conversation_id)
            self._emit(p.CacheStates(list(self._conversations), [], sorted(self._saved)))

    def _reply(self, request: p.Generate) -> None:
        rid, cid = request.request_id, request.conversation_id
        started = time.perf_counter()
        try:
            if self.loaded is None:
                self._emit(p.Error("no model is loaded yet", rid))
                return
            if self._failures:
                self._emit(p.Error(self._failures.pop(0), rid))
                return
            conversation = self._conversations.setdefault(cid, _Conversation())
            messages = [tuple(m) for m in request.messages]
            limit = request.params.max_new_tokens
            same = common_prefix_len(conversation.messages, messages)
            dropped = min(conversation.dropped, sum(1 for role, _ in messages[:same] if role != "system"))
            try:
                tokens, dropped_now = self._fit(messages, dropped, limit)
            except ValueError as exc:
                self._emit(p.Error(str(exc), rid))
                return
            trimmed = dropped_now - dropped
            keep = min(common_prefix_len(tokens, conversation.cache), len(tokens) - 1)
            words = self._script(messages).split() or ["…"]
            if self.repeat:
                words = list(itertools.islice(itertools.cycle(words), limit))
            finish = "length" if len(words) >= limit else "stop"
            words = words[:limit]
            said: list[str] = []
            times: list[float] = []
            for word in words:
                if said and self._cancel_requested(rid):
                    finish = "cancelled"
                    break
                if not self._emit(p.Delta(rid, word if not said else " " + word)):
                    return
                said.append(word)
                times.append(time.perf_counter())
                if self.delay:
                    time.sleep(self.delay)
            conversation.messages = [*messages, ("assistant", " ".join(said))]
            conversation.dropped = dropped_now
            conversation.cache = [*tokens, *said]
            if trimmed and finish in ("stop", "length"):
                finish = "overflow-trimmed"
            decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
            stats = p.TurnStats(
                prompt_tokens=len(tokens),
                prefilled_tokens=len(tokens) - keep,
                generated_tokens=len(said),
                ttft_s=(times[0] if times else time.perf_counter()) - started,
                decode_tokens_per_s=(len(said) - 1) / decode_s if decode_s > 0 else 0.0,
                cache_tokens=len(conversation.cache),
                finish_reason=finish,
                trimmed_messages=trimmed,
                dropped_messages=dropped_now,
                thinking_tokens=_thinking_words(said, self.thinking),
            )
            self._emit(p.Finished(rid, cid, " ".join(said), stats))
        finally:
            with self._lock:
                self._cancelled.discard(rid)
                self._finished = max(self._finished, rid)

    def _cancel_requested(self, request_id: int) -> bool:
        with self._lock:
            return self._closing or request_id in self._cancelled
