"""Small modal screens: confirm, one line of text, and a conversation's settings."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from ...sampling import check
from ...store import ConvSettings


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "dismiss(False)", "Cancel"), Binding("y", "dismiss(True)", "Yes")]

    def __init__(self, question: str, yes: str = "Delete"):
        super().__init__(classes="dialog-screen")
        self.question, self.yes = question, yes

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, markup=False)
            with Horizontal(classes="buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button("Cancel", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextScreen(ModalScreen[None]):
    """A title and text to read; Esc closes it."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]

    def __init__(self, title: str, text: str):
        super().__init__(classes="dialog-screen")
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.title_text, markup=False)
            with VerticalScroll(classes="text"):
                yield Static(self.text, markup=False)


class TextPromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = ""):
        super().__init__(classes="dialog-screen")
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, markup=False)
            yield Input(self.value, id="text")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


def _number(text: str, kind: type, name: str) -> float | int | None:
    """None for an empty field (use the default); ValueError with a reason otherwise."""
    text = text.strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be a{'n integer' if kind is int else ' number'}, not '{text}'") from None
    check(name, value)
    return value


class FormScreen(ModalScreen):
    """A form with an error line and Save/Cancel; subclasses yield their fields and implement action_save."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def form_footer(self) -> ComposeResult:
        yield Label("", id="settings-error", classes="error", markup=False)
        with Horizontal(classes="buttons"):
            yield Button("Save", variant="primary", id="save")
            yield Button("Cancel", id="cancel")

    def show_error(self, text: str) -> None:
        self.query_one("#settings-error", Label).update(text)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def action_save(self) -> None:
        raise NotImplementedError


class ConversationSettingsScreen(FormScreen):
    """System prompt, temperature, top_p and max new tokens for one conversation; empty means the default."""

    def __init__(self, current: ConvSettings, defaults: dict[str, float | int]):
        super().__init__(classes="dialog-screen")
        self.current, self.defaults = current, defaults

    def compose(self) -> ComposeResult:
        c, d = self.current, self.defaults
        with Vertical(classes="dialog wide"):
            yield Label("Conversation settings (empty fields use the defaults)")
            yield Label("System prompt")
            yield TextArea(c.system_prompt, id="system-prompt")
            with Grid(classes="fields"):
                yield Label(f"Temperature (default {d['temperature']})")
                yield Input("" if c.temperature is None else str(c.temperature), id="temperature")
                yield Label(f"top_p (default {d['top_p']})")
                yield Input("" if c.top_p is None else str(c.top_p), id="top-p")
                yield Label(f"Max new tokens (default {d['max_new_tokens']})")
                yield Input("" if c.max_new_tokens is None else str(c.max_new_tokens), id="max-new-tokens")
            yield from self.form_footer()

    def action_save(self) -> None:
        value = lambda wid: self.query_one(wid, Input).value  # noqa: E731
        try:
            settings = ConvSettings(
                system_prompt=self.query_one("#system-prompt", TextArea).text.strip(),
                temperature=_number(value("#temperature"), float, "temperature"),
                top_p=_number(value("#top-p"), float, "top_p"),
                max_new_tokens=_number(value("#max-new-tokens"), int, "max_new_tokens"),
            )
        except ValueError as exc:
            self.show_error(str(exc))
            return
        self.dismiss(settings)
