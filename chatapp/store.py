"""Conversations, messages and UI state in one SQLite file in the user data dir (stdlib sqlite3 only)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields, replace
from pathlib import Path

from .errors import ChatappError
from .private import private_file

DB_NAME = "chatapp.db"
ROLES = ("user", "assistant", "system")
#: Ends the title of a branch.
BRANCH_MARK = "⑂"

#: MIGRATIONS[i] takes the schema from version i to i + 1. Never edit a released entry; append a new one.
MIGRATIONS: list[str] = [
    # 0 -> 1: first release.
    """
    CREATE TABLE conversations (
        id             INTEGER PRIMARY KEY,
        title          TEXT NOT NULL,
        created        REAL NOT NULL,
        updated        REAL NOT NULL,
        system_prompt  TEXT NOT NULL DEFAULT '',
        temperature    REAL,
        top_p          REAL,
        max_new_tokens INTEGER
    );
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position        INTEGER NOT NULL,
        role            TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
        content         TEXT NOT NULL,
        model           TEXT,
        preset          TEXT,
        stats           TEXT,
        cut             INTEGER NOT NULL DEFAULT 0,
        created         REAL NOT NULL,
        UNIQUE (conversation_id, position)
    );
    CREATE INDEX conversations_by_updated ON conversations(updated);
    CREATE TABLE state (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 1 -> 2: branches. A branch outlives its parent: deleting the parent leaves it a chat of its own.
    """
    ALTER TABLE conversations ADD COLUMN parent_id INTEGER REFERENCES conversations(id) ON DELETE SET NULL;
    ALTER TABLE conversations ADD COLUMN branch_point INTEGER;
    CREATE INDEX conversations_by_parent ON conversations(parent_id);
    """,
    # 2 -> 3: the rest of the sampling parameters, per chat.
    """
    ALTER TABLE conversations ADD COLUMN top_k INTEGER;
    ALTER TABLE conversations ADD COLUMN min_p REAL;
    ALTER TABLE conversations ADD COLUMN repetition_penalty REAL;
    ALTER TABLE conversations ADD COLUMN seed INTEGER;
    """,
    # 3 -> 4: a chat's persona, by key (see personas.py); a key whose file is gone means none.
    """
    ALTER TABLE conversations ADD COLUMN persona TEXT;
    """,
    # 4 -> 5: thinking on or off per chat; a reply's thinking kept apart from its answer; a message's attachments
    # (JSON: [{"name", "kind", "content"}]), kept whole so export and reopen show what was sent.
    """
    ALTER TABLE conversations ADD COLUMN thinking INTEGER;
    ALTER TABLE messages ADD COLUMN thinking TEXT;
    ALTER TABLE messages ADD COLUMN attachments TEXT;
    """,
]

_SQLITE_HEADER = b"SQLite format 3\x00"


class StoreError(ChatappError):
    """The conversation database can't be opened or doesn't hold what was asked for."""


class StoreFull(StoreError):
    """A write found the disk full. It was rolled back whole, so it can simply be tried again."""


class StoreDamaged(StoreError):
    """The database is corrupt or read-only. Nothing more is read from or written to it, so nothing is made worse."""


def _how_to_recover(path: Path) -> str:
    return (
        f"move it aside to start afresh, or recover what it holds with "
        f"`sqlite3 {path} .recover | sqlite3 {path}.recovered` and move that into its place"
    )


@dataclass
class ConvSettings:
    """A chat's own settings; each is a column of conversations, by the same name."""

    system_prompt: str = ""
    #: None means "not set here": the model's default, else config.toml's (see sampling.LIMITS).
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    #: The persona's key: its system prompt and sampling apply where the chat sets none of its own.
    persona: str | None = None
    #: Thinking on or off, where the model's template has the switch (None: the persona's, else the template's).
    thinking: bool | None = None


_SETTINGS = tuple(f.name for f in fields(ConvSettings))
_MESSAGE_COLUMNS = (
    "id, conversation_id, position, role, content, model, preset, stats, cut, created, thinking, attachments"
)


@dataclass
class Conversation:
    id: int
    title: str
    #: Unix times.
    created: float
    updated: float
    settings: ConvSettings
    #: The chat this one was branched from (None: not a branch, or its parent was deleted).
    parent_id: int | None = None
    #: The position, in the parent, of the last message the branch copied (-1: none).
    branch_point: int | None = None


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    #: 0, 1, 2... order inside the conversation.
    position: int
    role: str
    content: str
    model: str | None
    preset: str | None
    #: A TurnStats.as_dict(); JSON in the DB.
    stats: dict | None
    #: A reply that was stopped before it finished.
    cut: bool
    created: float
    #: A reply's thinking, apart from its answer in content (None: it had none).
    thinking: str | None = None
    #: Files and large pastes sent with the message: [{"name", "kind", "content"}], content being what was typed.
    attachments: list[dict] = field(default_factory=list)


