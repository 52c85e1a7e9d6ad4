"""The fake worker client speaks the protocol as the real worker does: event order, cache reuse, cancel, kill."""

from __future__ import annotations

import queue
import time

import pytest
from fakeworker import FakeWorkerClient

from chatapp import protocol as p
from chatapp.sampling import SamplingParams


class Events:
    """What the client reports, in order, with a wait for the next event of a kind."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.seen: list[object] = []

    def __call__(self, event) -> None:
        self.queue.put(event)

    def until(self, kind, timeout: float = 5.0) -> list[object]:
        """The events up to and including the first of `kind`."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            got.append(event)
            self.seen.append(event)
            if isinstance(event, kind):
                return got

    def none_within(self, seconds: float) -> bool:
        try:
            self.seen.append(self.queue.get(timeout=seconds))
        except queue.Empty:
            return True
        return False


@pytest.fixture
def worker(settings):
    events = Events()
    clients = []

    def start(**options):
        client = FakeWorkerClient(settings, events, **options)
        clients.append(client)
        client.start()
        client.send(p.Load("some-model", "auto"))
        events.until(p.Loaded)
        return client, events

    yield start
    for client in clients:
        client.stop()


def ask(client, conversation_id: int, messages, max_new_tokens: int = 8) -> int:
    rid = client.request_id()
    assert client.send(p.Generate(rid, conversation_id, messages, SamplingParams(max_new_tokens=max_new_tokens)))
    return rid


def test_load_then_a_streamed_reply_and_its_stats(settings):
    events = Events()
    client = FakeWorkerClient(settings, events, delay=0.0)
    assert not client.alive and client.pid is None
    client.start()
    assert client.alive and client.pid is not None
    client.send(p.Load("some-model", "auto"))
    status, loaded = events.until(p.Loaded)
    assert isinstance(status, p.Status)
    assert (loaded.model, loaded.preset, loaded.device) == ("some-model", "fp32", "cpu")
    assert loaded.attn_implementation == "sdpa"
    assert loaded.context_length == 2048 and loaded.notes == [] and loaded.footprint_bytes > 0

    rid = ask(client, 1, [("user", "hello there")], max_new_tokens=5)
    *deltas, finished = events.until(p.Finished)
    assert all(isinstance(d, p.Delta) and d.request_id == rid for d in deltas) and len(deltas) == 5
    assert (finished.request_id, finished.conversation_id) == (rid, 1)
    assert finished.text == "".join(d.text for d in deltas) == "Echo: hello there Echo: hello"
    stats = finished.stats
    assert stats.prompt_tokens == 4  # "user:", two words, "assistant:"
    assert stats.prefilled_tokens == stats.prompt_tokens and stats.generated_tokens == 5
    assert stats.finish_reason == "length" and stats.cache_tokens == 4 + 5
    (states,) = events.until(p.CacheStates)  # as the real worker, where each chat's cache is, after each turn
    assert (states.live, states.parked, states.disk) == ([1], [], [1])
    client.stop()
    assert not client.alive and events.none_within(0.1)  # a stop is not a death


def test_the_cache_is_reused_per_conversation_and_reset_forgets_it(worker):
    client, events = worker(reply="Fine thanks", delay=0.0)
    first = [("system", "Be brief."), ("user", "How are you")]
    ask(client, 1, first)
    one = events.until(p.Finished)[-1]
    assert one.text == "Fine thanks" and one.stats.finish_reason == "stop"
    second = [*first, ("assistant", one.text), ("user", "And you")]
    ask(client, 1, second)
    two = events.until(p.Finished)[-1].stats
    assert two.prefilled_tokens == len(["user:", "And", "you", "assistant:"])
    # Another conversation has its own cache; regenerating re-runs only the last prompt token.
    ask(client, 2, [("user", "Other chat")])
    assert events.until(p.Finished)[-1].stats.reused_tokens == 0
    ask(client, 1, second)
    assert events.until(p.Finished)[-1].stats.prefilled_tokens == 1
    client.send(p.Reset(1))
    ask(client, 1, second)
    again = events.until(p.Finished)[-1].stats
    assert again.prefilled_tokens == again.prompt_tokens


