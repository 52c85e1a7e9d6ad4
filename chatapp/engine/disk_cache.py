"""The worker's disk tier: chats' caches written to snapshots in the background and restored lazily.

When to save: after every turn, on a background thread while the user reads (so a kill -9 loses at most the
turn being answered), and, waiting for the write, whenever a cache leaves memory: LRU eviction, a model or
preset switch, and shutdown (quit, restart). A save of a cache the disk already holds is skipped.

When to restore: on a chat's first turn in this worker, if its snapshot's key matches and reading the file
is expected to beat prefilling the tokens it would spare: bytes / read rate < reusable tokens / prefill rate.
Both rates are measured in this worker (prefill from each turn's stats, reading from each restore); until
they are, prefill is taken as DEFAULT_PREFILL_TOKENS_PER_S and reading as DEFAULT_READ_BYTES_PER_S.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

from .. import snapshots
from ..snapshots import SnapshotError
from . import snapshot
from .session import ChatSession, Message, common_prefix_len

#: Until measured: a 2-core CPU prefills a 135M model at a few hundred tokens/s; a GPU at thousands.
DEFAULT_PREFILL_TOKENS_PER_S = {"cpu": 300.0, "cuda": 5000.0}
#: Until measured: a slow SSD. A restore that was just written is in the page cache and far faster.
DEFAULT_READ_BYTES_PER_S = 300e6
#: Fewer reusable tokens than this are never worth a file read.
MIN_RESTORE_TOKENS = 32


class DiskCache:
    def __init__(self, folder: Path, loaded, budget_gb: float):
        self.folder = snapshots.private_dir(folder)
        self.loaded = loaded
        self.key = snapshot.model_key(loaded)
        self.budget = snapshots.budget_bytes(self.folder, budget_gb)
        self.prefill_tokens_per_s = DEFAULT_PREFILL_TOKENS_PER_S.get(loaded.device.split(":")[0], 300.0)
        self.read_bytes_per_s = DEFAULT_READ_BYTES_PER_S
        self._measured_prefill = False
        self._pending: dict[int, tuple] = {}  # chat -> the latest state to write; older ones are skipped
        self._written: dict[int, tuple[int, int]] = {}  # chat -> (tokens, hash of ids) on disk
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._wake = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="kv-saver").start()

    def path(self, chat_id: int) -> Path:
        return snapshots.path_for(self.folder, chat_id, self.key)

    # -- saving ------------------------------------------------------------------------------

    def save(self, chat_id: int, session: ChatSession, wait: bool = False) -> None:
        ids, named, seen = session.export()
        if self.budget <= 0 or not ids:
            return
        signature = (len(ids), hash(tuple(ids)))
        with self._lock:
            if self._written.get(chat_id) == signature and chat_id not in self._pending:
                return
            self._pending[chat_id] = (ids, named, seen, signature)
        self._wake.put(chat_id)
        if wait:
            self.flush()

    def flush(self) -> None:
        """Wait until every save asked for so far is on disk."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending and not self._busy)

    def close(self) -> None:
        """Finish the saves asked for, then end the saver thread (the model is being unloaded)."""
        self.flush()
        self._wake.put(None)

    def _run(self) -> None:
        while True:
            chat_id = self._wake.get()
            if chat_id is None:
                return
            with self._lock:
                job = self._pending.pop(chat_id, None)
                self._busy = job is not None
            if job is None:
                continue
            try:
                self._write(chat_id, *job)
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def _write(self, chat_id: int, ids, named, seen, signature) -> None:
        path = self.path(chat_id)
        try:
            size = snapshot.save(path, self.key, chat_id, ids, named, seen)
        except Exception as exc:  # disk full, permissions: the chat goes on; only the snapshot is lost
            _say(f"kv snapshot of chat {chat_id} not written: {exc}")
            return
        with self._lock:
            self._written[chat_id] = signature
        for gone in snapshots.enforce_budget(self.folder, self.budget, keep=path):
            _say(f"kv snapshot {gone.path.name} dropped: over the {self.budget:,}-byte disk budget")
            with self._lock:
                if gone.chat_id in self._written and gone.path == self.path(gone.chat_id):
                    del self._written[gone.chat_id]
        _say(f"kv snapshot of chat {chat_id}: {len(ids):,} tokens, {size:,} bytes")

    def chats_on_disk(self) -> list[int]:
        """Chats with a snapshot for this model key, or one on its way (by file name: a bad file shows when it
        is read)."""
        tail = "-" + snapshots.key_hash(self.key) + snapshots.SUFFIX
        names = [path.name[4 : -len(tail)] for path in self.folder.glob(f"chat*{tail}")]
        with self._lock:
            pending = set(self._pending)
        return sorted({int(n) for n in names if n.isdigit()} | pending)

    def forget(self, chat_id: int) -> None:
        """Drop a chat's pending save and every snapshot of it (the chat was deleted)."""
        with self._lock:
            self._pending.pop(chat_id, None)
            self._written.pop(chat_id, None)
        self.flush()
        snapshots.delete(self.folder, chat_id=chat_id)

    # -- restoring ---------------------------------------------------------------------------

    def note_turn(self, prefilled_tokens: int, ttft_s: float) -> None:
        """Learn this machine's prefill rate from a turn that prefilled enough to measure it."""
        if prefilled_tokens >= 64 and ttft_s > 0:
            rate = prefilled_tokens / ttft_s
            self.prefill_tokens_per_s = rate if not self._measured_prefill else max(rate, self.prefill_tokens_per_s)
            self._measured_prefill = True

    def worth_reading(self, size_bytes: int, reusable_tokens: int) -> bool:
        if reusable_tokens < MIN_RESTORE_TOKENS:
            return False
        return size_bytes / self.read_bytes_per_s < reusable_tokens / self.prefill_tokens_per_s

    def restore(self, chat_id: int, session: ChatSession, messages: list[Message] | None, room: int = 512) -> bool:
        """Give a new session its chat's snapshot when it matches and pays off; True if it did.

        `room` is the reply's max_new_tokens, which decides what fits the context. Without messages (a branch
        taking its parent's cache) every token the snapshot holds counts as reusable.
        """
        path = self.path(chat_id)
        self.flush()  # a save of this chat may still be on its way to disk
        if not path.exists():
            return False
        try:
            head = snapshot.read_ids(path, self.key)
            ids = head[0]
            reusable = len(ids) if messages is None else common_prefix_len(session.preview_ids(messages, room), ids)
            size = path.stat().st_size
            if not self.worth_reading(size, reusable):
                _say(f"kv snapshot of chat {chat_id} not read: {reusable} reusable tokens")
                return False
            cache, ids, seconds = snapshot.timed_load(path, self.key, self.loaded, head)
        except SnapshotError as exc:
            text = f"ignored the KV snapshot on disk: {exc}"
            _say(f"kv snapshot {path.name}: {text}")
            session.tell(text)
            snapshots.remove([path])
            return False
        if seconds > 0:
            self.read_bytes_per_s = size / seconds
        session.adopt(cache, ids, seconds)
        with self._lock:
            self._written[chat_id] = (len(ids), hash(tuple(ids)))
        return True


def _say(text: str) -> None:
    # stderr: the worker sends it to its log, and `chatapp bench --json` keeps stdout for its JSON.
    print(text, file=sys.stderr, flush=True)
