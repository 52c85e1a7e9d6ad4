"""The chat screen's chat management: edit, branch, rename, delete, per-chat settings, search, copy, export;
and the sidebar's rows. A mixin of ChatScreen, which holds the bindings."""

from __future__ import annotations

import errno
import re

from textual.widgets import Input, Label, ListItem

from ...private import private_dir, write_private_text
from ...sampling import resolve_with_sources
from ...store import ConvSettings
from ..faults import noting_disk_full, unless_disk_full
from ..widgets import MessageView, PromptInput
from .dialogs import ConfirmScreen, ConversationSettingsScreen, TextPromptScreen
from .edit_choice import EditChoiceScreen, edit_costs


class ChatManagement:
    """What the user does to chats, as opposed to turns. Mixed into ChatScreen: self is the screen."""

    def _edit(self, position: int, content: str) -> None:
        """Edit a message of the user's; one with more of the chat after it offers a branch instead, with the costs."""
        messages = self.store.messages(self.conversation_id)
        if not any(m.role == "user" and m.position > position for m in messages):
            self._start_edit(position, content)
            return
        rate = self._prefill_rate()

        async def chosen(choice: str | None) -> None:
            if choice == "rewrite":
                self._start_edit(position, content)
            elif choice == "branch":
                await self.branch_from(position, "user", content)

        self.app.push_screen(EditChoiceScreen(*edit_costs(messages, position), rate), chosen)

    def _start_edit(self, position: int, content: str) -> None:
        self.editing = position
        prompt = self.query_one(PromptInput)
        prompt.text = content
        banner = self.query_one("#edit-banner", Label)
        banner.update("Editing an earlier message: Enter re-runs the chat from there, Esc cancels.")
        banner.display = True
        prompt.focus()

    async def action_branch(self) -> None:
        """Branch from the focused message, else from the last one."""
        await self._branch_at(self.focused if isinstance(self.focused, MessageView) else None)

    async def _branch_at(self, view: MessageView | None) -> None:
        if self.conversation_id is None:
            return
        writing = self.turn is not None and self.turn.conversation_id == self.conversation_id
        if (view is None and writing) or (view is not None and view.position < 0):
            self.notify("A reply is still being written here: branch from it once it has finished.", timeout=3)
        elif view is not None:
            await self.branch_from(view.position, view.role, view.content)
        elif messages := self.store.messages(self.conversation_id):
            await self.branch_from(messages[-1].position, messages[-1].role, messages[-1].content)
        else:
            self.notify("Nothing to branch from yet.", timeout=3)

    @unless_disk_full
    async def branch_from(self, position: int, role: str, content: str) -> None:
        """A new chat holding this one's messages up to the one at `position`, which starts from a copy of this
        chat's cache. From a message of the user's, the branch stops before it and the prompt holds it to change."""
        parent = self.store.conversation(self.conversation_id)
        branch = self.store.branch(parent.id, position - 1 if role == "user" else position)
        self.app.backend.branch(branch.id, parent.id)
        await self.open_conversation(branch.id)
        prompt = self.query_one(PromptInput)
        if role == "user":
            prompt.text = content
        prompt.focus()
        self.notify(f"Branched into a new chat; “{parent.title}” stays as it was.", timeout=4)

    def sampling_layers(self, chat: ConvSettings, own: bool = True) -> list[tuple[str, object]]:
        """Where a reply's sampling comes from, most specific first (see sampling.resolve_with_sources); own:
        with the chat's own values (without: what an empty field in its settings falls back to)."""
        persona = self.app.personas.get(chat.persona)
        return [
            *([("chat", chat)] if own else []),
            *([("persona", persona.sampling)] if persona else []),
            ("model", self.loaded.sampling if self.loaded else {}),
            ("config", self.app.settings),
        ]

    def system_prompt(self, chat: ConvSettings) -> str:
        """The chat's own system prompt, else its persona's."""
        persona = self.app.personas.get(chat.persona)
        return chat.system_prompt or (persona.system_prompt if persona else "")

    def action_chat_settings(self) -> None:
        if self.conversation_id is None:
            return
        conversation = self.store.conversation(self.conversation_id)

        def defaults(persona: str | None) -> dict[str, tuple[object, str]]:
            chat = ConvSettings(persona=persona)
            params, sources = resolve_with_sources(self.sampling_layers(chat, own=False))
            values = {name: (getattr(params, name), sources[name]) for name in sources}
            return {**values, "system_prompt": (self.system_prompt(chat), "persona" if persona else "none")}

        def saved(settings) -> None:
            if settings is not None:
                self.store.set_settings(conversation.id, settings)
                self.notify("Chat settings saved.", timeout=2)

        switch = bool(getattr(self.loaded, "thinking_switch", False))
        dialog = ConversationSettingsScreen(conversation.settings, defaults, self.app.personas, switch)
        self.app.push_screen(dialog, noting_disk_full(self, saved))

    def action_rename_chat(self) -> None:
        if self.conversation_id is None:
            return
        conversation = self.store.conversation(self.conversation_id)

        async def renamed(title: str | None) -> None:
            if title:
                self.store.rename(conversation.id, title)
                await self.refresh_chats()

        self.app.push_screen(TextPromptScreen("Rename chat", conversation.title), noting_disk_full(self, renamed))

    def action_delete_chat(self) -> None:
        if self.conversation_id is None:
            return
        conversation = self.store.conversation(self.conversation_id)
        branches = sum(1 for c in self.store.conversations() if c.parent_id == conversation.id)
        keeps = f" Its {branches} branch(es) stay, as chats of their own." if branches else ""

        async def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            if self.turn and self.turn.conversation_id == conversation.id:
                self.app.backend.cancel(self.turn.request_id)
            self.store.delete(conversation.id)
            self.app.backend.forget(conversation.id)
            rest = self.store.conversations()
            await self.open_conversation(rest[0].id if rest else self.store.new_conversation().id)
            self.notify(f"Deleted “{conversation.title}”.", timeout=3)

        question = f"Delete “{conversation.title}” and all its messages?{keeps}"
        self.app.push_screen(ConfirmScreen(question), noting_disk_full(self, confirmed))

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_copy_reply(self) -> None:
        replies = [v for v in self.query(MessageView) if v.role == "assistant" and v.content]
        if replies:
            self.app.copy_to_clipboard(replies[-1].content)
            self.notify("Last reply copied.", timeout=2)

    def action_export(self) -> None:
        if self.conversation_id is None:
            return
        conversation = self.store.conversation(self.conversation_id)
        folder = self.app.settings.data_dir / "exports"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", conversation.title).strip("-").lower() or "chat"
        path = folder / f"{slug}-{conversation.id}.md"
        try:
            # Thinking goes into the export when the chat shows it (Ctrl+T hides it).
            shown = not self.query_one("#messages").has_class("hide-thinking")
            text = self.store.export_markdown(conversation.id, thinking=shown)
            write_private_text(private_dir(folder) / path.name, text)
        except OSError as exc:  # nothing half-written is left: write_private_text renames a whole file into place
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            why = f"the disk holding {folder} is full" if full else f"{exc.filename or path}: {exc.strerror or exc}"
            self.notify(f"Not exported: {why}.", severity="error", timeout=10)
            return
        self.notify(f"Exported to {path}", timeout=8)


#: The sidebar's mark for where a chat's KV cache is, and its tooltip.
CACHE_MARKS = {"live": "● ", "parked": "◐ ", "disk": "○ ", None: "  "}
CACHE_TIPS = {
    "live": "KV cache in memory: the next reply reads only your message",
    "parked": "KV cache parked in CPU RAM: it moves back to the GPU in a moment",
    "disk": "KV cache on disk: the next reply reads it back instead of the whole chat",
    None: "no KV cache: the next reply reads the whole chat",
}


def chat_item(chat, depth: int, state: str | None) -> ListItem:
    item = ListItem(Label(CACHE_MARKS[state] + _indent(depth) + chat.title, markup=False), name=str(chat.id))
    item.tooltip = CACHE_TIPS[state]
    return item


def _indent(depth: int) -> str:
    return "" if depth == 0 else "  " * (depth - 1) + "└ "
