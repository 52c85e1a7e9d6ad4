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
        hardware=None,
        first_run: bool | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.store = store
        #: No model was ever loaded here: the picker opens (the starter loads meanwhile).
        self.first_run = (model is None and store.get_state("last_model") is None) if first_run is None else first_run
        self.model_ref = model or store.get_state("last_model") or settings.default_model
        self.preset = preset or (store.get_state("last_preset") if not model else None) or settings.default_preset
        #: What to load again if loading a newly chosen model or preset fails.
        self.fallback: tuple[str, str] | None = None
        self._hardware = hardware
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
        if self.first_run:
            self.call_after_refresh(self.action_models)

    def notify(self, message: str, *, markup: bool = False, **kwargs) -> None:
        # Our messages quote model names, paths and pip extras like 'chatapp[flash]', and widgets pass
        # markup=True by default: nothing shown here is Rich markup.
        super().notify(message, markup=False, **kwargs)

    @property
    def hardware(self):
        """What the planner plans for: detected once (NVML and /proc, no torch), or given by a test."""
        if self._hardware is None:
            from ..hardware import detect

            self._hardware = detect()
        return self._hardware

    def catalog(self) -> dict:
        """The shipped catalog with the user's models.toml on top."""
        from ..catalog import load_catalog

        return load_catalog(self.settings.config_dir / "models.toml")

    def source(self, ref: str):
        """What a model reference names (catalog key, repo id, folder, .gguf)."""
        from ..refs import parse_ref

        return parse_ref(ref, self.catalog())

    def switch_model(self, model: str, preset: str) -> None:
        """Load another model or preset; the chats continue, and each one's cache is rebuilt once."""
        from .. import protocol as p

        if self.chat.loaded is not None and (model, preset) == (self.model_ref, self.preset):
            return  # already what is loaded
        if self.chat.loaded is not None:
            self.fallback = (self.model_ref, self.preset)
        self.model_ref, self.preset = model, preset
        self.chat.query_one("StatusBar").busy(f"loading {model} ({preset})…")
        self.chat.loaded = None
        if not self.client.alive:
            self.client.start()
        self.client.send(p.Load(model, preset, cache_budget_bytes=self.cache_budget_bytes))

    def action_models(self) -> None:
        from .screens.models import ModelPickerScreen

        if not isinstance(self.screen, ModelPickerScreen):
            self.push_screen(ModelPickerScreen())

    def action_presets(self) -> None:
        from ..choices import preset_options
        from ..errors import ChatappError
        from ..facts import facts_for
        from .screens.dialogs import ConfirmScreen
        from .screens.presets import PresetScreen

        try:
            facts = facts_for(self.source(self.model_ref))
        except ChatappError as exc:
            self.notify(f"can't plan presets for {self.model_ref}: {exc}", severity="error")
            return
        options = dict(preset_options(facts, self.hardware))

        def chosen(preset: str | None) -> None:
            if preset is None or preset == self.preset:
                return
            plan = options[preset]
            if plan.choice is not None:
                self.switch_model(self.model_ref, preset)
                return
            why = plan.reasons[-1] if plan.reasons else "the planner found no room for it"
            self.push_screen(
                ConfirmScreen(f"{preset} won't fit on this machine: {why}. Load it anyway?", yes="Load anyway"),
                lambda yes: yes and self.switch_model(self.model_ref, preset),
            )

        self.push_screen(PresetScreen(self.model_ref, list(options.items()), self.preset), chosen)

    def action_settings(self) -> None:
        from .screens.settings import SettingsScreen

        def saved(settings) -> None:
            if settings is not None:
                self.settings = settings
                if settings.theme in self.available_themes:
                    self.theme = settings.theme
                self.notify("Settings saved.", timeout=3)

        self.push_screen(SettingsScreen(self.settings), saved)
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
        yield SystemCommand("Models", "Pick, download or delete a model (F3)", self.action_models)
        yield SystemCommand("Preset", "Switch bf16 / fp16 / fp32 / int8 / nf4 / auto (F4)", self.action_presets)
        yield SystemCommand("Settings", "Edit config.toml in a form (F9)", self.action_settings)
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
