"""The conversation store: persistence, search, migrations and the errors a user can act on."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest

from chatapp import store as store_mod
from chatapp.errors import ChatappError
from chatapp.store import DB_NAME, MIGRATIONS, ConvSettings, Store, StoreError, default_title, in_tree_order

STATS = {
    "prompt_tokens": 12,
    "prefilled_tokens": 12,
    "generated_tokens": 5,
    "ttft_s": 0.25,
    "decode_tokens_per_s": 41.5,
    "cache_tokens": 17,
    "finish_reason": "stop",
    "trimmed_messages": 0,
}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "data")
    yield s
    s.close()


def test_import_has_no_side_effects_and_no_heavy_imports(tmp_path):
    code = (
        "import sys, chatapp.store; "
        "bad = [m for m in ('textual', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_reopen_restores_everything(tmp_path):
    data = tmp_path / "data"
    s = Store.open(data)
    assert s.path == data / DB_NAME
    settings = ConvSettings(
        system_prompt="Be brief.", temperature=0.2, top_p=None, max_new_tokens=64, top_k=40, min_p=0.05, seed=9
    )
    conv = s.new_conversation("Hello", settings)
    s.add_message(conv.id, "system", "Be brief.")
    s.add_message(conv.id, "user", "hi")
    reply = s.add_message(conv.id, "assistant", "hello there", model="smol", preset="bf16", stats=STATS)
    s.add_message(conv.id, "assistant", "half a rep", model="smol", preset="bf16", stats=STATS, cut=True)
    assert reply.position == 2 and reply.stats == STATS
    s.close()

    s2 = Store(data / DB_NAME)
    [back] = s2.conversations()
    assert (back.id, back.title, back.settings) == (conv.id, "Hello", settings)
    msgs = s2.messages(conv.id)
    assert [m.position for m in msgs] == [0, 1, 2, 3]
    assert [m.role for m in msgs] == ["system", "user", "assistant", "assistant"]
    assert [m.content for m in msgs] == ["Be brief.", "hi", "hello there", "half a rep"]
    assert msgs[2] == reply
    assert msgs[2].stats == STATS and msgs[1].stats is None
    assert (msgs[2].model, msgs[2].preset) == ("smol", "bf16")
    assert [m.cut for m in msgs] == [False, False, False, True]
    s2.close()


def test_wal_and_each_add_is_committed(store):
    conv = store.new_conversation()
    store.add_message(conv.id, "user", "persist me")
    other = sqlite3.connect(store.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = other.execute("SELECT content FROM messages WHERE conversation_id = ?", (conv.id,)).fetchall()
        assert rows == [("persist me",)]
        # Foreign keys are on: deleting the conversation deletes its messages (ON DELETE CASCADE).
        store.delete(conv.id)
        assert other.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (conv.id,)).fetchone()[0] == 0
    finally:
        other.close()


def test_killed_process_loses_nothing(tmp_path):
    code = (
        "import os, signal, sys; from pathlib import Path; from chatapp.store import Store; "
        "s = Store.open(Path(sys.argv[1])); c = s.new_conversation('killed'); "
        "s.add_message(c.id, 'user', 'before the kill'); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert proc.returncode == -9
    with Store.open(tmp_path) as s:
        [conv] = s.conversations()
        assert [m.content for m in s.messages(conv.id)] == ["before the kill"]


def test_search_and_order(store):
    a = store.new_conversation("Python questions")
    b = store.new_conversation("Cooking")
    c = store.new_conversation("Travel")
    store.add_message(b.id, "user", "How long do I boil an EGG?")
    store.add_message(c.id, "assistant", "Ünïcode Straße")
    assert [x.id for x in store.conversations()] == [c.id, b.id, a.id]
    store.add_message(a.id, "user", "what is a list?")
    assert [x.id for x in store.conversations()] == [a.id, c.id, b.id]

    assert [x.id for x in store.conversations("python")] == [a.id]
    assert [x.id for x in store.conversations("egg")] == [b.id]
    assert [x.id for x in store.conversations("STRASSE")] == [c.id]  # casefold, not just ASCII lower
    assert [x.id for x in store.conversations("ünï")] == [c.id]
    assert store.conversations("nothing like this") == []
    assert store.conversations("%") == []  # not a LIKE wildcard
    assert len(store.conversations("  ")) == 3


def test_rename_delete_settings_state(store):
    conv = store.new_conversation()
    other = store.new_conversation("keep")
    store.add_message(other.id, "user", "stay")
    store.rename(conv.id, "Renamed")
    assert store.conversation(conv.id).title == "Renamed"

    settings = ConvSettings(system_prompt="pirate", temperature=1.1, top_p=0.5, max_new_tokens=7)
    store.set_settings(conv.id, settings)
    assert store.conversation(conv.id).settings == settings
    store.set_settings(conv.id, ConvSettings())
    assert store.conversation(conv.id).settings == ConvSettings()

    for i in range(4):
        store.add_message(conv.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    store.delete_from(conv.id, 2)
    assert [m.content for m in store.messages(conv.id)] == ["m0", "m1"]
    assert store.add_message(conv.id, "user", "again").position == 2

    store.delete(conv.id)
    with pytest.raises(StoreError, match="no conversation"):
        store.conversation(conv.id)
    assert store.messages(conv.id) == []
    with closing(sqlite3.connect(store.path)) as db:
        count = db.execute("SELECT count(*) FROM messages WHERE conversation_id = ?", (conv.id,))
        assert count.fetchone()[0] == 0
    assert [m.content for m in store.messages(other.id)] == ["stay"]

    for bad in (
        lambda: store.rename(999, "x"),
        lambda: store.add_message(999, "user", "x"),
        lambda: store.set_settings(999, ConvSettings()),
        lambda: store.add_message(other.id, "bot", "x"),
    ):
        with pytest.raises(StoreError):
            bad()

    assert store.get_state("last_model") is None
    assert store.get_state("last_model", "fallback") == "fallback"
    store.set_state("last_model", "smol")
    store.set_state("last_model", "other")
    store.set_state("last_conversation", str(other.id))
    assert store.get_state("last_model") == "other"
    store.set_state("last_model", None)
    assert store.get_state("last_model") is None
    assert store.get_state("last_conversation") == str(other.id)


def test_state_survives_reopen(tmp_path):
    with Store.open(tmp_path) as s:
        s.set_state("last_preset", "nf4")
    with Store.open(tmp_path) as s:
        assert s.get_state("last_preset") == "nf4"


def test_schema_version(store):
    assert store.schema_version == len(MIGRATIONS) >= 1


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / DB_NAME
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.commit()
    db.close()
    with pytest.raises(StoreError) as err:
        Store(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "newer" in msg
    assert isinstance(err.value, ChatappError)


@pytest.mark.parametrize(
    "garbage",
    [b"this is not a database at all\n" * 50, b"\x00\xff" * 4096, b"SQLite format 3\x00" + b"\xab" * 8000],
)
def test_garbage_file_is_refused_and_untouched(tmp_path, garbage):
    path = tmp_path / DB_NAME
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as err:
        Store.open(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]


def _v1_db(path):
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO conversations (id, title, created, updated) VALUES (1, 'old chat', 1.0, 2.0)")
    db.execute(
        "INSERT INTO messages (conversation_id, position, role, content, created) VALUES (1, 0, 'user', 'hi', 1.5)"
    )
    db.commit()
    db.close()


def test_v1_database_migrates_and_keeps_data(tmp_path):
    path = tmp_path / DB_NAME
    _v1_db(path)
    with Store(path) as s:
        assert s.schema_version == len(MIGRATIONS)
        [conv] = s.conversations()
        assert (conv.title, conv.created, conv.updated, conv.settings) == ("old chat", 1.0, 2.0, ConvSettings())
        assert [(m.role, m.content) for m in s.messages(1)] == [("user", "hi")]
        assert s.add_message(1, "assistant", "hello").position == 1


def test_v1_database_gains_branches(tmp_path):
    path = tmp_path / DB_NAME
    _v1_db(path)
    with Store(path) as s:
        [old] = s.conversations()
        assert (old.parent_id, old.branch_point) == (None, None)
        branch = s.branch(old.id, 0)
        assert s.conversation(branch.id).parent_id == old.id
        assert [(m.role, m.content) for m in s.messages(branch.id)] == [("user", "hi")]
        # The column added by the migration has the same ON DELETE rule as a new database's.
        s.delete(old.id)
        assert s.conversation(branch.id).parent_id is None
    with Store(path) as s:
        assert s.schema_version == len(MIGRATIONS) and [c.id for c in s.conversations()] == [branch.id]


def test_next_migration_is_one_list_entry(tmp_path, monkeypatch):
    path = tmp_path / DB_NAME
    _v1_db(path)
    extra = "ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;"
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, extra])
    with Store(path) as s:
        assert s.schema_version == len(MIGRATIONS) + 1
        assert [c.title for c in s.conversations()] == ["old chat"]
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT pinned FROM conversations").fetchall() == [(0,)]


def test_failed_migration_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / DB_NAME
    _v1_db(path)
    broken = "ALTER TABLE conversations ADD COLUMN pinned INTEGER; SELECT * FROM no_such_table;"
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(StoreError, match="migrate"):
        Store(path)
    db = sqlite3.connect(path)
    # The released migrations each committed; only the broken one was undone.
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    columns = [r[1] for r in db.execute("PRAGMA table_info(conversations)")]
    assert "pinned" not in columns
    db.close()


def _chat(store, title, turns, settings=None):
    conv = store.new_conversation(title, settings)
    for i in range(turns):
        store.add_message(conv.id, "user", f"{title} question {i}")
        store.add_message(conv.id, "assistant", f"{title} answer {i}", model="smol", preset="fp32", stats=STATS)
    return conv


def test_branch_copies_the_messages_up_to_a_point_with_their_stats_and_settings(store):
    settings = ConvSettings(system_prompt="Be brief.", temperature=0.3, top_p=0.9, max_new_tokens=32)
    parent = _chat(store, "Trip", 3, settings)
    store.add_message(parent.id, "user", "cut short")
    store.add_message(parent.id, "assistant", "half", cut=True)
    branch = store.branch(parent.id, 3)
    assert (branch.parent_id, branch.branch_point, branch.title) == (parent.id, 3, "Trip ⑂")
    assert store.conversation(branch.id) == branch and branch.settings == settings
    copied, original = store.messages(branch.id), store.messages(parent.id)
    assert len(copied) == 4 and len(original) == 8
    for new, old in zip(copied, original, strict=False):
        assert new.id != old.id and new.conversation_id == branch.id
        assert (new.position, new.role, new.content, new.model, new.preset, new.stats, new.cut, new.created) == (
            old.position,
            old.role,
            old.content,
            old.model,
            old.preset,
            old.stats,
            old.cut,
            old.created,
        )
    # The copies are the branch's own: the branch goes on without touching its parent.
    assert store.add_message(branch.id, "user", "another way").position == 4
    store.delete_from(branch.id, 2)
    assert len(store.messages(parent.id)) == 8
    assert [c.id for c in store.conversations()][0] == branch.id
    # A branch of a branch keeps one mark; a branch from before the first message holds none.
    again = store.branch(branch.id, -1)
    assert (again.title, again.parent_id, store.messages(again.id)) == ("Trip ⑂", branch.id, [])
    assert store.branch(parent.id, 7).title == "Trip ⑂" and len(store.messages(store.conversations()[0].id)) == 8
    with pytest.raises(StoreError, match="no message at position 8"):
        store.branch(parent.id, 8)
    with pytest.raises(StoreError, match="no conversation"):
        store.branch(999, 0)
    assert len(store.conversations()) == 4  # the failed branches left nothing behind


def test_deleting_a_parent_keeps_its_branches(store):
    parent = _chat(store, "Root", 2)
    branch = store.branch(parent.id, 1)
    grandchild = store.branch(branch.id, 1)
    store.delete(branch.id)
    assert store.conversation(grandchild.id).parent_id is None
    assert [m.content for m in store.messages(grandchild.id)] == ["Root question 0", "Root answer 0"]
    assert store.conversation(parent.id).parent_id is None
    with Store(store.path) as again:
        assert again.conversation(grandchild.id).parent_id is None


def test_tree_order_puts_branches_under_their_parent(store):
    a = _chat(store, "A", 2)
    b = _chat(store, "B", 1)
    a1 = store.branch(a.id, 1)
    a2 = store.branch(a.id, 3)
    a1x = store.branch(a1.id, 0)
    c = _chat(store, "C", 1)
    tree = lambda chats: [(chat.id, depth) for chat, depth in in_tree_order(chats)]  # noqa: E731
    # Most recent first on each level; a parent's place is that of the most recent chat among it and its branches.
    assert tree(store.conversations()) == [(c.id, 0), (a.id, 0), (a1.id, 1), (a1x.id, 2), (a2.id, 1), (b.id, 0)]
    store.add_message(b.id, "user", "later")
    store.add_message(a2.id, "user", "latest")
    assert tree(store.conversations()) == [(a.id, 0), (a2.id, 1), (a1.id, 1), (a1x.id, 2), (b.id, 0), (c.id, 0)]
    # A search that finds a branch without its parent shows the branch on its own.
    assert tree(store.conversations("latest")) == [(a2.id, 0)]
    assert in_tree_order([]) == []


def test_recent_stats_of_one_model_oldest_first(store):
    conv = store.new_conversation()
    for i, model in enumerate(["smol", "big", "smol", "smol"]):
        store.add_message(conv.id, "assistant", "x", model=model, preset="fp32", stats={**STATS, "ttft_s": i})
    store.add_message(conv.id, "assistant", "no stats", model="smol", preset="fp32")
    store.add_message(conv.id, "assistant", "x", model="smol", preset="bf16", stats={**STATS, "ttft_s": 9})
    assert [s["ttft_s"] for s in store.recent_stats("smol", "fp32")] == [0, 2, 3]
    assert [s["ttft_s"] for s in store.recent_stats("smol", "fp32", limit=2)] == [2, 3]
    assert [s["ttft_s"] for s in store.recent_stats()] == [0, 1, 2, 3, 9]
    assert store.recent_stats("nothing") == []


def test_export_markdown(store):
    conv = store.new_conversation("Greetings")
    store.add_message(conv.id, "system", "Be kind.")
    store.add_message(conv.id, "user", "hi\n")
    store.add_message(conv.id, "assistant", "Hello!", model="smol", preset="bf16")
    store.add_message(conv.id, "assistant", "Once upon", model="smol", cut=True)
    store.add_message(conv.id, "assistant", "plain")
    assert store.export_markdown(conv.id) == (
        "# Greetings\n\n"
        "**System**\n\nBe kind.\n\n"
        "**You**\n\nhi\n\n"
        "**Assistant** (smol · bf16)\n\nHello!\n\n"
        "**Assistant** (smol)\n\nOnce upon\n\n*(stopped)*\n\n"
        "**Assistant**\n\nplain\n"
    )


@pytest.mark.parametrize(
    "text, title",
    [
        ("Hello there", "Hello there"),
        ("  what   is\tthis?  \nsecond line", "what is this?"),
        ("\n\n  first real line\nmore", "first real line"),
        ("x" * 40, "x" * 40),
        ("y" * 41, "y" * 39 + "…"),
        ("word " * 20, ("word " * 8).strip() + "…"),
        ("   \n\t", "New chat"),
    ],
)
def test_default_title(text, title):
    assert default_title(text) == title
    assert len(default_title(text)) <= 40


def test_a_replys_thinking_and_a_messages_attachments_are_kept_copied_and_exported(store):
    conv = store.new_conversation("Files", ConvSettings(thinking=False, persona="coder"))
    note = {"name": "notes.md", "kind": "file", "content": "has ``` inside\n"}
    store.add_message(conv.id, "user", "Summarise this", attachments=[note])
    store.add_message(conv.id, "assistant", "It is short.", thinking="Let me read it.", model="m")
    [user, reply] = store.messages(conv.id)
    assert (user.attachments, user.thinking) == ([note], None)
    assert (reply.thinking, reply.attachments, reply.content) == ("Let me read it.", [], "It is short.")
    assert store.conversation(conv.id).settings.thinking is False
    branch = store.branch(conv.id, 1)
    assert [(m.thinking, m.attachments) for m in store.messages(branch.id)] == [(None, [note]), ("Let me read it.", [])]
    assert branch.settings.thinking is False and branch.settings.persona == "coder"
    full = store.export_markdown(conv.id)
    assert "notes.md\n\n````\nhas ``` inside\n````" in full
    assert "<details><summary>thinking</summary>\n\nLet me read it.\n\n</details>\n\nIt is short." in full
    assert "Let me read it." not in store.export_markdown(conv.id, thinking=False)
