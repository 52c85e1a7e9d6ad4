"""The chat screen's widgets: a message, the prompt input, the status bar."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Collapsible, Label, Markdown, ProgressBar, Sparkline, Static, TextArea

from ..attachments import complete_path, is_large_paste
from ..units import duration, eta_s, mb, size

if TYPE_CHECKING:
    from ..hardware import Hardware

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def code_blocks(markdown: str) -> list[str]:
    return [block.rstrip("\n") for block in CODE_BLOCK.findall(markdown)]


class ThinkingBlock(Collapsible):
    """A reply's thinking: dimmed, labelled, open while it streams and folded once the answer starts."""

    def __init__(self, text: str, title: str, collapsed: bool):
        super().__init__(Static(text, classes="thinking-text", markup=False), title=title, collapsed=collapsed)
        self.add_class("thinking")

    def show_text(self, text: str) -> None:
        self.query_one(".thinking-text", Static).update(text)


def thinking_title(tokens: int | None = None, seconds: float | None = None, closed: bool = True) -> str:
    """'thinking · 312 tokens · 4.2 s'; while it streams, 'thinking…'; a block never closed says so."""
    if tokens is None:
        return "thinking…"
    parts = ["thinking", f"{tokens:,} tokens"] + ([duration(seconds)] if seconds else [])
    return " · ".join(parts) + ("" if closed else " · never closed: the reply ended inside it")


class MessageView(Vertical, can_focus=True):
    """One message: a header line, a reply's thinking (folded), and the Markdown body. Focus it to copy it,
    edit it, regenerate it, branch from it, or show its thinking."""

    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("k", "copy_code", "Copy code"),
        Binding("t", "toggle_thinking", "Thinking", show=False),
        Binding("e", "edit", "Edit", show=False),
        Binding("r", "regenerate", "Regenerate", show=False),
        Binding("b", "branch", "Branch from here", show=False),
    ]

    class Action(Message):
        def __init__(self, view: MessageView, action: str):
            super().__init__()
            self.view, self.action = view, action

    def __init__(
        self,
        role: str,
        content: str = "",
        *,
        header: str = "",
        cut: bool = False,
        position: int = -1,
        thinking: str = "",
        thinking_note: str = "",
    ):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.position = position
        self.cut = cut
        self._header = header
        self.stream = None
        self.thinking = thinking
        self._thinking_note = thinking_note or thinking_title(None)

    def compose(self) -> ComposeResult:
        yield Label(self._header_text(), classes="message-header", markup=False)
        if self.thinking:
            yield ThinkingBlock(self.thinking, self._thinking_note, collapsed=True)
        yield Markdown(self.content, classes="message-body")

    @property
    def thinking_block(self) -> ThinkingBlock | None:
        blocks = self.query(ThinkingBlock)
        return blocks.first() if blocks else None

    async def append_thinking(self, text: str) -> None:
        """Stream a fragment of thinking into its block, made open on the first one."""
        self.thinking += text
        block = self.thinking_block
        if block is None:
            await self.mount(ThinkingBlock(self.thinking, self._thinking_note, collapsed=False), before=self.body)
        else:
            block.show_text(self.thinking)

    async def move_to_thinking(self, text: str) -> None:
        """The answer's last `text` was thinking after all (a close marker came with no open one)."""
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        self.content = self.content[: len(self.content) - len(text)]
        await self.body.update(self.content)
        self.thinking = text + self.thinking
        block = self.thinking_block
        if block is None:
            await self.mount(ThinkingBlock(self.thinking, self._thinking_note, collapsed=False), before=self.body)
        else:
            block.show_text(self.thinking)

    def set_thinking_note(self, note: str) -> None:
        self._thinking_note = note
        if self.thinking_block is not None:
            self.thinking_block.title = note

    def action_toggle_thinking(self) -> None:
        block = self.thinking_block
        if block is not None:
            block.collapsed = not block.collapsed

    def _header_text(self) -> str:
        who = {"user": "You", "assistant": "Assistant", "system": "System"}.get(self.role, self.role)
        parts = [who] + ([self._header] if self._header else []) + (["stopped"] if self.cut else [])
        return " · ".join(parts)

    @property
    def body(self) -> Markdown:
        return self.query_one(".message-body", Markdown)

    def set_header(self, header: str, cut: bool = False) -> None:
        self._header, self.cut = header, cut
        self.query_one(".message-header", Label).update(self._header_text())
        self.set_class(cut, "cut")

    async def append(self, text: str) -> None:
        """Stream a fragment; Markdown.get_stream batches renders so a fast model can't flood the UI."""
        block = self.thinking_block
        if block is not None and not self.content and text.strip():
            block.collapsed = True  # the answer has started
        self.content += text
        if self.stream is None:
            self.stream = Markdown.get_stream(self.body)
        await self.stream.write(text)

    async def finish(self, text: str) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        self.content = text
        await self.body.update(text)

    def action_copy(self) -> None:
        self.post_message(self.Action(self, "copy"))

    def action_copy_code(self) -> None:
        self.post_message(self.Action(self, "copy_code"))

    def action_edit(self) -> None:
        self.post_message(self.Action(self, "edit"))

    def action_regenerate(self) -> None:
        self.post_message(self.Action(self, "regenerate"))

    def action_branch(self) -> None:
        self.post_message(self.Action(self, "branch"))


