"""The chat screen: conversations in a sidebar, the messages, the prompt, and the status bar."""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, ListView

from ... import protocol as p
from ...attachments import Attachment, message_text
from ...costs import prefill_rate, reread_text
from ...sampling import resolve_with_sources
from ...store import ConvSettings, StoreFull, default_title, in_tree_order
from ...thinking import ANSWER, MOVED, THINKING
from ...units import mb
from ..backend import (
    CachesEvicted,
    CacheStatesChanged,
    DownloadUpdate,
    ModelLoaded,
    ModelLoadFailed,
    ModelLoading,
    ReplyDelta,
    ReplyFailed,
    ReplyFinished,
    WorkerStopped,
)
from ..faults import unless_disk_full
from ..widgets import MessageView, PromptInput, StatusBar, code_blocks, download_line, loaded_line, stats_line
from .chat_attach import ChatAttachments, attachments_line
from .chat_attach import stored as stored_attachments
from .chat_manage import ChatManagement, chat_item
from .chat_thinking import ChatThinking
from .personas import NONE, PersonaPickScreen


@dataclass
class Turn:
    """A reply being generated. view is None while its conversation isn't on screen."""

    request_id: int
    conversation_id: int
    view: MessageView | None
    #: What writes this reply (a switch may begin before it ends).
    model: str | None = None
    preset: str | None = None
    text: str = ""
    #: Splits the stream into thinking and answer (None: the model has no thinking markers).
    splitter: object = None
    settings: ConvSettings | None = None
    #: When the first piece of thinking and the first of the answer arrived (perf_counter seconds).
    thinking_from: float | None = None
    answer_from: float | None = None


def sent_text(message) -> str:
    """What the model is given for a stored message: its text, with its attachments in front."""
    if not message.attachments:
        return message.content
    return message_text(message.content, [Attachment(**a) for a in message.attachments])


