"""Editing a message that has more of the chat after it: rewrite the chat from there, or branch, and what each costs."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label

from ...costs import reread_text
from ...store import StoredMessage


def _through(messages: list[StoredMessage]) -> int | None:
    """Tokens of the conversation up to the last of these messages, as the latest reply's stats among them say."""
    stats = next((m.stats for m in reversed(messages) if m.stats), None)
    return stats["prompt_tokens"] + stats["generated_tokens"] if stats else None


def edit_costs(messages: list[StoredMessage], position: int) -> tuple[int, int | None, int | None]:
    """For an edit of the message at `position`: how many messages come after it, about how many tokens they
    hold, and about how many tokens come before it (None where no stored reply says)."""
    earlier = [m for m in messages if m.position < position]
    before = _through(earlier) if earlier else 0
    total = _through(messages)
    later_tokens = total - before if total is not None and before is not None and total > before else None
    return sum(1 for m in messages if m.position > position), later_tokens, before


class EditChoiceScreen(ModalScreen[str | None]):
    """Rewrite here ('rewrite') or branch ('branch'); None: cancelled.

    Both reply after reading only the edited message while the chat's cache is in the worker, so what differs is
    what is kept; what both cost when the cache has left memory is said once, from the measured prefill rate.
    """

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("w", "dismiss('rewrite')", "Rewrite here"),
        Binding("b", "dismiss('branch')", "Branch"),
    ]

    def __init__(self, later: int, later_tokens: int | None, before_tokens: int | None, rate: float | None):
        super().__init__(classes="dialog-screen")
        held = f" ({later_tokens:,} tokens)" if later_tokens else ""
        after = "the message after it" if later == 1 else f"the {later} messages after it"
        self.rewrite = f"deletes {after}{held} and goes on from your edit"
        self.branch = "keeps this chat as it is; a new chat goes on from your edit, with a copy of this chat's cache"
        # A sliding-window layer can roll back only into the last turn, and an earlier message is before it.
        cold = (
            "if that cache has left memory (a restart, an eviction, a model switch) or the model has a sliding window"
        )
        if before_tokens == 0:
            cold = "nothing comes before it to re-read"
        elif before_tokens is None:
            cold += ", it first re-reads the messages before it"
        else:
            cold += f", it first {reread_text(before_tokens, rate)}"
        self.note = f"Either way the reply reads only your edited message while this chat's cache is in memory; {cold}."

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("This message has more of the chat after it.")
            with Grid(classes="choices"):
                yield Button("Rewrite here", id="rewrite")
                yield Label(self.rewrite, markup=False)
                yield Button("Branch", variant="primary", id="branch")
                yield Label(self.branch, markup=False)
            yield Label(self.note, id="edit-note", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#branch", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)
