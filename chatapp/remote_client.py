"""The UI's remote backend: WorkerClient's interface over an OpenAI-compatible server (chatapp.remote).

The app's Backend drives it exactly as it drives the local worker: it sends protocol requests and hears
protocol events. Requests run one at a time, in order, on a thread, as the worker runs them; a Cancel acts at
once, closing the reply's stream. There is no process: `alive` is whether the thread runs, and the server
keeps its own caches, so Branch and Reset have nothing to do here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from pathlib import Path

from . import protocol as p
from .config import Settings
from .errors import ChatappError, first_line
from .remote import THINKING, Remote, api_key, choose_model, host


class RemoteClient:
    #: What the UI asks to tell a remote backend from the local worker.
    remote = True

    def __init__(self, settings: Settings, on_event: Callable[[object], None], log_path: Path | None = None):
        self.settings = settings
        self.on_event = on_event
        self.url = settings.backend_url.rstrip("/")
        self.host = host(self.url)
        self.server: Remote | None = None
        self.model: str | None = None
        self._requests: queue.Queue = queue.Queue()
        self._cancels: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._next_request = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int | None:
        return None

    def start(self) -> None:
        self.server = Remote(self.url, api_key(self.url))
        self._thread = threading.Thread(target=self._serve, daemon=True, name="remote-backend")
        self._thread.start()

    def request_id(self) -> int:
        self._next_request += 1
        return self._next_request

    def send(self, request) -> bool:
        if not self.alive:
            return False
        if isinstance(request, p.Cancel):
            self._cancel_event(request.request_id).set()
            return True
        self._requests.put(request)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            for event in self._cancels.values():
                event.set()
        if self.alive:
            self._requests.put(p.Shutdown())
            self._thread.join(timeout)

    def kill(self) -> None:
        self.stop(0)

    def models(self) -> list[dict]:
        """The server's models (for the picker), asked now; RemoteError in one line."""
        return (self.server or Remote(self.url, api_key(self.url))).models()

    # -- the thread -------------------------------------------------------------------------------

    def _cancel_event(self, request_id: int) -> threading.Event:
        with self._lock:
            return self._cancels.setdefault(request_id, threading.Event())

    def _serve(self) -> None:
        while not isinstance(request := self._requests.get(), p.Shutdown):
            if isinstance(request, p.Load):
                self._load(request)
            elif isinstance(request, p.Generate):
                self._generate(request)
            elif isinstance(request, p.Count):
                # The server counts with its own tokenizer and doesn't say; the UI sends without counting.
                self.on_event(p.Error("a remote server counts tokens itself", request.request_id))

    def _load(self, request: p.Load) -> None:
        try:
            models = self.server.models()
            self.model, context, why = choose_model(models, None, request.model)
        except ChatappError as exc:
            self.on_event(p.Error(str(exc)))
            return
        self.on_event(
            p.Loaded(
                model=self.model,
                preset="remote",
                dtype="remote",
                device=f"remote: {self.host}",
                attn_implementation="decided by the server",
                context_length=context,
                footprint_bytes=0,
                notes=[why] if why else [],
                reasons=["presets, memory and the KV cache are decided by the server"],
                thinking_markers=THINKING,
            )
        )

    def _generate(self, request: p.Generate) -> None:
        rid = request.request_id
        cancel = self._cancel_event(rid)
        parts: list[str] = []
        try:
            replies = self.server.reply(self.model, request.messages, request.params, cancel, request.thinking)
            for response in replies:
                if response.text:
                    parts.append(response.text)
                    self.on_event(p.Delta(rid, response.text))
                if response.stats is not None:
                    self.on_event(p.Finished(rid, request.conversation_id, "".join(parts), response.stats))
        except ChatappError as exc:
            self.on_event(p.Error(str(exc), rid))
        except Exception as exc:  # a library's surprise: one line, and the app goes on
            self.on_event(p.Error(f"{type(exc).__name__}: {first_line(exc)}", rid))
        finally:
            with self._lock:
                self._cancels.pop(rid, None)
