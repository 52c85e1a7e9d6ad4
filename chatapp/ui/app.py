"""The Textual app: themes, the store, the worker client, and the chat screen.

The model runs in a worker process (chatapp.engine.worker). This process never imports torch, so the
first paint comes before any model code has been imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.message import Message
from textual.screen import Screen

from ..config import Settings, save_setting
from ..store import Store
from ..worker_client import WorkerClient
from .screens.chat import ChatScreen
from .themes import register_themes, resolve_theme


class WorkerEvent(Message):
    """A protocol event from the worker, delivered on the UI's own thread."""

    def __init__(self, event: object):
        super().__init__()
        self.event = event


class ChatApp(App):
    CSS_PATH = "chatapp.tcss"
    TITLE = "chatapp"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        model: str | None = None,
        preset: str | None = None,
        settings_errors: Iterable[str] = (),
        start_worker: bool = True,
        cache_budget_bytes: int | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.store = store
        self.model_ref = model or store.get_state("last_model") or settings.default_model
        self.preset = preset or (store.get_state("last_preset") if not model else None) or settings.default_preset
        self.startup_errors = list(settings_errors)
        self.should_start_worker = start_worker
        self.cache_budget_bytes = cache_budget_bytes
        self.client = WorkerClient(
            settings, lambda event: self.post_message(WorkerEvent(event)), log_path=settings.data_dir / "worker.log"
        )
        self.chat = ChatScreen()

    def on_mount(self) -> None:
        errors = self.startup_errors + register_themes(self, self.settings.themes_dir)
        theme, problem = resolve_theme(self.settings.theme, self.available_themes)
        self.theme = theme
        for line in errors + ([problem] if problem else []):
            self.notify(line, severity="warning", timeout=12)
        self.theme_changed_signal.subscribe(self, self._theme_changed)
        self.push_screen(self.chat)
        if self.should_start_worker:
            # After the first paint: the screen is up before the worker process even starts.
            self.call_after_refresh(self.start_worker)

    def start_worker(self) -> None:
        from .. import protocol as p

        self.chat.query_one("StatusBar").busy(f"loading {self.model_ref} ({self.preset})…")
        self.client.start()
        self.client.send(p.Load(self.model_ref, self.preset, cache_budget_bytes=self.cache_budget_bytes))

    async def on_worker_event(self, message: WorkerEvent) -> None:
        await self.chat.handle_event(message.event)

    def _theme_changed(self, theme) -> None:
        if theme.name != self.settings.theme:
            try:
                save_setting(self.settings.config_file, "theme", theme.name)
            except OSError as exc:
                self.notify(f"could not save the theme choice: {exc}", severity="warning")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.chat:
            return
        for binding in self.chat.BINDINGS:
            action = getattr(self.chat, f"action_{binding.action}")
            yield SystemCommand(binding.description, f"{binding.description} ({binding.key})", action)

    def on_unmount(self) -> None:
        self.client.stop()


def run(settings: Settings, settings_errors: list[str], model: str | None, preset: str | None) -> int:
    store = Store.open(Path(settings.data_dir))
    try:
        ChatApp(settings, store, model=model, preset=preset, settings_errors=settings_errors).run()
    finally:
        store.close()
    return 0
