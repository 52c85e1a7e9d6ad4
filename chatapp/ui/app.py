"""The Textual app: themes, the store, the worker client, and the chat screen.

The model runs in a worker process (chatapp.engine.worker). This process never imports torch, so the
first paint comes before any model code has been imported.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen

from ..config import Settings, save_setting
from ..errors import ChatappError
from ..hardware import Hardware
from ..personas import load_personas
from ..remote_client import RemoteClient
from ..store import Store, StoreDamaged
from ..worker_client import WorkerClient
from .backend import Backend, Target, WorkerEvent
from .screens.chat import ChatScreen
from .themes import register_themes, resolve_theme


class ChatApp(App):
    """The chat app: themes, the store, the backend that owns the model, and the chat screen.

    `client_factory` makes the backend's worker client (WorkerClient, or a scripted one in tests);
    `hardware` replaces what the planner would detect, so tests can plan for machines we don't have.
    """

    CSS_PATH = "chatapp.tcss"
    TITLE = "chatapp"
    BINDINGS = [
        ("f3", "models", "Models"),
        ("f4", "presets", "Preset"),
        ("f9", "settings", "Settings"),
    ]

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
        hardware: Hardware | None = None,
        first_run: bool | None = None,
        client_factory=None,
    ):
        super().__init__()
        self.settings = settings
        self.store = store
        #: No model was ever loaded here: the picker opens (the starter loads meanwhile).
        if first_run is None:  # a remote server has its models: nothing to download first
            first_run = model is None and store.get_state("last_model") is None and not settings.backend_url
        self.first_run = first_run
        if client_factory is None:
            client_factory = RemoteClient if settings.backend_url else WorkerClient
        self.backend = Backend(
            self,
            client_factory,
            model=model or store.get_state("last_model") or settings.default_model,
            preset=preset or (store.get_state("last_preset") if not model else None) or settings.default_preset,
            cache_budget_bytes=cache_budget_bytes,
        )
        self._hardware = hardware
        self.startup_errors = list(settings_errors)
        self.should_start_worker = start_worker
        self.chat = ChatScreen()
        #: The notifications shown so far (the last 100), which toasts hide again after a few seconds.
        self.notices: deque[str] = deque(maxlen=100)
        self._catalog_problem: str | None = None
        #: Why the app ended early, in one line (the store found its file damaged), for `run` to print.
        self.fatal: str | None = None
        self._quit_asked = False
        self.personas, persona_errors = load_personas(settings.config_dir)
        self.startup_errors += persona_errors

    def reload_personas(self) -> None:
        """Read the persona files again (after the app saved or deleted one); a broken one is said and skipped."""
        self.personas, errors = load_personas(self.settings.config_dir)
        for line in errors:
            self.notify(line, severity="warning", timeout=8)

    def action_personas(self) -> None:
        from .screens.personas import PersonasScreen

        self.push_screen(PersonasScreen())

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
            self.call_after_refresh(self.backend.restart)
        if self.first_run:
            self.call_after_refresh(self.action_models)

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        # Our messages quote model names, paths and pip extras like 'chatapp[flash]', and widgets pass
        # markup=True by default: nothing shown here is Rich markup.
        super().notify(message, markup=False, **kwargs)
        self.notices.append(message)

    def action_notices(self) -> None:
        from .screens.dialogs import TextScreen

        self.push_screen(TextScreen("Recent notices, newest last", "\n".join(self.notices) or "none yet"))

    @property
    def hardware(self) -> Hardware:
        """What the planner plans for: detected once (NVML and /proc, no torch), or given by a test.

        Detection talks to the GPU driver: call it from a thread worker, not the event loop."""
        if self._hardware is None:
            from ..hardware import detect

            self._hardware = detect()
        return self._hardware

    def catalog(self) -> dict:
        """The shipped catalog with the user's models.toml on top; the shipped one alone, said once, when the
        user's file is broken. Called from worker threads too."""
        from ..catalog import load_catalog_or_shipped

        catalog, problem = load_catalog_or_shipped(self.settings.config_dir / "models.toml")
        if problem and problem != self._catalog_problem:
            self._catalog_problem = problem
            if threading.current_thread() is threading.main_thread():
                self.notify(problem, severity="error", timeout=15)
            else:
                self.call_from_thread(self.notify, problem, severity="error", timeout=15)
        return catalog

    def source(self, ref: str):
        """What a model reference names (catalog key, repo id, folder, .gguf)."""
        from ..refs import parse_ref

        return parse_ref(ref, self.catalog())

    def action_models(self) -> None:
        from .screens.models import ModelPickerScreen
        from .screens.remote_models import RemoteModelsScreen

        if self.backend.remote:
            if not isinstance(self.screen, RemoteModelsScreen):
                self.push_screen(RemoteModelsScreen())
            return
        if not isinstance(self.screen, ModelPickerScreen):
            self.push_screen(ModelPickerScreen())

    def action_presets(self) -> None:
        if self.backend.remote:
            host = self.backend.client.host
            self.notify(f"Presets, memory and the KV cache are decided by the server (remote: {host}).", timeout=6)
            return
        self._plan_presets(self.backend.model, self.backend.preset)

    @work(thread=True, exclusive=True, group="presets")
    def _plan_presets(self, model: str, current: str) -> None:
        """Facts can come from the Hub and hardware from the driver: plan each preset off the event loop."""
        from ..choices import preset_options
        from ..errors import ChatappError
        from ..facts import facts_for

        try:
            facts = facts_for(self.source(model))
        except ChatappError as exc:
            self.call_from_thread(self.notify, f"can't plan presets for {model}: {exc}", severity="error")
            return
        options = dict(preset_options(facts, self.hardware, self.settings.context_cap))
        self.call_from_thread(self._choose_preset, model, current, options)

    def _choose_preset(self, model: str, current: str, options: dict) -> None:
        from .screens.dialogs import ConfirmScreen
        from .screens.presets import PresetScreen

        def chosen(preset: str | None) -> None:
            if preset is None or preset == current:
                return
            choice = options[preset].choice
            if choice is not None:
                self.backend.switch(Target(model, preset, choice.context_tokens, choice.attn_implementation))
                return
            plan = options[preset]
            why = plan.reasons[-1] if plan.reasons else "the planner found no room for it"
            self.push_screen(
                ConfirmScreen(f"{preset} won't fit on this machine: {why}. Load it anyway?", yes="Load anyway"),
                lambda yes: yes and self.backend.switch(Target(model, preset, force=True)),
            )

        self.push_screen(PresetScreen(model, list(options.items()), current, self.chat.switch_cost()), chosen)

    def action_settings(self) -> None:
        from .screens.settings import SettingsScreen

        def saved(settings) -> None:
            if settings is not None:
                self.settings = settings
                if settings.theme in self.available_themes:
                    self.theme = settings.theme
                self.notify("Settings saved.", timeout=3)

        self.push_screen(SettingsScreen(self.settings), saved)

    def on_worker_event(self, message: WorkerEvent) -> None:
        self.backend.handle(message.event)

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
        yield SystemCommand("Models", "Pick, download or delete a model (F3)", self.action_models)
        yield SystemCommand("Preset", "Switch bf16 / fp16 / fp32 / int8 / nf4 / auto (F4)", self.action_presets)
        yield SystemCommand("Settings", "Edit config.toml in a form (F9)", self.action_settings)
        yield SystemCommand("Personas", "New, edit, duplicate or delete a persona", self.action_personas)
        yield SystemCommand("Notices", "The notifications shown so far", self.action_notices)
        for binding in self.chat.BINDINGS:
            action = getattr(self.chat, f"action_{binding.action}")
            yield SystemCommand(binding.description, f"{binding.description} ({binding.key})", action)

    def on_unmount(self) -> None:
        self.backend.stop()

    async def action_quit(self) -> None:
        if self.chat.save_unsaved() or self._quit_asked:
            self.exit()
            return
        # A reply the disk had no room for lives only on screen: quitting now would lose it, so ask once.
        self._quit_asked = True
        self.notify(
            f"{len(self.chat.unsaved)} reply(ies) are not saved yet: the disk is still full. Free some space and "
            "quit again to keep them, or press Ctrl+Q again to quit without them.",
            severity="warning",
            timeout=15,
        )

    def _handle_exception(self, error: Exception) -> None:
        if isinstance(error, StoreDamaged):
            # The store has stopped using the file; the user gets one line on how to recover, not a traceback.
            self.fatal = str(error)
            self.exit(return_code=1)
            return
        super()._handle_exception(error)


def run(settings: Settings, settings_errors: list[str], model: str | None, preset: str | None) -> int:
    store = Store.open(Path(settings.data_dir))
    app = ChatApp(settings, store, model=model, preset=preset, settings_errors=settings_errors)
    try:
        app.run()
    finally:
        store.close()
    return exit_status(app)


def exit_status(app: ChatApp) -> int:
    """The shell's status for how the app ended: 0, or non-zero after a crash (which Textual has shown). A damaged
    database is a ChatappError, printed as one line by the CLI."""
    if app.fatal:
        raise ChatappError(app.fatal)
    return app.return_code or 0
