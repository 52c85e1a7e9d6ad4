"""The UI's side of the backend worker: starts the child process ("spawn"), sends requests, reads events.

Importing this module never imports torch: the child's entry point, chatapp.engine.worker.main, is named
by reference and the engine only loads in the child. Events arrive on a reader thread and go to
`on_event`; the Textual app turns them into messages with post_message, which is thread-safe.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from . import protocol as p
from .config import Settings


class WorkerClient:
    """The worker process seen from the UI: start it, send it protocol requests, hear its events.

    Events go to `on_event` from a reader thread; when the process dies without being asked to,
    on_event gets a WorkerDied. The Backend (ui/backend.py) is its one user in the app.
    """

    def __init__(self, settings: Settings, on_event: Callable[[object], None], log_path: Path | None = None):
        self.settings = settings
        self.on_event = on_event
        self.log_path = log_path
        self.process = None
        self._conn = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._next_request = 0
        self._reader: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        from .engine import worker  # a light module: the engine's heavy imports happen in the child

        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)
        if self.log_path:
            from .private import private_dir

            private_dir(self.log_path.parent)
        self.process = context.Process(
            target=worker.main,
            args=(theirs, self.settings, str(self.log_path) if self.log_path else None),
            name="chatapp-worker",
            daemon=True,
        )
        # multiprocessing's resource tracker hands our stderr's fd to its own child; Textual has swapped
        # sys.stderr for an object without a real fd by now, so lend it the original for the start.
        stderr, sys.stderr = sys.stderr, sys.__stderr__ or sys.stderr
        try:
            self.process.start()
        finally:
            sys.stderr = stderr
        # Only the child may hold its end: when it dies, our recv() then sees EOF instead of waiting forever.
        theirs.close()
        self._conn = ours
        self._stopping = False
        self._reader = threading.Thread(target=self._read, args=(ours, self.process), daemon=True, name="worker-events")
        self._reader.start()

    def request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    def send(self, request) -> bool:
        """Send a request; False when the worker is not running (its death is reported separately)."""
        if self._conn is None:
            return False
        try:
            with self._send_lock:
                self._conn.send(request)
            return True
        except (BrokenPipeError, ConnectionError, EOFError, OSError):
            return False

    def _read(self, conn, process) -> None:
        while True:
            try:
                event = conn.recv()
            except Exception:  # EOF, or a message cut off by a kill mid-send that can't be unpickled: done
                break
            self.on_event(event)
        process.join(timeout=5)
        if not self._stopping:
            self.on_event(p.WorkerDied(process.exitcode, self._last_log_line()))

    def _last_log_line(self) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        with self.log_path.open("rb") as handle:
            handle.seek(max(0, self.log_path.stat().st_size - 4096))
            text = handle.read().decode(errors="replace").replace("\r", "\n")
            # Progress bars from the libraries say nothing about why the worker died.
            lines = [line for line in text.splitlines() if line.strip() and "%|" not in line]
        return lines[-1].strip() if lines else ""

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit, and make sure it does."""
        self._stopping = True
        if self.process is None or self.process.pid is None:
            return
        self.send(p.Shutdown())
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        # The child is gone, so the reader sees EOF once it has delivered what the child sent before exiting.
        self._reader.join(timeout)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def kill(self) -> None:
        """SIGKILL the worker, as the OOM killer would (for tests and for a stuck worker)."""
        if self.alive:
            os.kill(self.process.pid, signal.SIGKILL)
