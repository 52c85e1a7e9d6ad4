"""The chat screen's attachments: files (`@path`, `/read PATH`) and large pastes, shown as chips above the
prompt until the message is sent with them. A mixin of ChatScreen: self is the screen."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button

from ...attachments import Attachment, AttachmentError, find_references, message_text, paste_label, read_attachment
from ...sampling import resolve_with_sources
from ..backend import MessageCounted
from .dialogs import ConfirmScreen, TextScreen

READ_COMMAND = "/read "


def chip_label(attachment: Attachment) -> str:
    if attachment.kind == "paste":
        return f"📎 {paste_label(attachment.content)}"
    return f"📎 {attachment.name} · {len(attachment.content):,} chars"


def attachments_line(stored: list[dict]) -> str:
    """A stored message's attachments, for its header."""
    return " · ".join(chip_label(Attachment(**a)) for a in stored)


class Chip(Button):
    """One attachment waiting to be sent: Enter or a click opens it, Delete or Backspace takes it off."""

    BINDINGS = [Binding("delete,backspace", "remove_chip", "Remove")]

    def __init__(self, attachment: Attachment):
        super().__init__(chip_label(attachment), classes="chip")
        self.attachment = attachment

    def action_remove_chip(self) -> None:
        self.screen.remove_attachment(self)


class ChatAttachments:
    """The attachments of the message being written. Mixed into ChatScreen, which composes #chips."""

    pending: list[Attachment]
    #: A message waiting for its token count: (request id, conversation id, text, attachments).
    counting: tuple | None = None

    @property
    def cwd(self) -> Path:
        return Path.cwd()

    async def attach(self, attachment: Attachment) -> None:
        self.pending.append(attachment)
        await self.query_one("#chips", Horizontal).mount(Chip(attachment))
        self.query_one("#chips", Horizontal).display = True

    def remove_attachment(self, chip: Chip) -> None:
        self.pending.remove(chip.attachment)
        chip.remove()
        self.query_one("#chips", Horizontal).display = len(self.pending) > 0
        self.query_one("#prompt").focus()

    async def clear_attachments(self) -> None:
        self.pending.clear()
        chips = self.query_one("#chips", Horizontal)
        await chips.remove_children()
        chips.display = False

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if isinstance(event.button, Chip):
            event.stop()
            a = event.button.attachment
            self.app.push_screen(TextScreen(f"{a.name} ({len(a.content):,} chars)", a.content))

    async def read_command(self, text: str) -> bool:
        """`/read PATH` typed as the whole message: attach the file. True when the text was that command."""
        if not text.startswith(READ_COMMAND):
            return False
        path = text[len(READ_COMMAND) :].strip()
        try:
            attachment = read_attachment(path, self.cwd)
        except AttachmentError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return True
        await self.attach(attachment)
        self.notify(f"Attached {attachment.name} ({len(attachment.content):,} chars).", timeout=3)
        return True

    def count_first(self, conversation_id: int, text: str, attachments: list[Attachment]) -> None:
        """Ask the worker what the message with its attachments costs in tokens; on_message_counted goes on."""
        messages = [*self.history(conversation_id, before=self.editing), ("user", message_text(text, attachments))]
        settings = self.store.conversation(conversation_id).settings
        params, _sources = resolve_with_sources(self.sampling_layers(settings))
        request_id = self.app.backend.count(messages, params.max_new_tokens)
        if request_id is None:
            self.notify("The worker is not running: press F5 to restart it.", severity="error")
            return
        self.counting = (request_id, conversation_id, text, attachments)

    async def on_message_counted(self, event: MessageCounted) -> None:
        c = event.counted
        if self.counting is None or c.request_id != self.counting[0]:
            return
        _request, conversation_id, text, attachments = self.counting
        self.counting = None
        numbers = (
            f"this message is {c.message_tokens:,} tokens, and the chat with it {c.prompt_tokens:,}; the model's "
            f"context is {c.context_length:,}, with {c.context_length - c.room:,} kept for the reply"
        )
        if c.too_long:
            self.notify(
                f"Not sent: {numbers}. It can't fit even without the older turns: take an attachment off, or "
                "shorten it.",
                severity="error",
                timeout=15,
            )
            return
        if not c.fits:

            async def chosen(send: bool | None) -> None:
                if send:
                    await self.send_now(conversation_id, text, attachments)

            question = f"This won't fit: {numbers}. Send anyway? The oldest turns are dropped to make room."
            self.app.push_screen(ConfirmScreen(question, yes="Send anyway"), chosen)
            return
        self.notify(f"Sending {c.message_tokens:,} tokens ({c.prompt_tokens:,} of {c.context_length:,}).", timeout=4)
        await self.send_now(conversation_id, text, attachments)

    def outgoing(self, text: str) -> list[Attachment] | None:
        """What goes with `text`: the chips, then the files its @paths name; None (said in one line) when one
        of those can't be read, so nothing is sent."""
        try:
            named = [read_attachment(path, self.cwd) for path in find_references(text, self.cwd)]
        except AttachmentError as exc:
            self.notify(f"Not sent: {exc}", severity="error", timeout=10)
            return None
        return [*self.pending, *named]


def stored(attachments: list[Attachment]) -> list[dict]:
    return [asdict(a) for a in attachments]
