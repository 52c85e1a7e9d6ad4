"""Chats' caches on disk (chatapp.engine.disk_cache and snapshot): saved, restored, and every bad file ignored."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest
from chathelpers import Chat, greedy, run

from chatapp import snapshots
from chatapp.engine.disk_cache import DiskCache
from chatapp.engine.session import ChatSession, Message

LONG = "Tell me everything about the river town, its bridge, its market and its floods, in detail please. " * 3


def _chat(loaded, turns: int = 3) -> Chat:
    chat = Chat(loaded)
    for i in range(turns):
        chat.send(f"{LONG} Part {i}.", max_new_tokens=8)
    return chat


def _next(chat: Chat) -> list[Message]:
    return [*(Message(m.role, m.content) for m in chat.history), Message("user", "And what about the clock?")]


def _fresh_turn(loaded, disk: DiskCache, chat_id: int, messages: list[Message]):
    """The next turn in a brand-new session, as a restarted worker answers it."""
    session = ChatSession(loaded)
    restored = disk.restore(chat_id, session, messages)
    return restored, run(session.reply_to(messages, greedy(max_new_tokens=8)))


@pytest.fixture
def disk(tiny_words_fp32, tmp_path):
    return DiskCache(tmp_path / "kv", tiny_words_fp32, budget_gb=1.0)


def test_a_restored_chat_prefills_only_what_a_live_cache_would(tiny_words_fp32, disk):
    chat = _chat(tiny_words_fp32)
    disk.save(7, chat.session, wait=True)
    held = chat.session.cache_tokens
    messages = _next(chat)
    live = run(chat.session.reply_to(messages, greedy(max_new_tokens=8)))  # the worker that never quit
    restored, turn = _fresh_turn(tiny_words_fp32, DiskCache(disk.folder, tiny_words_fp32, 1.0), 7, messages)
    assert restored
    assert turn.stats.prefilled_tokens == live.stats.prefilled_tokens < 40
    assert turn.tokens == live.tokens
    assert turn.stats.cache_note.startswith(f"restored {held:,} tokens from disk in ")
    assert turn.stats.cache_note.endswith(f"; prefilled {live.stats.prefilled_tokens}")


def test_a_snapshot_is_private_and_written_atomically(tiny_words_fp32, disk):
    chat = _chat(tiny_words_fp32, turns=1)
    disk.save(3, chat.session, wait=True)
    path = disk.path(3)
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(disk.folder.stat().st_mode & 0o777) == "0o700"
    assert not list(disk.folder.glob("*.tmp"))  # nothing half-written left beside it
    info = snapshots.info(path)
    assert info.chat_id == 3 and info.tokens == len(chat.session.cache_ids) and info.size_bytes > 0


def _restore_fails(loaded, disk: DiskCache, chat_id: int, messages, live_tokens) -> str:
    restored, turn = _fresh_turn(loaded, disk, chat_id, messages)
    assert not restored
    assert turn.stats.prefilled_tokens == turn.stats.prompt_tokens  # re-read in full...
    assert turn.tokens == live_tokens  # ...with the same reply
    assert not disk.path(chat_id).exists()  # and the bad file is gone
    return turn.stats.cache_note


@pytest.fixture
def saved(tiny_words_fp32, disk):
    chat = _chat(tiny_words_fp32)
    disk.save(5, chat.session, wait=True)
    messages = _next(chat)
    live = run(chat.session.reply_to(messages, greedy(max_new_tokens=8)))
    return messages, live.tokens


def test_a_truncated_snapshot_is_ignored(tiny_words_fp32, disk, saved):
    path = disk.path(5)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    note = _restore_fails(tiny_words_fp32, disk, 5, *saved)
    assert note.startswith("ignored the KV snapshot on disk: it is truncated")


def test_a_snapshot_with_another_key_is_ignored(tiny_words_fp32, disk, saved):
    other = replace(tiny_words_fp32, preset="bf16")  # as if it came from another preset
    theirs = DiskCache(disk.folder, other, 1.0)
    shutil.copy(disk.path(5), theirs.path(5))
    note = _restore_fails(tiny_words_fp32, theirs, 5, *saved)
    assert note == "ignored the KV snapshot on disk: it was made with another model, preset or version"


def test_a_snapshot_whose_tensors_do_not_fit_the_model_is_ignored(tiny_words_fp32, disk, saved):
    import json

    import torch
    from safetensors.torch import save_file

    from chatapp.engine.snapshot import read_ids

    path = disk.path(5)
    _header, meta = snapshots.read_header(path)
    ids = torch.tensor(read_ids(path, disk.key)[0], dtype=torch.int64)
    wrong = {"k.0": torch.zeros(1, 3, meta["tokens"], 8), "v.0": torch.zeros(1, 3, meta["tokens"], 8), "ids": ids}
    save_file(wrong, str(path), metadata={"chatapp": json.dumps(meta)})
    note = _restore_fails(tiny_words_fp32, disk, 5, *saved)
    assert note.startswith("ignored the KV snapshot on disk: its tensors don't fit this model")


def test_garbage_in_place_of_a_snapshot_is_ignored(tiny_words_fp32, disk, saved):
    disk.path(5).write_bytes(os.urandom(4096))
    note = _restore_fails(tiny_words_fp32, disk, 5, *saved)
    assert note.startswith("ignored the KV snapshot on disk:")


def test_a_snapshot_not_worth_reading_is_left_alone(tiny_words_fp32, disk, saved):
    messages, _live = saved
    disk.prefill_tokens_per_s = 1e12  # prefilling would be instant: reading can't win
    restored, turn = _fresh_turn(tiny_words_fp32, disk, 5, messages)
    assert not restored and turn.stats.cache_note == ""
    assert disk.path(5).exists()


def test_the_disk_budget_drops_the_least_recently_used_snapshot(tiny_words_fp32, tmp_path):
    disk = DiskCache(tmp_path / "kv", tiny_words_fp32, budget_gb=1.0)
    chats = [_chat(tiny_words_fp32, turns=1) for _ in range(3)]
    for chat_id, chat in enumerate(chats, 1):
        disk.save(chat_id, chat.session, wait=True)
        os.utime(disk.path(chat_id), (1000 + chat_id, 1000 + chat_id))  # chat 1 the oldest
    sizes = [disk.path(i).stat().st_size for i in (1, 2, 3)]
    disk.budget = int(sizes[1] * 2.5)  # room for two, one of them a little longer
    chats[0].send("Another question about the town.", max_new_tokens=4)
    disk.save(1, chats[0].session, wait=True)  # chat 1 is now the newest; chat 2 the oldest
    assert disk.path(1).exists() and not disk.path(2).exists() and disk.path(3).exists()


def test_forgetting_a_chat_deletes_its_snapshots(tiny_words_fp32, disk):
    chat = _chat(tiny_words_fp32, turns=1)
    disk.save(9, chat.session, wait=True)
    disk.save(10, chat.session, wait=True)
    disk.forget(9)
    assert not disk.path(9).exists() and disk.path(10).exists()


def test_a_save_of_what_the_disk_holds_already_is_skipped(tiny_words_fp32, disk):
    chat = _chat(tiny_words_fp32, turns=1)
    disk.save(4, chat.session, wait=True)
    os.utime(disk.path(4), (1000, 1000))
    disk.save(4, chat.session, wait=True)
    assert disk.path(4).stat().st_mtime == 1000


def test_a_full_disk_loses_the_snapshot_not_the_chat(tiny_words_fp32, disk, monkeypatch):
    from chatapp.engine import snapshot

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "save_file", full)
    chat = _chat(tiny_words_fp32, turns=1)
    disk.save(6, chat.session, wait=True)
    assert not disk.path(6).exists() and not list(disk.folder.glob("*.tmp"))
    assert chat.send("Still here?", max_new_tokens=4).stats.prefilled_tokens < 30


def test_a_sliding_window_cache_survives_a_snapshot(starter_folder, tmp_path, settings):
    from modelhelpers import build_family_model

    from chatapp.engine import load_model

    folder = build_family_model(starter_folder, tmp_path / "gemma3", "gemma3", words_only=True)
    loaded = load_model(str(folder), "fp32", settings=settings)
    disk = DiskCache(tmp_path / "kv", loaded, 1.0)
    chat = _chat(loaded, turns=4)  # hundreds of tokens through a 16-token window
    disk.save(1, chat.session, wait=True)
    messages = _next(chat)
    live = run(chat.session.reply_to(messages, greedy(max_new_tokens=8)))
    restored, turn = _fresh_turn(loaded, disk, 1, messages)
    assert restored and turn.tokens == live.tokens
    assert turn.stats.prefilled_tokens == live.stats.prefilled_tokens < 60


def test_a_chat_that_outgrew_its_context_is_restored_as_it_will_be_rendered(tiny_words_fp32, disk):
    """The read-or-prefill rule compares the snapshot with the prompt after old turns are dropped to fit."""
    chat = Chat(tiny_words_fp32, context_length=260)
    for i in range(5):
        chat.send(f"{LONG} Part {i}.", max_new_tokens=8)
    assert chat.session.dropped_messages > 0
    disk.save(2, chat.session, wait=True)
    messages = _next(chat)
    session = ChatSession(tiny_words_fp32, context_length=260)
    assert disk.restore(2, session, messages, room=8)
    turn = run(session.reply_to(messages, greedy(max_new_tokens=8)))
    assert turn.stats.prefilled_tokens < turn.stats.prompt_tokens / 2
