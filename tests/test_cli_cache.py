"""`chatapp cache`: list the KV snapshots with their chats, and clear them by chat, by model or all."""

from __future__ import annotations

import json

import pytest
from chathelpers import Chat

from chatapp.cli import main
from chatapp.engine.disk_cache import DiskCache
from chatapp.snapshots import kv_dir, list_snapshots
from chatapp.store import Store


@pytest.fixture
def data_dir(tmp_path, monkeypatch, tiny_words_fp32):
    data = tmp_path / "data"
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(data))
    with Store.open(data) as store:
        ids = [store.new_conversation(title).id for title in ("Dinner plans", "Trip to Lyon")]
    disk = DiskCache(kv_dir(data), tiny_words_fp32, 1.0)
    for chat_id in ids:
        chat = Chat(tiny_words_fp32)
        chat.send("Tell me about the town and its bridge.", max_new_tokens=4)
        disk.save(chat_id, chat.session, wait=True)
    (kv_dir(data) / "chat99-broken.kv.safetensors").write_bytes(b"not a snapshot")
    return data


def test_cache_lists_each_snapshot_with_its_chat_and_the_total(data_dir, capsys):
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "1 Dinner plans" in out and "2 Trip to Lyon" in out
    assert "total: 2 snapshot(s)" in out and "budget" in out and "1 unreadable file(s)" in out
    assert main(["cache", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert sorted(row["chat"] for row in listing["snapshots"]) == [1, 2]
    assert listing["total_bytes"] == sum(row["bytes"] for row in listing["snapshots"]) > 0
    assert all(row["tokens"] > 10 and row["title"] for row in listing["snapshots"])


def test_cache_clear_by_chat_by_model_and_all(data_dir, capsys, tiny_words_fp32):
    folder = kv_dir(data_dir)
    assert main(["cache", "clear"]) == 2  # clearing nothing by accident
    assert main(["cache", "clear", "--chat", "1"]) == 0
    assert [s.chat_id for s in list_snapshots(folder)[0]] == [2]
    assert main(["cache", "clear", "--model", "someone-else"]) == 0
    assert [s.chat_id for s in list_snapshots(folder)[0]] == [2]
    assert main(["cache", "clear", "--model", tiny_words_fp32.source.label]) == 0
    assert list_snapshots(folder)[0] == []
    assert main(["cache", "clear", "--all"]) == 0
    assert list(folder.iterdir()) == []  # the unreadable file goes with --all
    assert "deleted 1 snapshot(s)" in capsys.readouterr().out
