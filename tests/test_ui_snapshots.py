"""Snapshots of the chat screen (pytest-textual-snapshot): two sizes, the dark and the light theme.

After an intended change to the look, review the new pictures and run
`pytest tests/test_ui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import pytest
from uihelpers import loaded_event, make_app, make_settings, seeded_store

from chatapp.ui.backend import WorkerEvent


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
