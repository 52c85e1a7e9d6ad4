"""What a tokenizer and its chat template say about thinking, and how many of a reply's tokens were thinking.

The rules for text (which markers, the switch, where a block starts) are chatapp.thinking's; this module applies
them to a loaded tokenizer and to token ids.
"""

from __future__ import annotations

from .. import thinking


def template_text(tokenizer) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the chat one is "default"
        template = template.get("default")
    return template if isinstance(template, str) else None


def switch(tokenizer) -> bool:
    return thinking.has_switch(template_text(tokenizer))


def template_options(tokenizer, think: bool | None) -> dict:
    """apply_chat_template's keywords for thinking on or off: none without a value or a switch to take it."""
    return {"enable_thinking": think} if think is not None and switch(tokenizer) else {}


def marker_pair(tokenizer) -> tuple[str, str] | None:
    added = (token.content for token in tokenizer.added_tokens_decoder.values())
    return thinking.markers(added, template_text(tokenizer))


def marker_ids(tokenizer) -> tuple[int, int] | None:
    """The (open, close) token ids, when each marker is one token; else None (and no thinking is counted)."""
    cached = getattr(tokenizer, "_chatapp_thinking_ids", False)
    if cached is not False:
        return cached
    ids = None
    if pair := marker_pair(tokenizer):
        encoded = [tokenizer(m, add_special_tokens=False)["input_ids"] for m in pair]
        if all(len(e) == 1 for e in encoded):
            ids = (encoded[0][0], encoded[1][0])
    tokenizer._chatapp_thinking_ids = ids
    return ids


def opens_block(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether a rendered prompt ends inside a thinking block (its generation prompt wrote the open marker)."""
    pair = marker_pair(tokenizer)
    # A few tokens are enough to see the generation prompt's end, and decoding them costs nothing.
    return pair is not None and thinking.starts_inside(tokenizer.decode(prompt_ids[-8:]), pair[0])


def starts_inside(tokenizer, think: bool | None) -> bool:
    """opens_block for a one-message chat rendered with this thinking value: what the UI's Splitter needs."""
    from .session import Message, render_ids

    return opens_block(tokenizer, render_ids(tokenizer, [Message("user", "Hi")], think))


def thinking_tokens(tokens: list[int], ids: tuple[int, int] | None, inside: bool) -> int:
    """How many of a reply's tokens were thinking, as chatapp.thinking.Splitter parts its text: from the open
    marker (or the reply's start, when the prompt opened the block or only a close comes) through the close
    marker; all from the open one on when the block never closed. Later blocks are answer."""
    if ids is None:
        return 0
    open_id, close_id = ids
    start = 0 if inside else None
    for i, token in enumerate(tokens):
        if token == close_id:
            return i + 1 - (start or 0)
        if start is None and token == open_id:
            start = i
    return len(tokens) - start if start is not None else 0
