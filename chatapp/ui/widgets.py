"""The chat screen's widgets: a message, the prompt input, the status bar."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Label, Markdown, ProgressBar, Sparkline, Static, TextArea

from ..units import duration, eta_s, mb, size

if TYPE_CHECKING:
    from ..hardware import Hardware

CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)


def code_blocks(markdown: str) -> list[str]:
    return [block.rstrip("\n") for block in CODE_BLOCK.findall(markdown)]


class MessageView(Vertical, can_focus=True):
    """One message: a header line and the Markdown body. Focus it to copy it, edit it, regenerate it or branch."""

    BINDINGS = [
        Binding("c", "copy", "Copy"),
        Binding("k", "copy_code", "Copy code"),
        Binding("e", "edit", "Edit", show=False),
        Binding("r", "regenerate", "Regenerate", show=False),
        Binding("b", "branch", "Branch from here", show=False),
    ]

    class Action(Message):
        def __init__(self, view: MessageView, action: str):
            super().__init__()
            self.view, self.action = view, action

    def __init__(self, role: str, content: str = "", *, header: str = "", cut: bool = False, position: int = -1):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.position = position
        self.cut = cut
        self._header = header
        self.stream = None

    def compose(self) -> ComposeResult:
        yield Label(self._header_text(), classes="message-header", markup=False)
        yield Markdown(self.content, classes="message-body")

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
    """Multi-line input: Enter sends; Shift+Enter or Ctrl+J inserts a newline."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
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
    preset = loaded.preset if loaded.preset == loaded.dtype else f"{loaded.preset} ({loaded.dtype})"
    return (
        f"{loaded.model} · {preset} · {loaded.device} · {loaded.attn_implementation} · {size(loaded.footprint_bytes)}"
    )


def stats_line(stats: dict, context_length: int | None) -> str:
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
