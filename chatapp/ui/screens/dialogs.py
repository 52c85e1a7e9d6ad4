"""Small modal screens: confirm, one line of text, and a conversation's settings."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, TextArea

from ...sampling import LIMITS, parse
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
    """A conversation's persona, system prompt and sampling; an empty field takes the value shown, from where it
    says. `defaults(persona key)` gives those values, so they follow a change of persona in the form."""

    def __init__(self, current: ConvSettings, defaults, personas: dict | None = None, thinking_switch: bool = False):
        super().__init__(classes="dialog-screen")
        self.current, self.defaults, self.personas = current, defaults, personas or {}
        #: The model's template can switch thinking on and off: the form offers it (else it keeps the chat's).
        self.thinking_switch = thinking_switch

    def compose(self) -> ComposeResult:
        c = self.current
        with VerticalScroll(classes="dialog wide settings"):
            yield Label("Conversation settings (an empty field takes the value shown, and says where it is from)")
            with Grid(classes="fields"):
                yield Label("persona")
                choices = [(p.name, key) for key, p in self.personas.items()]
                known = c.persona if c.persona in self.personas else Select.NULL
                yield Select(choices, value=known, prompt="No persona", id="persona")
                if self.thinking_switch:
                    yield Label("thinking")
                    now = "default" if c.thinking is None else ("on" if c.thinking else "off")
                    options = [("default", "default"), ("on", "on"), ("off", "off")]
                    yield Select(options, value=now, allow_blank=False, id="thinking")
                for name, limit in LIMITS.items():
                    yield Label(name, id=f"label-{name}", markup=False)
                    own = getattr(c, name)
                    yield Input("" if own is None else str(own), id=name.replace("_", "-"), tooltip=limit.help)
            yield Label("System prompt", id="label-system-prompt", markup=False)
            yield TextArea(c.system_prompt, id="system-prompt")
            yield from self.form_footer()

    def on_mount(self) -> None:
        self.show_defaults()

    def _persona(self) -> str | None:
        value = self.query_one("#persona", Select).value
        return None if value is Select.NULL else value

    @on(Select.Changed, "#persona")
    def show_defaults(self) -> None:
        defaults = self.defaults(self._persona())
        for name in LIMITS:
            value, source = defaults[name]
            shown = "random" if value is None else value
            self.query_one(f"#label-{name}", Label).update(f"{name} ({shown} · {source})")
        system, _source = defaults["system_prompt"]
        self.query_one("#system-prompt", TextArea).placeholder = f"the persona's: {system}" if system else ""

    def action_save(self) -> None:
        try:
            values = {name: parse(name, self.query_one(f"#{name.replace('_', '-')}", Input).value) for name in LIMITS}
        except ValueError as exc:
            self.show_error(str(exc))
            return
        persona = self._persona()
        if persona is None and self.current.persona not in self.personas:
            persona = self.current.persona  # a persona whose file is gone stays named, in case it comes back
        system = self.query_one("#system-prompt", TextArea).text.strip()
        thinking = self.current.thinking
        if self.thinking_switch:
            choice = self.query_one("#thinking", Select).value
            thinking = None if choice == "default" else choice == "on"
        self.dismiss(ConvSettings(system_prompt=system, persona=persona, thinking=thinking, **values))
