"""The conversation database on a full disk, damaged, or read-only: one line, how to recover, nothing lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from diskhelpers import damage_pages, fill_up, lock, many_chats, sha, small_disk, unlock

from chatapp.store import DB_NAME, Store, StoreDamaged, StoreFull


@pytest.fixture
def filled_db(tmp_path):
    """A database of 600 messages (about 200 pages), closed."""
    data = tmp_path / "data"
    with Store.open(data) as store:
        many_chats(store)
    return data / DB_NAME


def test_a_write_on_a_full_disk_is_rolled_back_whole_and_can_be_retried(tmp_path):
    with small_disk(tmp_path / "disk") as disk, Store.open(disk / "data") as store:
        chat = store.new_conversation()
        store.add_message(chat.id, "user", "before")
        filler = fill_up(disk)
        for write in (
            lambda: store.add_message(chat.id, "user", "long " * 5000),
            lambda: store.new_conversation("another"),
            lambda: store.rename(chat.id, "renamed " * 500),
        ):
            with pytest.raises(StoreFull, match=f"the disk holding {store.path} is full, so nothing was saved"):
                write()
        assert [m.content for m in store.messages(chat.id)] == ["before"]
        assert [c.title for c in store.conversations()] == ["New chat"]
        filler.unlink()
        store.add_message(chat.id, "user", "long " * 5000)
        assert len(store.messages(chat.id)) == 2


def test_a_damaged_database_is_refused_at_open_and_left_as_it_was(filled_db):
    damage_pages(filled_db)
    before = sha(filled_db)
    with pytest.raises(StoreDamaged) as caught:
        Store.open(filled_db.parent)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{filled_db} is damaged" in message
    assert f"sqlite3 {filled_db} .recover" in message and "move it aside" in message
    assert sha(filled_db) == before


def test_a_read_only_database_is_refused_at_open_and_left_as_it_was(filled_db):
    before = sha(filled_db)
    assert lock(filled_db)
    try:
        with pytest.raises(StoreDamaged, match=f"{filled_db} is read-only, so chatapp can't keep chats in it"):
            Store.open(filled_db.parent)
    finally:
        unlock(filled_db)
    assert sha(filled_db) == before


def test_damage_found_later_stops_every_read_and_write(filled_db):
    store = Store.open(filled_db.parent)
    chats = store.conversations()
    damage_pages(filled_db)
    # Another writer's commit makes this connection read the file again instead of its page cache.
    other = sqlite3.connect(filled_db, isolation_level=None)
    other.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('other', '1')")
    other.close()
    with pytest.raises(StoreDamaged, match="is damaged .*chatapp has stopped using it"):
        for chat in chats:
            store.messages(chat.id)
    for after in (lambda: store.add_message(chats[0].id, "user", "lost?"), lambda: store.get_state("other")):
        with pytest.raises(StoreDamaged):
            after()
    store.close()


def _tui(data_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "CHATAPP_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("fault", ["damaged", "read-only"])
def test_the_app_refuses_a_database_it_cant_use_in_one_line_and_exits_1(filled_db, fault):
    if fault == "damaged":
        damage_pages(filled_db)
    before = sha(filled_db)
    locked = fault == "read-only" and lock(filled_db)
    try:
        out = _tui(filled_db.parent)
    finally:
        if locked:
            unlock(filled_db)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, lines
    assert lines[0].startswith(f"chatapp: error: {filled_db} is {fault}")
    assert "move it aside" in lines[0]
    assert sha(filled_db) == before
