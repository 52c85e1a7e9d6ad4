"""The server's engine side: one loaded model, a few KV cache slots, and one thread that answers in order.

A slot is a ChatSession. Clients of an OpenAI-style API send the whole conversation every time and say
nothing about which chat it is, so a request takes the slot whose cached token ids share the longest prefix
with its rendered prompt, as llama-server does; the session then crops its cache to that prefix and
prefills only the rest. A slot counts only when the prompt starts with most of what it holds; otherwise the
request takes an empty slot, else the least recently used.

Replies run one at a time (batch size 1) on one thread, never on the server's event loop, in arrival order.
A slot's snapshot is written once no request has come for QUIET_S seconds, and on close, not after every
reply: the snapshot starts with a copy of the slot's cache on this thread (69 MB at 1,500 tokens of
SmolLM2-135M), and an agent that sends its next request at once should not wait for that copy, nor share the
CPU with the write while its prompt is prefilled.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import ContextOverflow, first_line
from ..sampling import resolve
from .openai_schema import ApiError, ChatRequest

#: At most this many slots by default: each can hold a full-context cache, and one user rarely runs more
#: clients at once than this.
MAX_SLOTS = 4

#: The share of a slot's cached tokens a prompt must start with to take that slot (llama-server's
#: --slot-prompt-similarity); a prompt that matches no slot this well takes an empty or the least recently used.
SIMILAR = 0.5

#: Seconds without a request after which the slots answered since the last save are written to disk.
QUIET_S = 1.0

#: What a job hands back, as (kind, value): ("delta", text), ("done", (text, TurnStats)) or ("error", ApiError).
Emit = Callable[[str, object], None]


@dataclass
class Job:
    request: ChatRequest
    emit: Emit
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def disk_cache(loaded, settings):
    """The slots' snapshots, beside the app's chats' (kv/serve), within kv_disk_budget; None when that is 0."""
    from ..engine.disk_cache import DiskCache
    from ..snapshots import kv_dir

    if settings.kv_disk_budget <= 0:
        return None
    try:
        return DiskCache(kv_dir(settings.data_dir) / "serve", loaded, settings.kv_disk_budget)
    except OSError as exc:
        print(f"chatapp serve: no KV snapshots: {exc}", flush=True)
        return None


