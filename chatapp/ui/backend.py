"""The one owner of the model's lifecycle in the UI: the worker process, what is loaded, and downloads.

Protocol events arrive on the client's reader thread and reach the UI thread as one WorkerEvent; `handle`
turns each into a typed Textual message and posts it to the screens that listen. Screens handle only the
messages they care about, with @on, and never change the model's state themselves: they ask the backend.
Downloads happen here, in a thread, and nowhere else; the worker only ever loads what is on disk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from textual.message import Message
from textual.message_pump import MessagePump

from .. import protocol as p
from ..errors import ChatappError
from ..sampling import SamplingParams

# -- the messages screens handle ---------------------------------------------------------------


class WorkerEvent(Message):
    """A protocol event from the worker, delivered on the UI's own thread (the backend's input)."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


class ModelLoading(Message):
    """A model is being prepared: a line about it, and bytes when it is a download."""

    def __init__(self, text: str, done: int | None = None, total: int | None = None):
        super().__init__()
        self.text, self.done, self.total = text, done, total


class ModelLoaded(Message):
    def __init__(self, info: p.Loaded):
        super().__init__()
        self.info = info


class ModelLoadFailed(Message):
    """Loading failed. going_back names the model and preset loaded again instead; still_loaded is set when the
    failure came before the worker was asked (a download), so the model loaded before is still there."""

    def __init__(self, error: str, going_back: tuple[str, str] | None = None, still_loaded: p.Loaded | None = None):
        super().__init__()
        self.error, self.going_back, self.still_loaded = error, going_back, still_loaded


class ReplyDelta(Message):
    def __init__(self, request_id: int, text: str):
        super().__init__()
        self.request_id, self.text = request_id, text


class ReplyFinished(Message):
    def __init__(self, request_id: int, conversation_id: int, text: str, stats: p.TurnStats):
        super().__init__()
        self.request_id, self.conversation_id, self.text, self.stats = request_id, conversation_id, text, stats


class MessageCounted(Message):
    """The answer to Backend.count: how many tokens a message would take, and whether it fits."""

    def __init__(self, counted: p.Counted):
        super().__init__()
        self.counted = counted


class ReplyFailed(Message):
    def __init__(self, request_id: int, error: str):
        super().__init__()
        self.request_id, self.error = request_id, error


class CachesEvicted(Message):
    def __init__(self, conversation_ids: list[int], freed_bytes: int, to_disk: bool = False, parked=()):
        super().__init__()
        self.conversation_ids, self.freed_bytes, self.to_disk = conversation_ids, freed_bytes, to_disk
        self.parked = list(parked)


class CacheStatesChanged(Message):
    """Backend.cache_states changed: where each chat's KV cache is."""


class WorkerStopped(Message):
    """The worker process ended without being asked (killed, crashed); `why` is one line."""

    def __init__(self, why: str, detail: str):
        super().__init__()
        self.why, self.detail = why, detail


class DownloadUpdate(Message):
    def __init__(self, ref: str, done: int, total: int, bytes_per_s: float):
        super().__init__()
        self.ref, self.done, self.total, self.bytes_per_s = ref, done, total, bytes_per_s


class DownloadEnded(Message):
    """A download finished (error None) or stopped; a finished one is loaded next."""

    def __init__(self, ref: str, error: str | None, wont_fit: bool = False):
        super().__init__()
        #: wont_fit: refused before any weights came, because no preset fits this machine (Target.force overrides).
        self.ref, self.error, self.wont_fit = ref, error, wont_fit


# -- the backend -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What to load: a model reference and a preset, with the planner's context and attention when known."""

    model: str
    preset: str
    context_tokens: int | None = None
    attn_implementation: str | None = None
    #: The user chose to go ahead though the planner says it won't fit here: no refusal before the download
    #: or the load.
    force: bool = False


