"""Driving a ChatSession the way its callers do: keep the conversation, pass all of it to reply_to each turn."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from chatapp.engine.session import ChatSession, Message
from chatapp.protocol import TurnStats
from chatapp.sampling import SamplingParams


@dataclass
class Turn:
    text: str
    stats: TurnStats
    #: Every token sampled, the stop token included.
    tokens: list[int]


def run(stream) -> Turn:
    """Consume a reply; each item but the last has a token, and only the last has stats."""
    items = list(stream)
    assert items and items[-1].stats is not None and items[-1].token is None
    assert all(i.stats is None and i.token is not None for i in items[:-1])
    return Turn("".join(i.text for i in items), items[-1].stats, [i.token for i in items[:-1]])


def greedy(**params) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, **params})


class Chat:
    """A conversation over one session, with the operations the app offers: send, regenerate, edit."""

    def __init__(self, loaded, system: str | None = None, **session_options):
        self.session = ChatSession(loaded, **session_options)
        self.opening = [Message("system", system)] if system else []

    @property
    def history(self) -> list[Message]:
        return self.session.messages or list(self.opening)

    def stream(self, text: str, cancel: threading.Event | None = None, **params):
        return self.session.reply_to([*self.history, Message("user", text)], greedy(**params), cancel)

    def send(self, text: str, **params) -> Turn:
        return run(self.stream(text, **params))

    def regenerate(self, **params) -> Turn:
        history = self.history
        if history and history[-1].role == "assistant":
            history = history[:-1]
        return run(self.session.reply_to(history, greedy(**params)))

    def edit(self, index: int, text: str, **params) -> Turn:
        """Replace the user message at `index` of the history and answer it, dropping what followed."""
        history = self.history
        assert history[index].role == "user"
        return run(self.session.reply_to([*history[:index], Message("user", text)], greedy(**params)))


def drafted_and_plain(loaded, ask: str, params: SamplingParams, cancel_after: int | None = None, **drafting):
    """One turn on `ask` with drafts (the ChatSession options in `drafting`) and one without, each on a fresh
    session, cancelled after `cancel_after` streamed items if given: for each, (turn, cache ids, next turn's
    stats)."""
    out = []
    for options in (drafting, {"speculative": "off"}):
        session = ChatSession(loaded, **options)
        cancel = threading.Event()
        items = []
        for item in session.reply_to([Message("user", ask)], params, cancel):
            items.append(item)
            if cancel_after is not None and len(items) == cancel_after:
                cancel.set()
        turn = run(iter(items))
        held = list(session.cache_ids)
        after = run(session.reply_to([*session.messages, Message("user", "And again?")], params)).stats
        out.append((turn, held, after))
    return out
