"""Personas in the UI: pick one for a new chat, and manage them (new, edit, duplicate, delete)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, Label, OptionList, Select, TextArea
from textual.widgets.option_list import Option

from ...personas import Persona, copy_of, delete_persona, free_key, save_persona
from ...sampling import LIMITS, parse
from .dialogs import ConfirmScreen, FormScreen

#: The OptionList id of "no persona" (a persona key can't start with a space).
NONE = " none"
THINKING = [("the template's default", "default"), ("on", "on"), ("off", "off")]


def persona_line(persona: Persona) -> str:
    mark = " (shipped)" if persona.shipped else ""
    return f"{persona.name}{mark}: {persona.description}" if persona.description else f"{persona.name}{mark}"


class PersonaPickScreen(ModalScreen[str | None]):
    """The persona for a new chat: dismisses with its key, NONE for none, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, personas: dict[str, Persona], current: str | None = None):
        super().__init__(classes="dialog-screen")
        self.personas, self.current = personas, current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("New chat: pick a persona (Enter), or Esc to cancel", markup=False)
            options = [Option("No persona: the model's defaults", id=NONE)]
            options += [Option(persona_line(p), id=key) for key, p in self.personas.items()]
            yield OptionList(*options, id="personas")

    def on_mount(self) -> None:
        listing = self.query_one(OptionList)
        if self.current in self.personas:
            listing.highlighted = list(self.personas).index(self.current) + 1

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class PersonaFormScreen(FormScreen):
    """One persona's fields; dismisses with the Persona to save, or None. `taken`: keys in use by others."""

    def __init__(self, persona: Persona, taken: set[str]):
        super().__init__(classes="dialog-screen")
        self.persona, self.taken = persona, taken

    def compose(self) -> ComposeResult:
        p = self.persona
        thinking = "default" if p.thinking is None else ("on" if p.thinking else "off")
        with VerticalScroll(classes="dialog wide settings"):
            yield Label(f"Persona '{p.key}' (empty sampling fields come from the model, then config)", markup=False)
            with Grid(classes="fields"):
                yield Label("name")
                yield Input(p.name, id="persona-name")
                yield Label("description")
                yield Input(p.description, id="persona-description")
                yield Label("thinking")
                yield Select(THINKING, value=thinking, allow_blank=False, id="persona-thinking")
                for name, limit in LIMITS.items():
                    yield Label(name)
                    value = p.sampling.get(name)
                    yield Input("" if value is None else str(value), id=f"persona-{name}", tooltip=limit.help)
            yield Label("System prompt")
            yield TextArea(p.system_prompt, id="persona-system-prompt")
            yield from self.form_footer()

    def action_save(self) -> None:
        name = self.query_one("#persona-name", Input).value.strip()
        if not name:
            self.show_error("a persona needs a name")
            return
        try:
            sampling = {n: parse(n, self.query_one(f"#persona-{n}", Input).value) for n in LIMITS}
        except ValueError as exc:
            self.show_error(str(exc))
            return
        thinking = self.query_one("#persona-thinking", Select).value
        self.dismiss(
            Persona(
                key=self.persona.key,
                name=name,
                description=self.query_one("#persona-description", Input).value.strip(),
                system_prompt=self.query_one("#persona-system-prompt", TextArea).text.strip(),
                sampling={n: v for n, v in sampling.items() if v is not None},
                thinking=None if thinking == "default" else thinking == "on",
            )
        )


class PersonasScreen(ModalScreen[None]):
    """The personas, with keys to make, edit, duplicate and delete them; saves go to <config_dir>/personas."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Close"),
        Binding("n", "new", "New"),
        Binding("e", "edit", "Edit"),
        Binding("d", "duplicate", "Duplicate"),
        Binding("delete", "delete", "Delete"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Personas: n new · e or Enter edit · d duplicate · Del delete · Esc close", markup=False)
            yield OptionList(id="personas")
            yield Label("", id="personas-error", classes="error", markup=False)

    def on_mount(self) -> None:
        self.refresh_list()

    @property
    def personas(self) -> dict[str, Persona]:
        return self.app.personas

    def refresh_list(self, highlight: str | None = None) -> None:
        listing = self.query_one(OptionList)
        listing.clear_options()
        listing.add_options([Option(persona_line(p), id=key) for key, p in self.personas.items()])
        keys = list(self.personas)
        if keys:
            listing.highlighted = keys.index(highlight) if highlight in keys else 0

    def _selected(self) -> Persona | None:
        listing = self.query_one(OptionList)
        if listing.highlighted is None:
            return None
        return self.personas.get(listing.get_option_at_index(listing.highlighted).id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.action_edit()

    def _edit(self, persona: Persona) -> None:
        taken = set(self.personas) - {persona.key}

        def saved(result: Persona | None) -> None:
            if result is None:
                return
            try:
                save_persona(self.app.settings.config_dir, result)
            except (OSError, ValueError) as exc:
                self.query_one("#personas-error", Label).update(f"can't save persona '{result.key}': {exc}")
                return
            self.app.reload_personas()
            self.refresh_list(result.key)
            self.app.notify(f"Persona '{result.name}' saved.", timeout=3)

        self.app.push_screen(PersonaFormScreen(persona, taken), saved)

    def action_new(self) -> None:
        self._edit(Persona(key=free_key(self.personas, "persona"), name="New persona"))

    def action_edit(self) -> None:
        persona = self._selected()
        if persona is not None:
            self._edit(persona)

    def action_duplicate(self) -> None:
        persona = self._selected()
        if persona is not None:
            self._edit(copy_of(persona, self.personas))

    def action_delete(self) -> None:
        persona = self._selected()
        if persona is None:
            return
        if persona.shipped:
            self.query_one("#personas-error", Label).update(f"'{persona.name}' ships with chatapp: it can't be deleted")
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                delete_persona(self.app.settings.config_dir, persona.key)
            except OSError as exc:
                self.query_one("#personas-error", Label).update(f"can't delete '{persona.name}': {exc}")
                return
            self.app.reload_personas()
            self.refresh_list()

        self.app.push_screen(
            ConfirmScreen(f"Delete persona '{persona.name}'? Chats using it keep their messages."), confirmed
        )