class Backend:
    """The local worker, seen from the UI. One instance per app; see the module doc."""

    def __init__(self, app, client_factory, *, model: str, preset: str, cache_budget_bytes: int | None = None):
        self.app = app
        self.client = client_factory(
            app.settings,
            lambda event: app.post_message(WorkerEvent(event)),
            log_path=app.settings.data_dir / "worker.log",
        )
        #: What is loaded, or being loaded (force: though the planner said it won't fit).
        self.model, self.preset, self.force = model, preset, False
        self.loaded: p.Loaded | None = None
        #: What to load again if loading the newly chosen model fails.
        self.fallback: Target | None = None
        self.cache_budget_bytes = cache_budget_bytes
        #: Set while a download runs: setting it stops the download (what arrived is kept).
        self.download_cancel: threading.Event | None = None
        self._pending: Target | None = None
        self._listeners: list[MessagePump] = []
        #: chat id -> "live" (GPU memory or RAM), "parked" (CPU RAM) or "disk"; a chat not here is cold.
        self.cache_states: dict[int, str] = {}

    @property
    def remote(self) -> bool:
        """Whether replies come from a remote server (RemoteClient) rather than the local worker."""
        return getattr(self.client, "remote", False)

    # -- who hears about it ---------------------------------------------------------------------

    def listen(self, node: MessagePump) -> None:
        if node not in self._listeners:
            self._listeners.append(node)

    def unlisten(self, node: MessagePump) -> None:
        if node in self._listeners:
            self._listeners.remove(node)

    def _post(self, message_type, *args) -> None:
        # post_message is thread-safe, so download threads post too; the list only changes on the UI thread.
        for node in list(self._listeners):
            node.post_message(message_type(*args))

    # -- loading ----------------------------------------------------------------------------------

    def load(self, target: Target) -> None:
        """The one sequence for starting, restarting and switching: start the worker if it isn't running,
        download the model if it isn't here, then ask the worker to load it. What is loaded stays usable
        until the worker is asked."""
        self.model, self.preset, self.force = target.model, target.preset, target.force
        self._pending = target
        self._post(ModelLoading, f"loading {target.model} ({target.preset})…")
        self.app.run_worker(lambda: self._prepare(target), thread=True, group="load", exclusive=True)

    def switch(self, target: Target) -> None:
        """Load another model or preset; if that fails, what is loaded now comes back."""
        if self.loaded is not None and (target.model, target.preset) == (self.model, self.preset):
            return
        if self.loaded is not None:
            self.fallback = Target(self.model, self.preset, force=self.force)
        self.load(target)

    def restart(self) -> None:
        self.load(Target(self.model, self.preset, force=self.force))

    def _prepare(self, target: Target) -> None:
        """In a thread: what the reference names, and a download when it is a Hub model not yet here."""
        from ..refs import parse_ref

        if self.remote:  # the server has its models; nothing to find or download here
            self.app.call_from_thread(self._send_load, target)
            return
        try:
            source = parse_ref(target.model, self.app.catalog())
            if source.kind == "hub":
                self._download(source, target.force)
        except ChatappError as exc:
            self.app.call_from_thread(self._not_prepared, target, str(exc))
            return
        self.app.call_from_thread(self._send_load, target)

    def _not_prepared(self, target: Target, error: str) -> None:
        if target is not self._pending:
            return  # another choice came since
        self._pending = None
        if self.loaded is None:
            self.handle(p.Error(error))
            return
        # The worker was never asked, so what it has loaded is still there.
        back, self.fallback = self.fallback, None
        if back is not None:
            self.model, self.preset, self.force = back.model, back.preset, back.force
        self._post(ModelLoadFailed, error, None, self.loaded)

    def _send_load(self, target: Target) -> None:
        if target is not self._pending:
            return  # another choice came since
        self._pending = None
        self.loaded = None
        if not self.client.alive:
            self.client.start()
        self.client.send(
            p.Load(
                target.model,
                target.preset,
                context_tokens=target.context_tokens,
                attn_implementation=target.attn_implementation,
                cache_budget_bytes=self.cache_budget_bytes,
                force=target.force,
            )
        )

    def _download(self, source, force: bool) -> None:
        from ..hub_download import WontFit, download, refuse_what_cannot_fit

        cancel = self.download_cancel = threading.Event()
        ref = source.label

        def progress(pr) -> None:
            self._post(DownloadUpdate, ref, pr.done_bytes, pr.total_bytes, pr.bytes_per_s)

        try:
            download(
                source.repo_id,
                source.revision,
                progress=progress,
                cancel=cancel,
                before_fetch=None if force else refuse_what_cannot_fit(source, lambda: self.app.hardware),
            )
        except ChatappError as exc:
            self._post(DownloadEnded, ref, str(exc), isinstance(exc, WontFit))
            raise
        finally:
            self.download_cancel = None
        self._post(DownloadEnded, ref, None)

    def cancel_download(self) -> bool:
        """Stop the download in progress, if any; True when there was one."""
        cancel = self.download_cancel
        if cancel is not None:
            cancel.set()
        return cancel is not None

    # -- replies ----------------------------------------------------------------------------------

    def generate(
        self,
        conversation_id: int,
        messages: list[tuple[str, str]],
        params: SamplingParams,
        thinking: bool | None = None,
    ) -> int | None:
        """Ask for a reply (thinking on or off where the template has the switch; None: its default); its request
        id, or None when the worker is not running."""
        request_id = self.client.request_id()
        if not self.client.send(p.Generate(request_id, conversation_id, messages, params, thinking=thinking)):
            return None
        return request_id

    def count(self, messages: list[tuple[str, str]], max_new_tokens: int) -> int | None:
        """Ask how many tokens these messages take (MessageCounted answers); None when the worker is not running."""
        request_id = self.client.request_id()
        if not self.client.send(p.Count(request_id, messages, max_new_tokens)):
            return None
        return request_id

    def cancel(self, request_id: int) -> None:
        self.client.send(p.Cancel(request_id))

    def branch(self, conversation_id: int, parent_id: int) -> None:
        """The chat was branched from parent_id: the worker copies the parent's cache for it, if it holds one."""
        self.client.send(p.Branch(conversation_id, parent_id))

    def forget(self, conversation_id: int) -> None:
        """Drop a conversation's cache and its snapshots on disk (it was deleted), even with no worker running."""
        from ..snapshots import delete, kv_dir

        self.client.send(p.Reset(conversation_id))
        delete(kv_dir(self.app.settings.data_dir), chat_id=conversation_id)

    def stop(self) -> None:
        self.cancel_download()
        self.client.stop()

    # -- events -----------------------------------------------------------------------------------

    def handle(self, event) -> None:
        """One protocol event, on the UI thread: update the state, then tell the listeners."""
        if isinstance(event, p.Delta):
            self._post(ReplyDelta, event.request_id, event.text)
        elif isinstance(event, p.Counted):
            self._post(MessageCounted, event)
        elif isinstance(event, p.Finished):
            self._post(ReplyFinished, event.request_id, event.conversation_id, event.text, event.stats)
        elif isinstance(event, p.Status):
            self._post(ModelLoading, event.text)
        elif isinstance(event, p.DownloadProgress):
            self._post(DownloadUpdate, self.model, event.done_bytes, event.total_bytes, event.bytes_per_s)
        elif isinstance(event, p.Loaded):
            self.loaded, self.fallback = event, None
            if self.remote:  # the server may serve another model than the one asked for: say which it is
                self.model = event.model
            self._post(ModelLoaded, event)
        elif isinstance(event, p.Evicted):
            self._post(CachesEvicted, event.conversation_ids, event.freed_bytes, event.to_disk, event.parked)
        elif isinstance(event, p.CacheStates):
            self.cache_states = {cid: "disk" for cid in event.disk}
            self.cache_states.update({cid: "parked" for cid in event.parked})
            self.cache_states.update({cid: "live" for cid in event.live})
            self._post(CacheStatesChanged)
        elif isinstance(event, p.Error) and event.request_id is not None:
            self._post(ReplyFailed, event.request_id, event.message)
        elif isinstance(event, p.Error):
            self.loaded = None
            back, self.fallback = self.fallback, None
            self._post(ModelLoadFailed, event.message, (back.model, back.preset) if back else None)
            if back is not None:
                self.load(back)
        elif isinstance(event, p.WorkerDied):
            self.loaded = None
            # What was in memory is gone; each turn was saved as it ended, so it is on disk.
            self.cache_states = dict.fromkeys(self.cache_states, "disk") if self.app.settings.kv_disk_budget > 0 else {}
            self._post(CacheStatesChanged)
            why = "killed" if event.exitcode == -9 else f"exit code {event.exitcode}"
            # A killed process wrote nothing about it; a crash's last line says what went wrong.
            detail = event.last_log_line if event.last_log_line and event.exitcode != -9 else ""
            self._post(WorkerStopped, why, detail)
