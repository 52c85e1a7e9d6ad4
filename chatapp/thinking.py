"""Reasoning models' thinking: which markers a model has, whether its template can switch thinking off, and
how a reply (streamed or whole) splits into its thinking and its answer.

Plain Python, shared by the engine (which counts thinking tokens) and the UI (which shows the two parts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Open/close pairs that reasoning models are known to write, most common first.
KNOWN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<seed:think>", "</seed:think>"),
    ("[THINK]", "[/THINK]"),
    ("◁think▷", "◁/think▷"),
)

THINKING = "thinking"
ANSWER = "answer"
#: A piece whose text was given as answer already but was thinking: a close marker came with no open one.
MOVED = "moved"


def markers(vocab_tokens: Iterable[str], template: str | None) -> tuple[str, str] | None:
    """The (open, close) markers this model writes: the first known pair whose two halves are both among the
    tokenizer's added tokens, else both in its chat template; None when neither has a pair."""
    vocab = set(vocab_tokens)
    for pair in KNOWN_MARKERS:
        if all(m in vocab for m in pair):
            return pair
    for pair in KNOWN_MARKERS:
        if template and all(m in template for m in pair):
            return pair
    return None


_JINJA_CODE = re.compile(r"\{[%{](.*?)[%}]\}", re.DOTALL)
_SWITCH = re.compile(r"\benable_thinking\b")


def has_switch(template: str | None) -> bool:
    """Whether the template reads an `enable_thinking` variable (Qwen3's), in its code rather than its text."""
    return bool(template) and any(_SWITCH.search(code) for code in _JINJA_CODE.findall(template))


def starts_inside(prompt: str, open_marker: str) -> bool:
    """Whether a rendered prompt leaves the reply inside a thinking block: its generation prompt ends with the
    open marker (DeepSeek-R1's newer templates), so the reply carries only the close one."""
    return prompt.rstrip().endswith(open_marker)


class Splitter:
    """Splits a reply into thinking and answer as its text streams in.

    `feed` takes each delta and returns (kind, text) pieces in order, holding back only a tail that could be the
    start of a marker; `finish` returns what was held back. Text before the first marker is answer. The first
    block is the only one: after its close, everything is answer, markers included. Whitespace that starts a
    part (after a marker) is dropped. A close marker with no open one before it means the text so far was
    thinking (DeepSeek-R1 distills write no open marker): that text, already given as answer, comes back as a
    MOVED piece, and the caller moves it to the thinking. `unclosed` is True while a block is open, so after
    `finish` it tells a block that never closed.
    """

    def __init__(self, open_marker: str, close_marker: str, starts_inside: bool = False):
        self.open = open_marker
        self.close = close_marker
        self._state = "inside" if starts_inside else "before"
        self._held = ""
        self._answered = ""  # the answer given before any marker, in case a close marker makes it thinking
        self._fresh = True

    @property
    def unclosed(self) -> bool:
        return self._state == "inside"

    def feed(self, text: str) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        buffer = self._held + text
        while True:
            if self._state == "after":
                self._held = ""
                self._emit(pieces, ANSWER, buffer)
                return pieces
            wanted = (self.open, self.close) if self._state == "before" else (self.close,)
            found = [(buffer.find(m), m) for m in wanted if m in buffer]
            if not found:
                keep = _partial_tail(buffer, wanted)
                self._held = buffer[len(buffer) - keep :]
                self._emit(pieces, self._kind(), buffer[: len(buffer) - keep])
                return pieces
            at, marker = min(found)
            self._emit(pieces, self._kind(), buffer[:at])
            buffer = buffer[at + len(marker) :]
            if marker == self.open:
                self._state = "inside"
            else:
                if self._state == "before" and self._answered:
                    pieces.append((MOVED, self._answered))
                self._state = "after"
            self._fresh = True

    def finish(self) -> list[tuple[str, str]]:
        """The text held back (a tail that turned out not to be a marker)."""
        pieces: list[tuple[str, str]] = []
        self._emit(pieces, self._kind(), self._held)
        self._held = ""
        return pieces

    def _kind(self) -> str:
        return THINKING if self._state == "inside" else ANSWER

    def _emit(self, pieces: list[tuple[str, str]], kind: str, text: str) -> None:
        if self._fresh:
            text = text.lstrip()
        if not text:
            return
        self._fresh = False
        if self._state == "before":
            self._answered += text
        if pieces and pieces[-1][0] == kind:
            pieces[-1] = (kind, pieces[-1][1] + text)
        else:
            pieces.append((kind, text))


def _partial_tail(text: str, markers: Iterable[str]) -> int:
    """The length of the longest end of text that is the start of one of the markers."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def apply(pieces: Iterable[tuple[str, str]], thinking: str = "", answer: str = "") -> tuple[str, str]:
    """(thinking, answer) after the pieces, on top of those given: what a caller showing a reply keeps."""
    for kind, text in pieces:
        if kind == THINKING:
            thinking += text
        elif kind == ANSWER:
            answer += text
        else:
            answer = answer[: len(answer) - len(text)]
            thinking = text + thinking
    return thinking, answer


def split(text: str, open_marker: str, close_marker: str, starts_inside: bool = False) -> tuple[str, str, bool]:
    """(thinking, answer, closed) of a whole reply, as a Splitter fed it would give them; closed is False only
    when a thinking block opened and never closed."""
    splitter = Splitter(open_marker, close_marker, starts_inside)
    thinking, answer = apply(splitter.feed(text) + splitter.finish())
    return thinking, answer, not splitter.unclosed
