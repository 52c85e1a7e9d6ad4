"""The chat screen's side of reasoning models: a reply's thinking split from its answer as it streams, the
thinking switch per chat, and showing or hiding thinking blocks. A mixin of ChatScreen: self is the screen."""

from __future__ import annotations

from textual.containers import VerticalScroll

from ...store import ConvSettings
from ...thinking import Splitter, split
from ..widgets import thinking_title

#: The store's state key under which a chat remembers that its thinking is hidden.
HIDDEN = "hide_thinking:{}"


def markers(loaded) -> tuple[str, str] | None:
    return getattr(loaded, "thinking_markers", None) if loaded is not None else None


class ChatThinking:
    """Mixed into ChatScreen, which binds Ctrl+T to action_toggle_thinking_shown."""

    def thinking_for(self, settings: ConvSettings) -> bool | None:
        """The chat's thinking switch, else its persona's; None: the template's default (or no switch)."""
        if not getattr(self.loaded, "thinking_switch", False):
            return None
        if settings.thinking is not None:
            return settings.thinking
        persona = self.app.personas.get(settings.persona)
        return persona.thinking if persona else None

    def starts_inside(self, settings: ConvSettings) -> bool:
        """The template's generation prompt already opened the block, so the reply starts inside it (the worker
        says so for each value of the switch)."""
        inside = getattr(self.loaded, "thinking_starts_inside", None) or {}
        return bool(inside.get(self.thinking_for(settings), False))

    def splitter(self, settings: ConvSettings) -> Splitter | None:
        found = markers(self.loaded)
        return Splitter(*found, starts_inside=self.starts_inside(settings)) if found else None

    def split_reply(self, text: str, settings: ConvSettings, loaded=None) -> tuple[str, str, bool]:
        """(thinking, answer, closed) of a whole reply; a model without markers has no thinking."""
        found = markers(loaded or self.loaded)
        if not found:
            return "", text, True
        return split(text, *found, starts_inside=self.starts_inside(settings))

    @staticmethod
    def thinking_note(stats: dict | None, closed: bool = True) -> str:
        stats = stats or {}
        return thinking_title(
            stats.get("thinking_tokens"), stats.get("thinking_s"), stats.get("thinking_closed", closed)
        )

    def show_thinking_setting(self) -> None:
        """Hide or show the thinking blocks of the open chat, as it was last set for it."""
        hidden = self.conversation_id is not None and self.store.get_state(HIDDEN.format(self.conversation_id))
        self.query_one("#messages", VerticalScroll).set_class(bool(hidden), "hide-thinking")

    def action_toggle_thinking_shown(self) -> None:
        if self.conversation_id is None:
            return
        box = self.query_one("#messages", VerticalScroll)
        hide = not box.has_class("hide-thinking")
        self._remember(HIDDEN.format(self.conversation_id), "1" if hide else None)
        box.set_class(hide, "hide-thinking")
        self.notify("Thinking hidden in this chat." if hide else "Thinking shown in this chat.", timeout=2)
