"""The settings form: config.toml's fields, each checked as the file's would be, saved into config.toml."""

from __future__ import annotations

from dataclasses import fields, replace

from textual.app import ComposeResult
from textual.containers import Grid, VerticalScroll
from textual.widgets import Input, Label

from ...config import Settings, field_docs, parse_setting, save_setting
from .dialogs import FormScreen

#: The fields the form edits, in order; config_dir is where the form saves, so it isn't one of them.
FORM_FIELDS = (
    "default_model",
    "default_preset",
    "context_cap",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
    "seed",
    "theme",
    "data_dir",
    "themes_dir",
    "hub_cache",
)


class SettingsScreen(FormScreen):
    """Dismisses with the new Settings after saving them, or None."""

    def __init__(self, settings: Settings):
        super().__init__(classes="dialog-screen")
        self.settings = settings

    def compose(self) -> ComposeResult:
        docs = field_docs()
        with VerticalScroll(classes="dialog wide settings"):
            yield Label(f"Settings ({self.settings.config_file}); paths apply from the next start", markup=False)
            with Grid(classes="fields"):
                for name in FORM_FIELDS:
                    yield Label(name, classes="field-name")
                    yield Input(_text(getattr(self.settings, name)), id=f"set-{name}", tooltip=docs.get(name, ""))
            yield from self.form_footer()

    def action_save(self) -> None:
        values, problems = {}, []
        for name in FORM_FIELDS:
            text = self.query_one(f"#set-{name}", Input).value
            try:
                values[name] = parse_setting(name, text)
            except ValueError as exc:
                problems.append(f"{name} {exc}")
        if problems:
            self.show_error("; ".join(problems))
            return
        kinds = {f.name: f for f in fields(Settings)}
        try:
            for name, value in values.items():
                if value != getattr(self.settings, name) and name in kinds:
                    save_setting(
                        self.settings.config_file,
                        name,
                        "" if value is None else (str(value) if not isinstance(value, (int, float)) else value),
                    )
        except OSError as exc:  # the form stays open with what was typed; the file is replaced whole or not at all
            self.show_error(f"can't save {self.settings.config_file}: {exc.strerror or exc}")
            return
        self.dismiss(replace(self.settings, **values))


def _text(value: object) -> str:
    return "" if value is None else str(value)
