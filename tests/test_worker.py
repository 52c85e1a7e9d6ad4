"""The backend worker in its own process, driven through the protocol the UI uses."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from chatapp import protocol as p
from chatapp.sampling import SamplingParams
from chatapp.worker_client import WorkerClient


class Events:
    """Collects the worker's events and waits for the ones a test needs."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.seen: list = []

    def __call__(self, event) -> None:
        self.queue.put(event)

    def wait(self, kind, timeout: float = 120.0, where=lambda e: True):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.seen.append(event)
            if isinstance(event, p.Error) and kind is not p.Error:
                raise AssertionError(f"worker error: {event.message}")
            if isinstance(event, kind) and where(event):
                return event
        raise AssertionError(f"no {kind.__name__} within {timeout}s; saw {[type(e).__name__ for e in self.seen]}")


@pytest.fixture
def own_settings(settings, tmp_path):
    """The session's settings with a data folder of this test's own, so snapshots don't cross tests."""
    from dataclasses import replace

    return replace(settings, data_dir=tmp_path / "data")


@pytest.fixture
def worker(own_settings, tiny_words_folder, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    yield client, events
    client.stop()


def ask(client, events, conversation_id, messages, **params):
    rid = client.request_id()
    client.send(p.Generate(rid, conversation_id, messages, SamplingParams(temperature=0.0, **params)))
    return events.wait(p.Finished, where=lambda e: e.request_id == rid)


def test_streams_deltas_then_finished_and_each_chat_keeps_its_cache(worker):
    client, events = worker
    first = ask(client, events, 1, [("user", "Hello there")], max_new_tokens=8)
    deltas = [e.text for e in events.seen if isinstance(e, p.Delta) and e.request_id == first.request_id]
    assert "".join(deltas).strip() == first.text.strip() and first.text
    assert first.stats.prefilled_tokens == first.stats.prompt_tokens

    other = ask(client, events, 2, [("user", "A different chat")], max_new_tokens=8)
    assert other.stats.prefilled_tokens == other.stats.prompt_tokens
    # Back to chat 1: its cache is still there, so only the new message (and the template's glue) is prefilled.
    again = ask(
        client, events, 1, [("user", "Hello there"), ("assistant", first.text), ("user", "And more")], max_new_tokens=8
    )
    assert 0 < again.stats.prefilled_tokens < again.stats.prompt_tokens - first.stats.prompt_tokens + 1
    assert again.stats.reused_tokens >= first.stats.prompt_tokens


def test_a_branch_starts_from_a_copy_of_its_parents_cache(worker, tiny_words_folder):
    from transformers import AutoTokenizer

    client, events = worker
    history: list[tuple[str, str]] = []
    for question in ("Hello there", "Tell me about the bridge", "And the floods?"):
        history.append(("user", question))
        history.append(("assistant", ask(client, events, 1, history, max_new_tokens=8).text))
    client.send(p.Branch(2, parent_id=1))
    edit = "What about the mill pond?"
    first = ask(client, events, 2, [*history[:4], ("user", edit)], max_new_tokens=8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_words_folder)
    glue = len(tokenizer(f"{edit}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert first.stats.prefilled_tokens == glue < first.stats.prompt_tokens
    # The parent keeps its own cache: its next turn, too, reads only the new message.
    nxt = ask(client, events, 1, [*history, ("user", "Thanks")], max_new_tokens=8)
    assert nxt.stats.prefilled_tokens < 16 and nxt.stats.reused_tokens > first.stats.prompt_tokens
    # A parent the worker holds no cache for: nothing to copy, and the branch's first reply reads it all.
    client.send(p.Branch(3, parent_id=99))
    cold = ask(client, events, 3, [*history[:4], ("user", edit)], max_new_tokens=8)
    assert cold.stats.prefilled_tokens == cold.stats.prompt_tokens == first.stats.prompt_tokens


def test_cancel_stops_a_reply_and_keeps_the_partial_text(worker):
    client, events = worker
    rid = client.request_id()
    client.send(p.Generate(rid, 1, [("user", "Talk for a long time")], SamplingParams(1500, temperature=0.0)))
    events.wait(p.Delta, where=lambda e: e.request_id == rid)
    client.send(p.Cancel(rid))
    done = events.wait(p.Finished, where=lambda e: e.request_id == rid)
    assert done.stats.finish_reason == "cancelled"
    assert 0 < done.stats.generated_tokens < 1500
    # The next turn in the same chat works and reuses the cache of the cut reply.
    nxt = ask(
        client,
        events,
        1,
        [("user", "Talk for a long time"), ("assistant", done.text), ("user", "Short")],
        max_new_tokens=4,
    )
    assert nxt.stats.reused_tokens > 0


def test_least_recently_used_chat_is_evicted_over_the_budget(own_settings, tiny_words_folder, tmp_path):
    from dataclasses import replace

    # The tiny model's KV cache is 2 layers x 2 heads x 16 dims x 4 bytes x 2 = 512 bytes a token.
    no_snapshots = replace(own_settings, kv_disk_budget=0)
    client, events = _start(no_snapshots, tiny_words_folder, tmp_path, cache_budget_bytes=512 * 60)
    try:
        ask(client, events, 1, [("user", "one " * 20)], max_new_tokens=4)
        ask(client, events, 2, [("user", "two " * 20)], max_new_tokens=4)
        evicted = events.wait(p.Evicted)
        assert evicted.conversation_ids == [1] and evicted.freed_bytes > 0
        # Without snapshots, chat 1 comes back with a full prefill: its cache was dropped.
        back = ask(client, events, 1, [("user", "one " * 20), ("assistant", "x"), ("user", "hi")], max_new_tokens=4)
        assert back.stats.prefilled_tokens == back.stats.prompt_tokens
    finally:
        client.stop()


def test_a_killed_worker_is_reported_and_a_new_one_starts(worker, tiny_words_folder):
    client, events = worker
    client.kill()
    died = events.wait(p.WorkerDied)
    assert died.exitcode == -9
    client.start()
    client.send(p.Load(str(tiny_words_folder), "fp32"))
    events.wait(p.Loaded)
    assert ask(client, events, 1, [("user", "Still there?")], max_new_tokens=4).text


def test_a_bad_model_is_one_error_line_and_the_worker_stays_up(worker):
    client, events = worker
    client.send(p.Load("no-such-model-anywhere", "fp32"))
    error = events.wait(p.Error)
    assert "no-such-model-anywhere" in error.message and "\n" not in error.message
    assert client.alive


@contextmanager
def _worker_here(settings, monkeypatch, seen: list):
    """A Worker in this process whose events are noted in `seen` by type name, over a pipe closed afterwards."""
    import multiprocessing

    from chatapp.engine import worker as worker_module

    ours, theirs = multiprocessing.Pipe()
    try:
        worker = worker_module.Worker(theirs, settings)
        monkeypatch.setattr(worker, "send", lambda event: seen.append(type(event).__name__))
        yield worker
    finally:
        ours.close()
        theirs.close()


def test_a_failed_load_gives_the_device_its_memory_back_before_the_app_asks_again(own_settings, monkeypatch):
    """A load that fails part way (CUDA out of memory) leaves its tensors behind until the exception is gone; the
    worker frees them then, before its next request (the app's reload of the previous model), which must fit.

    In this process, with the one-line device call counted in place of torch's: there is no GPU here. The memory
    itself is measured by bench/gpu_check.py's oom step on a GPU.
    """
    from chatapp.engine import worker as worker_module

    seen = []
    monkeypatch.setattr(worker_module, "_empty_device_cache", lambda: seen.append("freed"))
    with _worker_here(own_settings, monkeypatch, seen) as worker:
        worker.handle(p.Load("no-such-model-anywhere", "fp32"))
    assert seen == ["freed", "Error", "freed"] and worker.loaded is None


@pytest.mark.parametrize("unused, trimmed", [(2 * 1024**3, True), (512 * 1024**2, False)])
def test_after_a_turn_a_cache_holding_over_a_gib_unused_goes_back_to_the_driver(unused, trimmed, monkeypatch):
    """bitsandbytes' int8 prefill left torch's cache holding 7 GB more than its tensors on an H200 (bench/GPU.md);
    the worker gives such a surplus back after each turn, and leaves a small one (a cudaFree costs a sync). torch's
    counters are set here: there is no GPU."""
    import torch

    from chatapp.engine import worker as worker_module

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 9 * 1024**3)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 9 * 1024**3 + unused)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    worker_module._trim_device_cache()
    assert emptied == ([True] if trimmed else [])


def test_every_turn_ends_with_the_trim(own_settings, tiny_folder, monkeypatch):
    from chatapp.engine import worker as worker_module
    from chatapp.sampling import SamplingParams

    seen = []
    monkeypatch.setattr(worker_module, "_trim_device_cache", lambda: seen.append("trim"))
    with _worker_here(own_settings, monkeypatch, seen) as worker:
        worker.handle(p.Load(str(tiny_folder), "fp32"))
        worker.handle(p.Generate(1, 1, [("user", "hi")], SamplingParams(temperature=0.0, max_new_tokens=2)))
    finished = seen.index("Finished")
    assert "trim" not in seen[:finished] and "trim" in seen[finished:]


def test_the_client_module_does_not_import_torch():
    code = "import sys, chatapp.worker_client, chatapp.engine.worker; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shutdown_stops_a_reply_in_progress_and_exits_cleanly(worker):
    client, events = worker
    rid = client.request_id()
    client.send(p.Generate(rid, 1, [("user", "Talk for a long time")], SamplingParams(1900, temperature=0.0)))
    events.wait(p.Delta, where=lambda e: e.request_id == rid)
    client.stop(timeout=30)
    assert client.process.exitcode == 0  # it exited on its own instead of being killed
    done = events.wait(p.Finished, where=lambda e: e.request_id == rid, timeout=5)
    assert done.stats.finish_reason == "cancelled"  # the shutdown cut the reply short


def test_a_cancel_sent_before_its_reply_starts_still_stops_it(worker):
    client, events = worker
    busy, queued = client.request_id(), client.request_id()
    client.send(p.Generate(busy, 1, [("user", "Talk for a long time")], SamplingParams(300, temperature=0.0)))
    client.send(p.Generate(queued, 2, [("user", "Talk for a long time")], SamplingParams(1500, temperature=0.0)))
    client.send(p.Cancel(queued))  # the worker is still busy with the first request
    events.wait(p.Finished, where=lambda e: e.request_id == busy)
    done = events.wait(p.Finished, where=lambda e: e.request_id == queued)
    assert done.stats.finish_reason == "cancelled" and done.stats.generated_tokens == 1


LONG = "Tell me everything about the river town, its bridge, its market and its floods, in detail please. " * 3


def _start(own_settings, folder, tmp_path, **load):
    events = Events()
    client = WorkerClient(own_settings, events, log_path=tmp_path / "worker.log")
    client.start()
    client.send(p.Load(str(folder), "fp32", **load))
    events.wait(p.Loaded)
    return client, events


def _talk(client, events, chat_id: int, turns: int = 3) -> list[tuple[str, str]]:
    history: list[tuple[str, str]] = []
    for i in range(turns):
        history.append(("user", f"{LONG} Part {i}."))
        history.append(("assistant", ask(client, events, chat_id, history, max_new_tokens=6).text))
    return history


def _expected_prefill(tiny_words_fp32, history, question) -> int:
    """What the next turn prefills in a session that never left memory."""
    from chathelpers import greedy, run

    from chatapp.engine.session import ChatSession, Message

    session = ChatSession(tiny_words_fp32)
    messages = [Message(role, text) for role, text in history]
    for end in range(1, len(messages) + 1, 2):
        run(session.reply_to(messages[:end], greedy(max_new_tokens=6)))
    return run(
        session.reply_to([*messages, Message("user", question)], greedy(max_new_tokens=6))
    ).stats.prefilled_tokens


def test_quit_and_reopen_restores_a_chat_from_disk(own_settings, tiny_words_folder, tiny_words_fp32, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    history = _talk(client, events, 1)
    client.stop(timeout=30)
    assert client.process.exitcode == 0
    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    try:
        back = ask(client, events, 1, [*history, ("user", "And the clock?")], max_new_tokens=6)
    finally:
        client.stop()
    assert back.stats.prefilled_tokens == _expected_prefill(tiny_words_fp32, history, "And the clock?")
    assert back.stats.cache_note.startswith("restored ")


def test_a_kill_minus_9_loses_nothing_once_the_turn_was_saved(own_settings, tiny_words_folder, tmp_path):
    from chatapp.snapshots import kv_dir, list_snapshots

    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    history = _talk(client, events, 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
        s.tokens > 200 for s in list_snapshots(kv_dir(own_settings.data_dir))[0]
    ):
        time.sleep(0.1)  # the after-turn save runs in the background
    client.kill()
    events.wait(p.WorkerDied)
    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    try:
        back = ask(client, events, 1, [*history, ("user", "And the clock?")], max_new_tokens=6)
    finally:
        client.stop()
    assert back.stats.prefilled_tokens < 30 and back.stats.cache_note.startswith("restored ")


def test_an_evicted_chat_comes_back_from_disk(own_settings, tiny_words_folder, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path, cache_budget_bytes=512 * 300)
    try:
        first = _talk(client, events, 1, turns=2)
        _talk(client, events, 2, turns=2)
        # Chat 2's cache pushes chat 1's out during its turns (the budget counts the caches' reserved room).
        evicted = [e for e in events.seen if isinstance(e, p.Evicted)] or [events.wait(p.Evicted)]
        assert evicted[0].conversation_ids == [1]
        back = ask(client, events, 1, [*first, ("user", "And the clock?")], max_new_tokens=6)
    finally:
        client.stop()
    assert back.stats.prefilled_tokens < 30 and back.stats.cache_note.startswith("restored ")


def test_a_switch_to_another_model_and_back_restores_the_chat(own_settings, tiny_words_folder, tiny_folder, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    try:
        history = _talk(client, events, 1, turns=2)
        client.send(p.Load(str(tiny_folder), "fp32"))
        events.wait(p.Loaded)
        other = ask(client, events, 1, [*history, ("user", "And the clock?")], max_new_tokens=6)
        assert other.stats.prefilled_tokens == other.stats.prompt_tokens  # another model: nothing to reuse
        client.send(p.Load(str(tiny_words_folder), "fp32"))
        events.wait(p.Loaded)
        back = ask(client, events, 1, [*history, ("user", "And the bridge?")], max_new_tokens=6)
    finally:
        client.stop()
    assert back.stats.prefilled_tokens < 30 and back.stats.cache_note.startswith("restored ")


def test_forgetting_a_chat_deletes_its_snapshots(own_settings, tiny_words_folder, tmp_path):
    from chatapp.snapshots import kv_dir, list_snapshots

    client, events = _start(own_settings, tiny_words_folder, tmp_path)
    try:
        _talk(client, events, 1, turns=1)
        _talk(client, events, 2, turns=1)
        client.send(p.Reset(1))
        ask(client, events, 3, [("user", "hi")], max_new_tokens=2)  # the Reset was handled before this
    finally:
        client.stop()
    assert sorted(s.chat_id for s in list_snapshots(kv_dir(own_settings.data_dir))[0]) == [2, 3]


def test_an_evicted_chat_parks_in_ram_before_it_goes_to_disk(own_settings, tiny_words_folder, tmp_path):
    """With a GPU, caches evicted from it wait in CPU RAM; here the parked budget is set by hand on a CPU."""
    per_chat = 512 * 256  # a two-turn chat of the tiny model: the 256 tokens of room its cache takes (kvcache.STEP)
    client, events = _start(
        own_settings, tiny_words_folder, tmp_path, cache_budget_bytes=per_chat, parked_budget_bytes=per_chat * 3 // 2
    )
    try:
        chats = {cid: _talk(client, events, cid, turns=2) for cid in (1, 2)}
        assert [(e.conversation_ids, e.parked) for e in events.seen if isinstance(e, p.Evicted)] == [([], [1])]
        chats[3] = _talk(client, events, 3, turns=1)
        evicted = events.wait(p.Evicted)  # it follows the reply's Finished
        assert (evicted.conversation_ids, evicted.parked) == ([1], [2])  # 1 went on to disk, 2 to RAM
        states = events.wait(p.CacheStates)
        assert states.live == [3] and states.parked == [2] and 1 in states.disk
        from_ram = ask(client, events, 2, [*chats[2], ("user", "And the clock?")], max_new_tokens=6)
        from_disk = ask(client, events, 1, [*chats[1], ("user", "And the clock?")], max_new_tokens=6)
    finally:
        client.stop()
    assert from_ram.stats.prefilled_tokens < 30 and from_ram.stats.cache_note == ""
    assert from_disk.stats.prefilled_tokens < 30 and from_disk.stats.cache_note.startswith("restored ")


def test_a_branch_of_a_chat_whose_cache_is_on_disk_starts_from_the_snapshot(own_settings, tiny_words_folder, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path, cache_budget_bytes=512 * 200)
    try:
        parent = _talk(client, events, 1, turns=2)
        _talk(client, events, 2, turns=2)  # pushes chat 1 out of memory, onto disk
        gone = [e for e in events.seen if isinstance(e, p.Evicted) and 1 in e.conversation_ids]
        assert gone or events.wait(p.Evicted, where=lambda e: 1 in e.conversation_ids)
        client.send(p.Branch(3, 1))
        branch = ask(client, events, 3, [*parent[:2], ("user", "Something else about the bridge?")], max_new_tokens=6)
    finally:
        client.stop()
    assert branch.stats.prefilled_tokens < 30 and branch.stats.cache_note.startswith("restored ")


def test_the_worker_log_is_private(worker, tmp_path):
    assert (tmp_path / "worker.log").stat().st_mode & 0o777 == 0o600


def test_a_broken_user_catalog_does_not_stop_a_model_from_loading(own_settings, tiny_words_folder, tmp_path):
    from dataclasses import replace

    config = tmp_path / "config"
    config.mkdir()
    (config / "models.toml").write_text("[models.mine\nname = 'unclosed")
    client, events = _start(replace(own_settings, config_dir=config), tiny_words_folder, tmp_path)
    try:
        assert ask(client, events, 1, [("user", "Hello")], max_new_tokens=3).text
    finally:
        client.stop()
    assert "not valid TOML" in (tmp_path / "worker.log").read_text()


def test_a_load_with_a_draft_model_drafts_every_chat(own_settings, tiny_words_folder, tmp_path):
    client, events = _start(own_settings, tiny_words_folder, tmp_path, draft=str(tiny_words_folder))
    try:
        loaded = next(e for e in events.seen if isinstance(e, p.Loaded))
        assert loaded.draft == str(tiny_words_folder)
        assert any("drafting with" in note for note in loaded.notes)
        first = ask(client, events, 1, [("user", "Hello there")], max_new_tokens=8)
        assert first.stats.drafted_tokens > 0 and first.stats.accepted_tokens == first.stats.drafted_tokens
    finally:
        client.stop()


@pytest.mark.parametrize(
    "given",
    [{}, {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:256"}, {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}],
)
def test_the_worker_asks_for_expandable_segments_unless_the_user_set_the_allocator(given):
    from chatapp.engine.worker import set_environment

    environ = dict(given)
    set_environment(environ)
    allocator = {k: v for k, v in environ.items() if "ALLOC_CONF" in k}
    assert allocator == (given or {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert environ["TOKENIZERS_PARALLELISM"] == "false"