class PromptInput(TextArea):
    """Multi-line input: Enter sends; Shift+Enter or Ctrl+J inserts a newline; Tab completes an `@path`; a large
    paste becomes an attachment instead of text."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class LargePaste(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_paste(self, event: events.Paste) -> None:
        # Textual calls TextArea's own handler after this one, unless the default is prevented.
        if is_large_paste(event.text):
            event.stop()
            event.prevent_default()
            self.post_message(self.LargePaste(event.text))

    def _path_before_cursor(self) -> str | None:
        """The `@path` the cursor ends, without its @, or the path of a `/read PATH`; None for anything else."""
        row, column = self.cursor_location
        before = self.document.get_line(row)[:column]
        if row == 0 and before.startswith("/read "):
            return before.removeprefix("/read ").lstrip()
        word = before.rsplit(None, 1)[-1] if before.strip() and not before[-1].isspace() else ""
        return word[1:] if word.startswith("@") else None

    def complete_path(self) -> bool:
        """Complete the `@path` before the cursor as far as it is unambiguous; the choices left go to a notice."""
        partial = self._path_before_cursor()
        if partial is None:
            return False
        choices = complete_path(partial, Path.cwd())
        if not choices:
            self.app.bell()
            return True
        common = os.path.commonprefix(choices)
        if len(common) > len(partial):
            self.insert(common[len(partial) :])
        if len(choices) > 1:
            shown = ", ".join(choices[:12]) + (" …" if len(choices) > 12 else "")
            self.notify(f"@{partial}: {shown}", timeout=5)
        return True

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "tab" and self.complete_path():
            event.stop()
            event.prevent_default()
            return
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class StatusBar(Vertical):
    """Two lines: the model (or what the worker is doing) and any warning; then context, cache and speed."""

    model_line: reactive[str] = reactive("starting the worker…")
    numbers: reactive[str] = reactive("")
    notice: reactive[str] = reactive("")

    def compose(self) -> ComposeResult:
        with Horizontal(classes="status-line"):
            yield Static(id="status-model", markup=False)
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="status-progress")
            yield Static(id="status-notice", markup=False)
        with Horizontal(classes="status-line"):
            yield Static(id="status-numbers", markup=False)
            yield Sparkline([], id="status-rate")

    def watch_model_line(self, value: str) -> None:
        self.query_one("#status-model", Static).update(value)

    def watch_numbers(self, value: str) -> None:
        self.query_one("#status-numbers", Static).update(value)

    def watch_notice(self, value: str) -> None:
        notice = self.query_one("#status-notice", Static)
        notice.update(value)
        notice.display = bool(value)

    def busy(self, text: str, done: int | None = None, total: int | None = None) -> None:
        """Show work in progress: an animated bar, or bytes of a download when total is known."""
        bar = self.query_one("#status-progress", ProgressBar)
        bar.display = True
        bar.update(total=total, progress=done or 0)
        self.model_line = text

    def idle(self) -> None:
        self.query_one("#status-progress", ProgressBar).display = False

    def rates(self, values: list[float]) -> None:
        self.query_one("#status-rate", Sparkline).data = values[-24:]

    def on_mount(self) -> None:
        self.watch_notice(self.notice)


def loaded_line(loaded) -> str:
    if loaded.preset == "remote":
        return f"{loaded.model} · {loaded.device} · presets decided by the server"
    preset = loaded.preset if loaded.preset == loaded.dtype else f"{loaded.preset} ({loaded.dtype})"
    return (
        f"{loaded.model} · {preset} · {loaded.device} · {loaded.attn_implementation} · {size(loaded.footprint_bytes)}"
    )


def stats_line(stats: dict, context_length: int | None) -> str:
    speed = f"TTFT {stats['ttft_s']:.2f}s · {stats['decode_tokens_per_s']:.1f} tok/s"
    if stats.get("remote"):
        if not stats.get("usage_reported", True):
            return f"{speed} · the server reported no token counts"
        cached = stats["prompt_tokens"] - stats["prefilled_tokens"]
        return f"prompt {stats['prompt_tokens']:,} · cached {cached:,} · {stats['generated_tokens']:,} tok · {speed}"
    used = stats["prompt_tokens"] + stats["generated_tokens"]
    context = f"ctx {used:,}/{context_length:,}" if context_length else f"ctx {used:,}"
    # Stats stored before speculative decoding have no draft counts.
    drafts = stats.get("drafted_tokens") or 0
    kept = f" · drafts {stats['accepted_tokens']:,}/{drafts:,} kept" if drafts else ""
    return (
        f"{context} · cached {stats['cache_tokens']:,} · prefilled {stats['prefilled_tokens']:,} · "
        f"TTFT {stats['ttft_s']:.2f}s · {stats['decode_tokens_per_s']:.1f} tok/s{kept}"
    )


def hardware_line(hardware: Hardware) -> str:
    from ..report import describe_hardware

    return "; ".join(describe_hardware(hardware))


def download_line(done: int, total: int, bytes_per_s: float) -> str:
    """Bytes so far, total, speed and time left, as both the status bar and the picker show a download."""
    left = eta_s(done, total, bytes_per_s)
    eta = "" if left is None else f" · {duration(left)} left"
    return f"{mb(done)} / {mb(total)} · {mb(bytes_per_s)}/s{eta}"
