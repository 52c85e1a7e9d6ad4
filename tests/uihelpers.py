"""Running the Textual app in tests with Pilot: through the real worker process on the tiny model, or, with
`make_app(..., fake=True)`, through the scripted FakeWorkerClient (tests/fakeworker.py) that needs no torch."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

from chatapp import protocol as p
from chatapp.store import Store

CODE_REPLY = "Here it is:\n\n```python\nprint('hi')\n```\n\nAnd more text."


def seeded_store(settings) -> Store:
    store = Store.open(settings.data_dir)
    old = store.new_conversation("Dinner plans")
    store.add_message(old.id, "user", "What should I cook tonight?")
    store.add_message(old.id, "assistant", "Try a **risotto**.", model="tiny", preset="fp32")
    chat = store.new_conversation("Python help")
    store.add_message(chat.id, "user", "Show me hello world in Python")
    stats = {
        "prompt_tokens": 40,
        "prefilled_tokens": 40,
        "generated_tokens": 12,
        "ttft_s": 0.12,
        "decode_tokens_per_s": 31.5,
        "cache_tokens": 51,
        "finish_reason": "stop",
        "trimmed_messages": 0,
        "dropped_messages": 0,
    }
    store.add_message(chat.id, "assistant", CODE_REPLY, model="tiny", preset="fp32", stats=stats)
    return store


def make_settings(settings, tmp_path: Path, **overrides):
    """The session settings with this test's own data and config dirs, greedy decoding and short replies."""
    values = dict(
        data_dir=tmp_path / "data",
        config_dir=tmp_path / "config",
        themes_dir=tmp_path / "themes",
        temperature=0.0,
        max_new_tokens=12,
    )
    values.update(overrides)
    return replace(settings, **values)


#: A model reference the app accepts without a download (the packaged starter); the fake "loads" it instantly.
FAKE_MODEL = "smollm2-135m-local"


def make_app(
    settings,
    model: str | None = None,
    *,
    store: Store | None = None,
    preset: str | None = None,
    fake: bool = False,
    **kwargs,
):
    """A ChatApp on this test's store. fake=True: the worker is a FakeWorkerClient (its defaults unless a
    client_factory=FakeWorkerClient.factory(...) is passed too) and the model defaults to FAKE_MODEL."""
    from chatapp.ui.app import ChatApp

    store = store or Store.open(settings.data_dir)
    kwargs.setdefault("first_run", False)  # tests of the chat screen don't want the first-run picker over it
    if fake:
        from fakeworker import FakeWorkerClient

        kwargs.setdefault("client_factory", FakeWorkerClient.factory())
        model = model or FAKE_MODEL
    return ChatApp(settings, store, model=model, preset=preset or ("fp32" if model else None), **kwargs)


async def until(pilot, condition, timeout: float = 120.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def loaded(pilot) -> None:
    await until(pilot, lambda: pilot.app.chat.loaded is not None, what="the model to load")


async def say(pilot, text: str, *, wait: bool = True) -> None:
    """Type a message into the prompt and press Enter; wait for the reply unless told not to."""
    chat = pilot.app.chat
    chat.query_one("#prompt").focus()
    chat.query_one("#prompt").text = text
    await pilot.press("enter")
    if wait:
        await until(pilot, lambda: chat.turn is None and not chat.queued, what="the reply")
        await pilot.pause(0.1)


def long_reply_app(settings, tmp_path, prompt: str):
    """An app on the fake worker that answers `prompt` at length (max_new_tokens 1500), for acting mid-reply."""
    from fakeworker import FakeWorkerClient, long_reply_to

    return make_app(
        make_settings(settings, tmp_path, max_new_tokens=1500),
        fake=True,
        client_factory=FakeWorkerClient.factory(reply=long_reply_to(prompt)),
    )


async def start_long_reply(pilot, text: str, min_chars: int = 1) -> None:
    """Send text and return once the reply has streamed at least min_chars (use a large max_new_tokens)."""
    chat = pilot.app.chat
    await say(pilot, text, wait=False)
    await until(pilot, lambda: chat.turn is not None and len(chat.turn.text) >= min_chars, what="the first tokens")


def last_stats(app) -> dict:
    messages = app.store.messages(app.chat.conversation_id)
    return next(m.stats for m in reversed(messages) if m.stats)


def run(app, scenario, size=(120, 40)):
    """Run `scenario(pilot)` inside app.run_test()."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def loaded_event(**kwargs) -> p.Loaded:
    values = dict(
        model="TestOrg/tiny-llama",
        preset="fp32",
        dtype="fp32",
        device="cpu",
        attn_implementation="sdpa",
        context_length=2048,
        footprint_bytes=52_000_000,
        notes=[],
    )
    values.update(kwargs)
    return p.Loaded(**values)