class ChatScreen(ChatManagement, ChatAttachments, ChatThinking, Screen):
    """The chat: conversations in a sidebar, the messages, the prompt and the status bar.

    It stores what the user sends and each reply, asks the app's Backend for replies, and handles the
    Backend's messages (replies streaming, the model loading, the worker stopping) with @on.
    """

    # priority: the prompt and the search box have their own uses for some of these keys (ctrl+d deletes a
    # character there), and the chat's actions must work wherever the cursor is.
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate", priority=True),
        Binding("ctrl+o", "chat_settings", "Chat settings", priority=True),
        Binding("f2", "rename_chat", "Rename", priority=True),
        Binding("ctrl+d", "delete_chat", "Delete chat", priority=True),
        # Off the footer, which is full; the palette lists it, and `b` on a message does the same.
        Binding("ctrl+b", "branch", "Branch from here", priority=True, show=False),
        Binding("ctrl+t", "toggle_thinking_shown", "Show/hide thinking", priority=True, show=False),
        Binding("ctrl+f", "search", "Search", priority=True),
        Binding("ctrl+y", "copy_reply", "Copy reply", priority=True),
        Binding("ctrl+e", "export", "Export", priority=True),
        Binding("f5", "restart_worker", "Restart worker", priority=True),
    ]

    def __init__(self):
        super().__init__()
        self.conversation_id: int | None = None
        self.turn: Turn | None = None
        #: Messages typed before they could be sent: (conversation_id, text, attachments).
        self.queued: list[tuple[int, str, list[Attachment]]] = []
        #: The attachments of the message being written, shown as chips above the prompt.
        self.pending: list[Attachment] = []
        #: Replies the disk had no room for: (conversation_id, text, add_message's keywords), saved before the
        #: next message so the chat keeps its order.
        self.unsaved: list[tuple[int, str, dict]] = []
        self.editing: int | None = None  # position of the user message being edited
        self.rates: list[float] = []

    @property
    def store(self):
        return self.app.store

    @property
    def loaded(self) -> p.Loaded | None:
        """What the worker has loaded (None while loading, or when it failed): the backend's to change."""
        return self.app.backend.loaded

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Input(placeholder="Search chats", id="search")
                yield ListView(id="chats")
            with Vertical(id="main"):
                yield VerticalScroll(id="messages")
                yield Label("", id="edit-banner")
                yield Horizontal(id="chips")
                yield PromptInput(id="prompt", soft_wrap=True, show_line_numbers=False)
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.app.backend.listen(self)
        self.query_one("#edit-banner").display = False
        self.query_one("#chips").display = False
        chats = self.store.conversations()
        last = self.store.get_state("last_conversation")
        ids = [c.id for c in chats]
        if not chats:
            chosen = self.store.new_conversation().id
        else:
            chosen = int(last) if last and last.isdigit() and int(last) in ids else ids[0]
        await self.open_conversation(chosen)
        self.query_one(PromptInput).focus()

    # -- the sidebar -------------------------------------------------------------------------

    async def refresh_chats(self) -> None:
        search = self.query_one("#search", Input).value
        chats = in_tree_order(self.store.conversations(search))
        view = self.query_one("#chats", ListView)
        await view.clear()
        states = self.app.backend.cache_states
        await view.extend(chat_item(c, depth, states.get(c.id)) for c, depth in chats)
        for index, (chat, _depth) in enumerate(chats):
            if chat.id == self.conversation_id:
                view.index = index

    @on(Input.Changed, "#search")
    async def _search_changed(self) -> None:
        await self.refresh_chats()

    @on(ListView.Selected, "#chats")
    async def _chat_selected(self, event: ListView.Selected) -> None:
        await self.open_conversation(int(event.item.name))
        self.query_one(PromptInput).focus()

    async def open_conversation(self, conversation_id: int) -> None:
        self.conversation_id = conversation_id
        self._remember("last_conversation", str(conversation_id))
        self._cancel_edit()
        box = self.query_one("#messages", VerticalScroll)
        await box.remove_children()
        messages = self.store.messages(conversation_id)
        views = [
            MessageView(
                m.role,
                m.content,
                header=_header(m.model, m.preset, m.stats) or attachments_line(m.attachments),
                cut=m.cut,
                position=m.position,
                thinking=m.thinking or "",
                thinking_note=self.thinking_note(m.stats) if m.thinking else "",
            )
            for m in messages
        ]
        self.show_thinking_setting()
        if self.turn and self.turn.conversation_id == conversation_id:
            thinking, answer, _closed = self.split_reply(self.turn.text, self.turn.settings)
            self.turn.view = MessageView("assistant", answer, header="…", thinking=thinking)
            views.append(self.turn.view)
        elif self.turn:
            self.turn.view = None
        await box.mount_all(views)
        box.scroll_end(animate=False)
        self._show_stats(self._latest_stats(messages))
        await self.refresh_chats()

    # -- sending -----------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        prompt = self.query_one(PromptInput)
        if await self.read_command(event.text.strip()):
            prompt.clear()
            return
        attachments = self.outgoing(event.text)
        if attachments is None:
            return  # said why; the prompt and the chips stay as they were
        try:
            if self.conversation_id is None:
                self.conversation_id = self.store.new_conversation().id
        except StoreFull as exc:
            self.notify(f"Not sent: {exc}. Your message is still in the prompt.", severity="error", timeout=15)
            return
        if self.turn is not None or self.loaded is None:
            # The input stays usable: what was typed waits its turn instead of being lost.
            self.queued.append((self.conversation_id, event.text, attachments))
            prompt.clear()
            await self.clear_attachments()
            why = "this reply finishes" if self.turn else "the model has loaded"
            self.notify(f"Queued: it is sent when {why}.", timeout=3)
            return
        if attachments and not self.app.backend.remote:  # a remote server counts with its own tokenizer
            self.count_first(self.conversation_id, event.text, attachments)  # sends once the count says it fits
            return
        await self.send_now(self.conversation_id, event.text, attachments)

    async def send_now(self, conversation_id: int, text: str, attachments: list[Attachment]) -> None:
        """Send what the prompt and its chips hold, then empty them; on a full disk both stay."""
        prompt = self.query_one(PromptInput)
        try:
            if self.editing is not None:
                await self._truncate(self.editing)
                self._cancel_edit()
            await self.send_user_message(conversation_id, text, attachments)
        except StoreFull as exc:
            # The prompt still holds the text: Enter sends it again once there is room.
            self.notify(f"Not sent: {exc}. Your message is still in the prompt.", severity="error", timeout=15)
            return
        if prompt.text == text:  # typed on while the count came back: that stays
            prompt.clear()
        await self.clear_attachments()

    def history(self, conversation_id: int, before: int | None = None) -> list[tuple[str, str]]:
        """The chat as the model is given it: the system prompt, then each message with its attachments (only
        those before position `before`, when given)."""
        conversation = self.store.conversation(conversation_id)
        messages = self.store.messages(conversation_id)
        history = [(m.role, sent_text(m)) for m in messages if before is None or m.position < before]
        system = self.system_prompt(conversation.settings)
        return [("system", system), *history] if system else history

    @on(PromptInput.LargePaste)
    async def _large_paste(self, event: PromptInput.LargePaste) -> None:
        await self.attach(Attachment("pasted text", event.text, "paste"))

    async def send_user_message(self, conversation_id: int, text: str, attachments: list[Attachment] = ()) -> None:
        """Store the message (and any reply the disk had no room for before it), then ask for a reply.
        Raises StoreFull, having stored nothing of `text`."""
        self._save_unsaved()
        stored = self.store.add_message(conversation_id, "user", text, attachments=stored_attachments(attachments))
        conversation = self.store.conversation(conversation_id)
        if conversation.title == "New chat" and stored.position == 0:
            try:
                self.store.rename(conversation_id, default_title(text))
            except StoreFull:
                pass  # the message is stored; a title can be given later
        if conversation_id == self.conversation_id:
            box = self.query_one("#messages", VerticalScroll)
            header = attachments_line(stored.attachments)
            await box.mount(MessageView("user", text, header=header, position=stored.position))
        await self.refresh_chats()
        await self.generate(conversation_id)

    def _save_unsaved(self) -> None:
        """Store the replies the disk had no room for, oldest first; raises StoreFull if it still has none."""
        while self.unsaved:
            reply_to, reply, about = self.unsaved[0]
            self.store.add_message(reply_to, "assistant", reply, **about)
            self.unsaved.pop(0)

    def save_unsaved(self) -> bool:
        """Whether every reply is stored now (the app asks before quitting otherwise)."""
        try:
            self._save_unsaved()
        except StoreFull:
            return False
        return True

    async def generate(self, conversation_id: int) -> None:
        conversation = self.store.conversation(conversation_id)
        history = self.history(conversation_id)
        loaded = self.loaded
        settings = conversation.settings
        params, _sources = resolve_with_sources(self.sampling_layers(settings))
        request_id = self.app.backend.generate(conversation_id, history, params, self.thinking_for(settings))
        if request_id is None:
            self.notify("The worker is not running: press F5 to restart it.", severity="error")
            return
        turn = Turn(request_id, conversation_id, None, loaded and loaded.model, loaded and loaded.preset)
        turn.splitter, turn.settings = self.splitter(settings), settings
        self.turn = turn
        if conversation_id == self.conversation_id:
            turn.view = MessageView("assistant", header="…")
            box = self.query_one("#messages", VerticalScroll)
            await box.mount(turn.view)
            box.scroll_end(animate=False)

    async def _next_queued(self) -> None:
        if self.turn is None and self.loaded is not None and self.queued:
            conversation_id, text, attachments = self.queued.pop(0)
            try:
                await self.send_user_message(conversation_id, text, attachments)
            except StoreFull as exc:
                prompt = self.query_one(PromptInput)
                prompt.text = "\n\n".join(t for t in (text, prompt.text) if t.strip())
                for attachment in attachments:
                    await self.attach(attachment)
                self.notify(
                    f"Not sent: {exc}. Your queued message is back in the prompt.", severity="error", timeout=15
                )

    def _remember(self, key: str, value: str) -> None:
        try:
            self.store.set_state(key, value)
        except StoreFull:
            pass  # which chat or model was last is a convenience; the next write that matters says the disk is full

    # -- worker events -----------------------------------------------------------------------

    @on(ModelLoading)
    def _loading(self, event: ModelLoading) -> None:
        self.query_one(StatusBar).busy(event.text, event.done, event.total)

    @on(DownloadUpdate)
    def _downloading(self, event: DownloadUpdate) -> None:
        line = download_line(event.done, event.total, event.bytes_per_s)
        self.query_one(StatusBar).busy(f"downloading {event.ref}: {line}", event.done, event.total)

    @on(ModelLoaded)
    async def _loaded(self, event: ModelLoaded) -> None:
        status = self.query_one(StatusBar)
        status.idle()
        status.model_line = loaded_line(event.info)
        if self.conversation_id is not None:
            self._show_stats(self._latest_stats(self.store.messages(self.conversation_id)))
        if not self.app.backend.remote:  # a server's model id means nothing to the local worker next time
            self._remember("last_model", self.app.backend.model)
            self._remember("last_preset", self.app.backend.preset)
        for note in event.info.notes:
            self.notify(note, timeout=8)
        await self._next_queued()

    @on(ModelLoadFailed)
    def _load_failed(self, event: ModelLoadFailed) -> None:
        status = self.query_one(StatusBar)
        self.notify(event.error, severity="error", timeout=10)
        status.idle()
        if event.still_loaded is not None:
            status.model_line = loaded_line(event.still_loaded)
            return
        status.model_line = f"no model loaded: {event.error}"
        if event.going_back:
            model, preset = event.going_back
            self.notify(f"Going back to {model} ({preset}).", timeout=6)

    @on(ReplyDelta)
    async def _delta(self, event: ReplyDelta) -> None:
        turn = self.turn
        if turn is None or event.request_id != turn.request_id:
            return
        turn.text += event.text
        pieces = turn.splitter.feed(event.text) if turn.splitter else [("answer", event.text)]
        for kind, piece in pieces:
            if kind == MOVED:  # what streamed as answer was thinking: its time counts as thinking's
                turn.thinking_from, turn.answer_from = turn.answer_from, None
            elif kind == THINKING and turn.thinking_from is None:
                turn.thinking_from = time.perf_counter()
            elif kind == ANSWER and piece.strip() and turn.answer_from is None:
                turn.answer_from = time.perf_counter()
            if turn.view is not None:
                show = {THINKING: turn.view.append_thinking, MOVED: turn.view.move_to_thinking}.get(kind)
                await (show or turn.view.append)(piece)
        if turn.view is not None:
            self.query_one("#messages", VerticalScroll).scroll_end(animate=False)

    @on(ReplyFinished)
    async def _finished(self, event: ReplyFinished) -> None:
        if self.turn is not None and event.request_id == self.turn.request_id:
            await self._finish(event.text, event.stats.as_dict())

    @on(ReplyFailed)
    async def _failed(self, event: ReplyFailed) -> None:
        self.notify(event.error, severity="error", timeout=10)
        if self.counting is not None and event.request_id == self.counting[0]:
            self.counting = None  # the message stays in the prompt, to send again
        if self.turn is not None and event.request_id == self.turn.request_id:
            await self._finish(self.turn.text, None, failed=True)

    @on(CacheStatesChanged)
    async def _cache_states_changed(self) -> None:
        await self.refresh_chats()

    @on(CachesEvicted)
    def _evicted(self, event: CachesEvicted) -> None:
        parts = []
        if event.parked:
            parts.append(f"{len(event.parked)} other chat(s) moved their KV cache from the GPU to CPU RAM")
        if event.conversation_ids:
            then = "their next reply reads it back from disk" if event.to_disk else "their next reply re-reads it once"
            parts.append(f"{len(event.conversation_ids)} other chat(s) left the KV cache; {then}")
        self.notify(
            f"{'; '.join(parts)} (freed {mb(event.freed_bytes)}).",
            timeout=6,
        )

    @on(WorkerStopped)
    async def _worker_stopped(self, event: WorkerStopped) -> None:
        status = self.query_one(StatusBar)
        status.idle()
        status.model_line = f"the worker stopped ({event.why}): press F5 to restart it"
        detail = f": {event.detail}" if event.detail else ""
        self.notify(
            f"The model worker stopped ({event.why}){detail}. Your chats are safe.", severity="error", timeout=15
        )
        if self.turn is not None:
            await self._finish(self.turn.text, None, failed=True)

    async def _finish(self, text: str, stats: dict | None, failed: bool = False) -> None:
        """Store the reply (a stopped or failed one too, when anything arrived) and update the screen."""
        turn, self.turn = self.turn, None
        cut = failed or (stats or {}).get("finish_reason") == "cancelled"
        model, preset = turn.model, turn.preset
        thinking, text, closed = self.split_reply(text, turn.settings) if turn.splitter else ("", text, True)
        if thinking and stats is not None:
            ended = turn.answer_from or time.perf_counter()
            took = ended - turn.thinking_from if turn.thinking_from else None
            stats = {**stats, "thinking_s": took, "thinking_closed": closed}
        if text or thinking or not failed:
            about = {"model": model, "preset": preset, "stats": stats, "cut": cut, "thinking": thinking or None}
            try:
                stored = self.store.add_message(turn.conversation_id, "assistant", text, **about)
            except StoreFull as exc:
                self.unsaved.append((turn.conversation_id, text, about))
                self.notify(
                    f"Reply not saved yet: {exc}. It is kept, and saved with your next message.", severity="error"
                )
            else:
                if turn.view is not None:
                    turn.view.position = stored.position
        if turn.view is not None:
            if text or thinking or not failed:
                await turn.view.finish(text)
                turn.view.set_header(_header(model, preset, stats), cut=cut)
                if thinking:
                    turn.view.set_thinking_note(self.thinking_note(stats, closed))
            else:
                await turn.view.remove()
            self._show_stats(stats)
        if stats:
            self.rates.append(stats["decode_tokens_per_s"])
            self.query_one(StatusBar).rates(self.rates)
        await self.refresh_chats()
        await self._next_queued()

    @staticmethod
    def _latest_stats(messages) -> dict | None:
        return next((m.stats for m in reversed(messages) if m.stats), None)

    def _show_stats(self, stats: dict | None) -> None:
        status = self.query_one(StatusBar)
        context = self.loaded.context_length if self.loaded else None
        status.numbers = stats_line(stats, context) if stats else ""
        dropped = (stats or {}).get("dropped_messages", 0)
        notices = [f"⚠ {dropped} old message(s) no longer fit the context"] if dropped else []
        notices += [(stats or {}).get("cache_note", "")]
        status.notice = " · ".join(filter(None, notices))

    # -- actions -----------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.turn is not None:
            self.app.backend.cancel(self.turn.request_id)
        elif self.editing is not None:
            self._cancel_edit()

    async def action_new_chat(self) -> None:
        """A new chat; where there are personas, after picking one (or none)."""
        if not self.app.personas:
            await self.new_chat(None)
            return
        last = self.store.get_state("last_persona")

        async def picked(key: str | None) -> None:
            if key is not None:
                await self.new_chat(None if key == NONE else key)

        self.app.push_screen(PersonaPickScreen(self.app.personas, last), picked)

    @unless_disk_full
    async def new_chat(self, persona: str | None) -> None:
        self.store.set_state("last_persona", persona)
        await self.open_conversation(self.store.new_conversation(settings=ConvSettings(persona=persona)).id)
        self.query_one(PromptInput).focus()

    @unless_disk_full
    async def action_regenerate(self) -> None:
        if self.turn is not None or self.conversation_id is None:
            return
        if self.loaded is None:
            self.notify("No model is loaded yet.", timeout=3)
            return
        messages = self.store.messages(self.conversation_id)
        if not messages:
            return
        if messages[-1].role == "assistant":
            await self._truncate(messages[-1].position)
        await self.generate(self.conversation_id)

    async def _truncate(self, position: int) -> None:
        """Delete the messages from `position` on, in the store and on screen."""
        self.store.delete_from(self.conversation_id, position)
        for view in list(self.query(MessageView)):
            if view.position >= position:
                await view.remove()

    def _cancel_edit(self) -> None:
        self.editing = None
        banner = self.query_one("#edit-banner", Label)
        banner.display = False

    @on(MessageView.Action)
    async def _message_action(self, event: MessageView.Action) -> None:
        view = event.view
        if event.action == "copy":
            # What shows is what is copied: an open thinking block goes with the answer.
            block = view.thinking_block
            with_thinking = block is not None and not block.collapsed and block.display
            text = f"{view.thinking.strip()}\n\n{view.content}" if with_thinking else view.content
            self.app.copy_to_clipboard(text)
            self.notify("Message copied, with its thinking." if with_thinking else "Message copied.", timeout=2)
        elif event.action == "copy_code":
            blocks = code_blocks(view.content)
            if not blocks:
                self.notify("No code block in this message.", timeout=2)
                return
            self.app.copy_to_clipboard("\n\n".join(blocks))
            self.notify(f"{len(blocks)} code block(s) copied.", timeout=2)
        elif event.action == "edit" and view.role == "user" and self.turn is None:
            self._edit(view.position, view.content)
        elif event.action == "regenerate" and view.role == "assistant":
            await self.action_regenerate()
        elif event.action == "branch":
            await self._branch_at(view)

    def switch_cost(self) -> str:
        """What a switch of model or preset costs this chat, said before it happens; "" with nothing to re-read."""
        if self.conversation_id is None:
            return ""
        stats = self._latest_stats(self.store.messages(self.conversation_id))
        if not stats:
            return ""
        rate = self._prefill_rate()
        kept = "; its cache for what is loaded now stays on disk for a switch back" if self._snapshots_on() else ""
        return f"After a switch, this chat's next reply {reread_text(stats['cache_tokens'], rate)}{kept}."

    def _prefill_rate(self) -> float | None:
        """Tokens/s this machine prefilled at with what is loaded, from the stored turns (None: not measured)."""
        loaded = self.loaded
        return prefill_rate(self.store.recent_stats(loaded.model, loaded.preset)) if loaded else None

    def _snapshots_on(self) -> bool:
        return self.app.settings.kv_disk_budget > 0

    def action_restart_worker(self) -> None:
        if self.app.backend.client.alive:
            self.notify("The worker is running.", timeout=2)
            return
        self.app.backend.restart()


def _header(model: str | None, preset: str | None, stats: dict | None) -> str:
    parts = [x for x in (model, preset) if x]
    if stats:
        thinking = stats.get("thinking_tokens") or 0
        # Thinking and answer are counted apart: the answer's tokens, then the thinking's.
        split = f" + {thinking} thinking" if thinking else ""
        parts.append(f"{stats['generated_tokens'] - thinking} tok{split} · {stats['decode_tokens_per_s']:.1f} tok/s")
    return " · ".join(parts)
