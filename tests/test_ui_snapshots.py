"""Snapshots of the chat screen (pytest-textual-snapshot): two sizes, the dark and the light theme.

After an intended change to the look, review the new pictures and run
`pytest tests/test_ui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import pytest
from uihelpers import loaded_event, make_app, make_settings, seeded_store

from chatapp.ui.backend import WorkerEvent
from chatapp.ui.widgets import MessageView


@pytest.mark.parametrize("theme", ["chatapp-dark", "chatapp-light"])
@pytest.mark.parametrize("size", [(100, 30), (160, 50)])
def test_chat_screen(snap_compare, settings, tmp_path, theme, size):
    s = make_settings(settings, tmp_path, theme=theme)
    app = make_app(s, store=seeded_store(s), start_worker=False)

    async def ready(pilot):
        app.post_message(WorkerEvent(loaded_event()))
        app.chat.query_one("#prompt").cursor_blink = False
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=size, run_before=ready)


def _ready(app):
    async def ready(pilot):
        app.post_message(WorkerEvent(loaded_event()))
        app.chat.query_one("#prompt").cursor_blink = False
        await pilot.pause(0.3)

    return ready


def test_branches_sit_under_their_parent_in_the_sidebar(snap_compare, settings, tmp_path):
    s = make_settings(settings, tmp_path, theme="chatapp-dark")
    store = seeded_store(s)
    dinner = next(c for c in store.conversations() if c.title == "Dinner plans")
    branch = store.branch(dinner.id, 1)
    store.branch(branch.id, 0)
    app = make_app(s, store=store, start_worker=False)
    assert snap_compare(app, terminal_size=(100, 30), run_before=_ready(app))


def test_editing_an_early_message_asks_rewrite_or_branch(snap_compare, settings, tmp_path):
    s = make_settings(settings, tmp_path, theme="chatapp-dark")
    store = seeded_store(s)
    chat = store.conversations()[0]
    stats = store.messages(chat.id)[-1].stats
    store.add_message(chat.id, "user", "And in Rust?")
    store.add_message(
        chat.id, "assistant", "`println!`", model="tiny", preset="fp32", stats={**stats, "prompt_tokens": 70}
    )
    app = make_app(s, store=store, start_worker=False)
    ready = _ready(app)

    async def edit_first(pilot):
        await ready(pilot)
        next(v for v in app.chat.query(MessageView) if v.position == 0).focus()
        await pilot.press("e")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=(100, 30), run_before=edit_first)


def test_an_attachment_waits_as_a_chip_above_the_prompt(snap_compare, settings, tmp_path):
    from chatapp.attachments import Attachment

    s = make_settings(settings, tmp_path, theme="chatapp-dark")
    app = make_app(s, store=seeded_store(s), start_worker=False)

    async def ready(pilot):
        await _ready(app)(pilot)
        await app.chat.attach(Attachment("README.md", "# chatapp\n" * 300, "file"))
        await app.chat.attach(Attachment("pasted text", "x" * 12_345, "paste"))
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(100, 30), run_before=ready)


def _thinking_app(settings, tmp_path):
    s = make_settings(settings, tmp_path, theme="chatapp-dark")
    store = seeded_store(s)
    chat = store.new_conversation("Arithmetic")
    store.add_message(chat.id, "user", "What is 17 × 23?")
    stats = {**store.messages(2)[-1].stats, "generated_tokens": 60, "thinking_tokens": 52, "thinking_s": 3.4}
    thinking = "17 × 23 = 17 × 20 + 17 × 3 = 340 + 51 = 391. Let me check: 23 × 17 = 230 + 161 = 391."
    store.add_message(
        chat.id, "assistant", "17 × 23 = **391**.", model="tiny", preset="fp32", stats=stats, thinking=thinking
    )
    return make_app(s, store=store, start_worker=False)


@pytest.mark.parametrize("expanded", [False, True])
def test_a_replys_thinking_folded_and_open(snap_compare, settings, tmp_path, expanded):
    app = _thinking_app(settings, tmp_path)

    async def ready(pilot):
        await _ready(app)(pilot)
        if expanded:
            view = [v for v in app.chat.query(MessageView) if v.role == "assistant"][-1]
            view.focus()
            await pilot.press("t")
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(100, 30), run_before=ready)