def default_slots(loaded) -> int:
    """As many slots as the memory budget holds full-context caches, 1 to MAX_SLOTS (the worker's budget)."""
    from ..engine.worker import cache_budgets

    live, _, per_context = cache_budgets(loaded)
    if not live or not per_context:
        return 1
    return max(1, min(MAX_SLOTS, live // per_context))


class Engine:
    """The model, its slots and the engine thread; `submit` queues a reply and returns its Job at once."""

    def __init__(self, loaded, slots: int, defaults: object = None, disk=None, quiet_s: float = QUIET_S):
        """disk: a DiskCache for the slots' snapshots (None: none). Each slot starts from its snapshot, so a
        restarted server still holds its clients' conversations, and is saved once the server has been
        quiet for quiet_s seconds after a reply, and on close."""
        from ..engine.session import ChatSession

        if slots < 1:
            raise ValueError("a server needs at least one slot")
        self.loaded = loaded
        self.name = loaded.source.label
        self.context_length = loaded.context_length
        #: Sampling values a request doesn't set: the model's own, then `defaults` (config.toml's Settings).
        self.layers = [loaded.sampling_defaults(), defaults] if defaults is not None else [loaded.sampling_defaults()]
        self.slots = [ChatSession(loaded) for _ in range(slots)]
        self.disk = disk
        self.quiet_s = quiet_s
        self._unsaved: set[int] = set()  # slots answered since their last save (only with a disk tier)
        if disk is not None:
            for i, session in enumerate(self.slots):
                disk.restore(i, session, None)
        #: The slot that answered last (for tests and logs).
        self.last = None
        self._used = [0] * slots  # when each slot last answered (a counter), for the least recently used
        self._clock = itertools.count(1)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._current: Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chatapp-serve-engine")
        self._thread.start()

    @property
    def queue_length(self) -> int:
        """Requests waiting, and the one being answered."""
        with self._lock:
            return self._pending

    def submit(self, request: ChatRequest, emit: Emit) -> Job:
        job = Job(request, emit)
        with self._lock:
            self._pending += 1
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Stop the reply in progress (its slot stays consistent), then the thread; the slots' snapshots are on
        disk when this returns."""
        current = self._current
        if current is not None:
            current.cancel.set()
        self._jobs.put(None)
        self._thread.join(timeout=30)
        if self.disk is not None:
            self.disk.close()

    def pick(self, messages, max_new_tokens: int, thinking: bool | None = None) -> int:
        """The index of the slot this conversation should use (see the module doc)."""
        from ..engine.session import common_prefix_len

        ids = self.slots[0].preview_ids(messages, max_new_tokens, thinking)
        shared = [common_prefix_len(ids, list(session.cache_ids)) for session in self.slots]
        # A slot is this conversation's when most of what it holds is this prompt's start: a system prompt or
        # a template's header shared with another chat is not reason enough to wipe that chat's cache.
        mine = [i for i, s in enumerate(self.slots) if shared[i] and shared[i] >= SIMILAR * s.cache_tokens]
        if mine:
            return max(mine, key=lambda i: (shared[i], self._used[i]))
        return min(range(len(self.slots)), key=lambda i: (self.slots[i].cache_tokens > 0, self._used[i]))

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.quiet_s if self._unsaved else None)
            except queue.Empty:
                self._save()
                continue
            if job is None:
                break
            self._current = job
            try:
                if job.cancel.is_set():  # its client left while it waited; its handler still waits for an end
                    job.emit("error", ApiError(400, "the client left before its turn", code="cancelled"))
                else:
                    self._answer(job)
            finally:
                self._current = None
                with self._lock:
                    self._pending -= 1
                job.done.set()
        self._save()

    def _save(self) -> None:
        """Hand the answered slots' caches to the disk tier, which copies them here and writes in the background."""
        for index in sorted(self._unsaved):
            self.disk.save(index, self.slots[index])
        self._unsaved.clear()

    def _answer(self, job: Job) -> None:
        from ..engine.session import Message

        request = job.request
        try:
            params = resolve(request.sampling, *self.layers)
            messages = [Message(role, content) for role, content in request.messages]
            index = self.pick(messages, params.max_new_tokens, request.thinking)
            self._used[index] = next(self._clock)
            self.last = self.slots[index]
            replies = self.slots[index].reply_to(messages, params, job.cancel, request.thinking, stop=request.stop)
            for response in replies:
                if response.text:
                    job.emit("delta", response.text)
                if response.stats is not None:
                    stats = _openai_finish(response.stats, params.max_new_tokens)
                    job.emit("done", (self.slots[index].messages[-1].content, stats))
            if self.disk is not None:  # without a disk tier the engine has nothing to wake for when quiet
                self._unsaved.add(index)
        except ContextOverflow as exc:
            job.emit("error", ApiError(400, first_line(exc), param="messages", code="context_length_exceeded"))
        except ValueError as exc:  # a sampling value the limits refuse, or a template's complaint
            job.emit("error", ApiError(400, first_line(exc)))
        except Exception as exc:  # one line for the client; the server goes on
            job.emit("error", ApiError(500, f"{type(exc).__name__}: {first_line(exc)}"))


def _openai_finish(stats, max_new_tokens: int):
    """The stats with "overflow-trimmed" told apart as OpenAI's stop or length.

    The engine's "overflow-trimmed" (older turns dropped to fit) replaces the reason the reply ended, but an
    API client reads "length" as "raise max_tokens or continue": a trimmed reply that ran out must say so.
    A reply whose stop string or token is exactly its last allowed token reads as "length" here: the stats
    no longer say which came first, and asking for more is harmless then."""
    if stats.finish_reason != "overflow-trimmed":
        return stats
    return replace(stats, finish_reason="length" if stats.generated_tokens >= max_new_tokens else "stop")