def _sidecars(path: Path) -> tuple[Path, Path]:
    return Path(f"{path}-wal"), Path(f"{path}-shm")


def default_title(text: str) -> str:
    """A title from a user's first message: its first line, whitespace collapsed, at most 40 characters."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if not line:
        return "New chat"
    return line if len(line) <= 40 else line[:39].rstrip() + "…"


def in_tree_order(chats: list[Conversation]) -> list[tuple[Conversation, int]]:
    """Each chat with its depth, branches right under their parent; on each level the chat with the most recent
    activity in it or its branches comes first. A branch whose parent is not in `chats` stands on its own."""
    ids = {c.id for c in chats}
    children: dict[int | None, list[Conversation]] = {}
    for chat in chats:
        children.setdefault(chat.parent_id if chat.parent_id in ids else None, []).append(chat)
    latest: dict[int, float] = {}

    def last(chat: Conversation) -> float:
        if chat.id not in latest:
            latest[chat.id] = max([chat.updated, *(last(c) for c in children.get(chat.id, []))])
        return latest[chat.id]

    out: list[tuple[Conversation, int]] = []

    def walk(parent: int | None, depth: int) -> None:
        for chat in sorted(children.get(parent, []), key=lambda c: (last(c), c.id), reverse=True):
            out.append((chat, depth))
            walk(chat.id, depth + 1)

    walk(None, 0)
    return out


def _casefold(value: str | None) -> str:
    return value.casefold() if value else ""


class Store:
    """One open database. Every write commits before returning, so a killed app loses nothing already added."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._damaged: StoreDamaged | None = None
        self._db = self._connect()
        private_file(self.path)  # chats are private; SQLite's -wal and -shm take the database file's mode
        self._last_time = self._db.execute("SELECT coalesce(max(updated), 0) FROM conversations").fetchone()[0]

    @classmethod
    def open(cls, data_dir: Path) -> Store:
        from .private import private_dir

        return cls(private_dir(Path(data_dir)) / DB_NAME)

    def _connect(self) -> sqlite3.Connection:
        # Look at the header ourselves: SQLite would only notice on first use, and any write could damage the file.
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_HEADER))
        except FileNotFoundError:
            head = b""
        except OSError as e:
            raise StoreError(f"can't read the conversation database {self.path}: {e.strerror or e}") from None
        if head and head != _SQLITE_HEADER:
            raise StoreError(f"{self.path} is not a SQLite database; move it aside and restart (it was left untouched)")
        if head and not all(os.access(f, os.W_OK) for f in (self.path, *_sidecars(self.path)) if f.exists()):
            # SQLite would open it read-only without a word, and the first message sent would be lost.
            raise StoreDamaged(
                f"{self.path} is read-only, so chatapp can't keep chats in it; make it writable "
                f"(chmod u+w, or chattr -i), or move it aside to start afresh (it was left untouched)"
            )
        try:
            # isolation_level=None: we open transactions ourselves, so each commit happens exactly where we say.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        except sqlite3.Error as e:
            raise StoreError(f"can't open the conversation database {self.path}: {e}") from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{self.path} has schema version {version}, newer than this chatapp knows "
                    f"({len(MIGRATIONS)}); upgrade chatapp"
                )
            if head:
                # Read every page before the first write: a damaged file is left exactly as it was found.
                verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if verdict != "ok":
                    verdict = verdict.splitlines()[-1]  # the first line only says "*** in database main ***"
                    raise StoreDamaged(
                        f"{self.path} is damaged ({verdict}), so chatapp won't touch it; {_how_to_recover(self.path)}"
                    )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            # FULL: a committed message survives a power cut too, not only a killed process.
            db.execute("PRAGMA synchronous=FULL")
            db.create_function("casefold", 1, _casefold, deterministic=True)
            self._migrate(db, version)
        except StoreError:
            db.close()
            raise
        except sqlite3.Error as e:
            db.close()
            raise self._fault(e, "open") from None
        return db

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        while version < len(MIGRATIONS):
            # executescript commits any open transaction first, so BEGIN/COMMIT go inside the script.
            script = f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\nPRAGMA user_version = {version + 1};\nCOMMIT;"
            try:
                db.executescript(script)
            except sqlite3.Error as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                # Another chatapp opened the same file at the same moment and migrated it first.
                now = db.execute("PRAGMA user_version").fetchone()[0]
                if now > version:
                    version = now
                    continue
                raise StoreError(f"can't migrate {self.path} from schema version {version}: {e}") from None
            version += 1

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._conn().execute("PRAGMA user_version").fetchone()[0]

    def _conn(self) -> sqlite3.Connection:
        if self._damaged is not None:
            raise self._damaged
        if self._db is None:
            raise StoreError(f"the conversation database {self.path} is closed")
        return self._db

    def _fault(self, e: sqlite3.Error, doing: str) -> StoreError:
        """The StoreError for what SQLite said. A damaged or read-only file is not used again by this Store."""
        name = getattr(e, "sqlite_errorname", "") or ""
        if name.startswith("SQLITE_FULL"):
            return StoreFull(f"the disk holding {self.path} is full, so nothing was saved; free some space, then retry")
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            self._damaged = StoreDamaged(
                f"{self.path} is damaged ({e}); chatapp has stopped using it: {_how_to_recover(self.path)}"
            )
        elif name.startswith(("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")):
            self._damaged = StoreDamaged(
                f"can't {doing} {self.path} ({e}); chatapp has stopped using it. Check the disk and the file's "
                f"permissions, then restart"
            )
        else:
            return StoreError(f"can't {doing} the conversation database {self.path}: {e}")
        return self._damaged

    @contextmanager
    def _read(self):
        with self._lock:
            db = self._conn()
            try:
                yield db
            except sqlite3.Error as e:
                raise self._fault(e, "read") from e

    @contextmanager
    def _tx(self):
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException as e:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite rolled back itself (a full disk can do that); the first error is the news
                if isinstance(e, sqlite3.Error):
                    raise self._fault(e, "write to") from e
                raise

    def _now(self) -> float:
        # Strictly increasing, so "most recently updated first" never ties, even on a coarse or stepped-back clock.
        self._last_time = max(time.time(), self._last_time + 1e-6)
        return self._last_time

    # Conversations

    def new_conversation(self, title: str = "New chat", settings: ConvSettings | None = None) -> Conversation:
        s = settings or ConvSettings()
        with self._tx() as db:
            now = self._now()
            cur = db.execute(
                f"INSERT INTO conversations (title, created, updated, {', '.join(_SETTINGS)})"
                f" VALUES (?, ?, ?{', ?' * len(_SETTINGS)})",
                (title, now, now, *astuple(s)),
            )
        return Conversation(cur.lastrowid, title, now, now, replace(s))

    _CONV_COLUMNS = f"id, title, created, updated, parent_id, branch_point, {', '.join(_SETTINGS)}"

    @staticmethod
    def _conversation(row) -> Conversation:
        settings = ConvSettings(*row[6:])
        if settings.thinking is not None:
            settings.thinking = bool(settings.thinking)  # SQLite keeps it as 0 or 1
        return Conversation(*row[:4], settings, row[4], row[5])

    def conversations(self, search: str = "") -> list[Conversation]:
        """Most recently updated first; `search` matches the title or any message, ignoring case."""
        sql = f"SELECT {self._CONV_COLUMNS} FROM conversations c"
        args: tuple = ()
        needle = search.strip().casefold()
        if needle:
            # instr(), not LIKE: no escaping of % and _, and casefold() handles non-ASCII letters.
            sql += (
                " WHERE instr(casefold(c.title), ?) OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.conversation_id = c.id AND instr(casefold(m.content), ?))"
            )
            args = (needle, needle)
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY c.updated DESC, c.id DESC", args).fetchall()
        return [self._conversation(r) for r in rows]

    def conversation(self, conversation_id: int) -> Conversation:
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._CONV_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return self._conversation(row)

    def rename(self, conversation_id: int, title: str) -> None:
        with self._tx() as db:
            cur = db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))
            if cur.rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id}")

    def branch(self, conversation_id: int, upto_position: int) -> Conversation:
        """A new chat holding copies of this one's messages up to and including `upto_position` (-1: none),
        with their stats, and this one's settings; it remembers where it came from."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {self._CONV_COLUMNS} FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no conversation with id {conversation_id}")
            parent = self._conversation(row)
            last = db.execute(
                "SELECT 1 FROM messages WHERE conversation_id = ? AND position = ?", (conversation_id, upto_position)
            ).fetchone()
            if upto_position >= 0 and last is None:
                raise StoreError(f"conversation {conversation_id} has no message at position {upto_position}")
            # One mark however deep the branching goes: the sidebar's indentation shows the depth.
            title = parent.title if parent.title.endswith(BRANCH_MARK) else f"{parent.title} {BRANCH_MARK}"
            s, now = parent.settings, self._now()
            cur = db.execute(
                f"INSERT INTO conversations (title, created, updated, parent_id, branch_point, {', '.join(_SETTINGS)})"
                f" VALUES (?, ?, ?, ?, ?{', ?' * len(_SETTINGS)})",
                (title, now, now, parent.id, upto_position, *astuple(s)),
            )
            copied = _MESSAGE_COLUMNS.removeprefix("id, conversation_id, ")
            db.execute(
                f"INSERT INTO messages (conversation_id, {copied}) SELECT ?, {copied} FROM messages"
                " WHERE conversation_id = ? AND position <= ?",
                (cur.lastrowid, conversation_id, upto_position),
            )
        return Conversation(cur.lastrowid, title, now, now, replace(s), parent.id, upto_position)

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages (its branches stay, as chats without a parent); deleting one that
        is already gone does nothing."""
        with self._tx() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def set_settings(self, conversation_id: int, settings: ConvSettings) -> None:
        s = settings
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE conversations SET {', '.join(f'{name} = ?' for name in _SETTINGS)} WHERE id = ?",
                (*astuple(s), conversation_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id}")

    # Messages

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY position",
                (conversation_id,),
            ).fetchall()
        return [
            StoredMessage(
                *r[:7],
                stats=json.loads(r[7]) if r[7] else None,
                cut=bool(r[8]),
                created=r[9],
                thinking=r[10],
                attachments=json.loads(r[11]) if r[11] else [],
            )
            for r in rows
        ]

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        model: str | None = None,
        preset: str | None = None,
        stats: dict | None = None,
        cut: bool = False,
        thinking: str | None = None,
        attachments: list[dict] | None = None,
    ) -> StoredMessage:
        """Append a complete message and commit it; the conversation becomes the most recently updated."""
        if role not in ROLES:
            raise StoreError(f"unknown message role {role!r} (expected one of {', '.join(ROLES)})")
        stats_json = json.dumps(stats) if stats is not None else None
        attachments = [dict(a) for a in attachments or []]
        with self._tx() as db:
            now = self._now()
            cur = db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
            if cur.rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id}")
            position = db.execute(
                "SELECT coalesce(max(position) + 1, 0) FROM messages WHERE conversation_id = ?", (conversation_id,)
            ).fetchone()[0]
            cur = db.execute(
                f"INSERT INTO messages ({_MESSAGE_COLUMNS.removeprefix('id, ')}) VALUES ({', '.join('?' * 11)})",
                (
                    conversation_id,
                    position,
                    role,
                    content,
                    model,
                    preset,
                    stats_json,
                    int(cut),
                    now,
                    thinking,
                    json.dumps(attachments) if attachments else None,
                ),
            )
        return StoredMessage(
            cur.lastrowid,
            conversation_id,
            position,
            role,
            content,
            model,
            preset,
            json.loads(stats_json) if stats_json else None,
            bool(cut),
            now,
            thinking,
            attachments,
        )

    def delete_from(self, conversation_id: int, position: int) -> None:
        """Delete the messages at `position` and after (regenerate, edit)."""
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (conversation_id, position)
            )
            if cur.rowcount:
                db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (self._now(), conversation_id))

    def recent_stats(self, model: str | None = None, preset: str | None = None, limit: int = 200) -> list[dict]:
        """The stats of the latest `limit` replies (of this model and preset, when given), oldest first."""
        sql, args = "SELECT stats FROM messages WHERE stats IS NOT NULL", []
        for column, value in (("model", model), ("preset", preset)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        with self._read() as db:
            rows = db.execute(sql + " ORDER BY created DESC, id DESC LIMIT ?", (*args, limit)).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]

    # UI state

    def get_state(self, key: str, default: str | None = None) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_state(self, key: str, value: str | None) -> None:
        """Remember a UI value; None forgets it."""
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT INTO state (key, value) VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (key, value),
                )

    # Export

    def export_markdown(self, conversation_id: int, thinking: bool = True) -> str:
        """The chat as Markdown; thinking: with each reply's thinking, in a folded <details> block."""
        conv = self.conversation(conversation_id)
        parts = [f"# {conv.title}"]
        for m in self.messages(conversation_id):
            if m.role == "user":
                header = "**You**"
            elif m.role == "system":
                header = "**System**"
            else:
                about = " · ".join(x for x in (m.model, m.preset) if x)
                header = f"**Assistant** ({about})" if about else "**Assistant**"
            parts.append(header)
            for a in m.attachments:
                parts.append(f"{_fenced(a['content'], a['name'])}")
            if thinking and m.thinking:
                parts.append(f"<details><summary>thinking</summary>\n\n{m.thinking.strip()}\n\n</details>")
            parts.append(m.content.rstrip("\n"))
            if m.cut:
                parts.append("*(stopped)*")
        return "\n\n".join(parts) + "\n"


def _fenced(text: str, label: str) -> str:
    """`label`, then text in a code fence longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{label}\n\n{fence}\n{text.rstrip(chr(10))}\n{fence}"