def test_a_branch_starts_from_a_copy_of_its_parents_cache(worker):
    client, events = worker(reply="Fine thanks", delay=0.0)
    history = [("user", "How are you"), ("assistant", "Fine thanks"), ("user", "And the weather")]
    ask(client, 1, history)
    events.until(p.Finished)
    client.send(p.Branch(2, parent_id=1))
    client.send(p.Branch(3, parent_id=99))  # a parent without a cache: nothing to copy
    branch = [*history[:2], ("user", "Something else")]
    ask(client, 2, branch)
    assert events.until(p.Finished)[-1].stats.prefilled_tokens == len(["Something", "else", "assistant:"])
    ask(client, 3, branch)
    cold = events.until(p.Finished)[-1].stats
    assert cold.prefilled_tokens == cold.prompt_tokens
    # The parent's cache is its own: the branch's reply did not change it.
    ask(client, 1, [*history, ("assistant", "Fine thanks"), ("user", "Bye")])
    assert events.until(p.Finished)[-1].stats.prefilled_tokens == len(["user:", "Bye", "assistant:"])


def test_cancel_stops_the_reply_at_the_next_word(worker):
    client, events = worker(delay=0.02)
    rid = ask(client, 1, [("user", "go on")], max_new_tokens=1000)
    events.until(p.Delta)
    client.send(p.Cancel(rid))
    *deltas, finished = events.until(p.Finished)
    assert finished.stats.finish_reason == "cancelled" and 1 <= finished.stats.generated_tokens < 1000
    assert finished.text.startswith("Echo:") and len(finished.text.split()) == finished.stats.generated_tokens
    # A cancel for a reply that has ended changes nothing.
    client.send(p.Cancel(rid))
    ask(client, 1, [("user", "go on"), ("assistant", finished.text), ("user", "more")], max_new_tokens=3)
    assert events.until(p.Finished)[-1].stats.finish_reason == "length"


def test_kill_reports_the_death_and_start_brings_it_back(worker):
    client, events = worker(delay=0.02)
    ask(client, 1, [("user", "long")], max_new_tokens=1000)
    events.until(p.Delta)
    client.kill()
    assert not client.alive
    rest = events.until(p.WorkerDied)
    assert not any(isinstance(e, p.Finished) for e in rest) and rest[-1].exitcode == -9
    assert events.none_within(0.1)
    assert client.send(p.Load("some-model", "fp32")) is False
    client.start()
    assert client.alive
    rid = ask(client, 1, [("user", "hello")])
    assert events.until(p.Error)[-1] == p.Error("no model is loaded yet", rid)
    client.send(p.Load("some-model", "fp32"))
    assert events.until(p.Loaded)[-1].preset == "fp32"


def test_scripted_failures_and_evictions(worker):
    client, events = worker(reply=["one", "two"], delay=0.0)
    client.send(p.Load("a-broken-model", "fp32"))
    error = events.until(p.Error)[-1]
    assert error.request_id is None and "a-broken-model" in error.message
    client.send(p.Load("some-model", "fp32"))
    events.until(p.Loaded)
    client.fail_next("RuntimeError: out of memory")
    rid = ask(client, 1, [("user", "hi")])
    assert events.until(p.Error)[-1] == p.Error("RuntimeError: out of memory", rid)
    ask(client, 1, [("user", "hi")])
    assert events.until(p.Finished)[-1].text == "one"
    client.evict_after_next([1])
    ask(client, 2, [("user", "hi")])
    *_, finished, evicted = events.until(p.Evicted)
    assert finished.text == "two" and evicted.conversation_ids == [1] and evicted.freed_bytes > 0
    # The evicted conversation reads its history again.
    ask(client, 1, [("user", "hi"), ("assistant", "one"), ("user", "again")])
    stats = events.until(p.Finished)[-1].stats
    assert stats.prefilled_tokens == stats.prompt_tokens


def test_old_messages_are_dropped_to_fit_the_context(worker):
    client, events = worker(reply="ok", delay=0.0, context_length=16)
    history = []
    for turn in range(4):
        history.append(("user", f"message number {turn} here"))
        ask(client, 1, history, max_new_tokens=4)
        finished = events.until(p.Finished)[-1]
        history.append(("assistant", finished.text))
    assert finished.stats.dropped_messages > 0 and finished.stats.prompt_tokens + 4 <= 16
    assert finished.stats.finish_reason in ("overflow-trimmed", "stop")
