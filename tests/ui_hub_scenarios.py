"""Pilot scenarios of the model picker against the tests' Hub server, run in a fresh process.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, so these run in a child process with
the server's environment: `python tests/ui_hub_scenarios.py NAME` (see test_ui_models.py).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from textual.widget import Widget  # noqa: E402
from uihelpers import loaded, make_app, make_settings, say, until  # noqa: E402

from chatapp.config import load_settings  # noqa: E402
from chatapp.ui.backend import DownloadUpdate  # noqa: E402


class Recorder(Widget):
    """Hears what the backend tells its listeners: the bytes of each download update."""

    def __init__(self):
        super().__init__()
        self.done: list[int] = []

    def on_download_update(self, event: DownloadUpdate) -> None:
        self.done.append(event.done)


async def open_search(pilot, text: str) -> object:
    app = pilot.app
    await pilot.press("f3")
    await until(
        pilot,
        lambda: type(app.screen).__name__ == "ModelPickerScreen" and app.screen.rows["catalog"],
        what="the picker",
    )
    picker = app.screen
    await pilot.press("slash")
    picker.query_one("#hub-query").value = text
    await pilot.press("enter")
    await until(pilot, lambda: picker.rows["search"], what="search results")
    return picker


async def download_and_chat(pilot):
    app = pilot.app
    picker = await open_search(pilot, "tiny")
    row = picker.rows["search"][0]
    assert row.ref == "TestOrg/tiny-llama" and "(weights)" in row.verdict
    recorder = Recorder()
    await app.chat.mount(recorder)
    app.backend.listen(recorder)
    await pilot.press("enter")
    await until(pilot, lambda: app.screen is app.chat, what="the chat to open")
    await loaded(pilot)
    assert app.chat.loaded.model == "TestOrg/tiny-llama"
    assert recorder.done and max(recorder.done) > 0
    await say(pilot, "Hello from the Hub")
    reply = app.store.messages(app.chat.conversation_id)[-1]
    assert reply.content and reply.model == "TestOrg/tiny-llama"
    # Now it is listed as downloaded, with its size and a verdict planned from its own config.json.
    await pilot.press("f3")
    await until(
        pilot,
        lambda: type(app.screen).__name__ == "ModelPickerScreen" and app.screen.rows["catalog"],
        what="the picker",
    )
    picker = app.screen
    local = {r.ref: r for r in picker.rows["downloaded"]}
    assert local["TestOrg/tiny-llama"].size_on_disk > 0
    assert "✓" in local["TestOrg/tiny-llama"].verdict
    # Delete it, confirming first; the freed space is reported.
    picker.query_one("#picker-tabs").active = "downloaded"
    await pilot.pause()
    table = picker.query_one("#table-downloaded")
    table.focus()
    table.move_cursor(row=[r.ref for r in picker.rows["downloaded"]].index("TestOrg/tiny-llama"))
    await pilot.press("x")
    await pilot.pause()
    await pilot.click("#yes")
    await until(
        pilot, lambda: not any(r.ref == "TestOrg/tiny-llama" for r in picker.rows["downloaded"]), what="the delete"
    )
    assert any("Deleted TestOrg/tiny-llama" in n and "GB freed" in n for n in app.notices)
    print("OK")


async def cancel_download(pilot):
    app = pilot.app
    picker = await open_search(pilot, "SmolLM2")
    await pilot.press("enter")
    label = picker.query_one("#download-label")
    await until(pilot, lambda: " MB · " in str(label.content), what="download progress")
    assert picker.query_one("#download-box").display
    await pilot.press("escape")
    await until(pilot, lambda: picker.downloading is None, what="the cancel")
    error = str(picker.query_one("#picker-error").content)
    assert "download stopped" in error, error
    assert app.screen is picker
    print("OK")


async def start_download(pilot):
    picker = await open_search(pilot, "SmolLM2")
    await pilot.press("enter")
    label = picker.query_one("#download-label")
    await until(pilot, lambda: " MB · " in str(label.content), what="download progress")
    await pilot.pause(0.5)  # the server is crawling by now
    return picker


async def cancel_crawling_download(pilot):
    """The server sends 2 kB/s: Esc stops the download at once, and a second Esc leaves the picker."""
    app = pilot.app
    picker = await start_download(pilot)
    await pilot.press("escape")
    await until(pilot, lambda: picker.downloading is None, timeout=3, what="the cancel, within a few seconds")
    error = str(picker.query_one("#picker-error").content)
    assert "download stopped with " in error and " kept" in error, error
    await pilot.press("escape")
    await until(pilot, lambda: app.screen is app.chat, timeout=3, what="the picker to close")
    print("OK")


async def quit_during_download(pilot):
    await start_download(pilot)
    print("QUIT", flush=True)  # the test times the exit from here
    pilot.app.exit()


def weights_in_cache() -> int:
    """Bytes of the huge repo's weights in the HF cache, whole or partial (its blobs over 100 kB)."""
    from huggingface_hub import constants

    blobs = Path(constants.HF_HUB_CACHE) / "models--TestOrg--huge-llama" / "blobs"
    return sum(p.stat().st_size for p in blobs.glob("*") if p.stat().st_size > 100_000)


async def asked_before_a_download_that_cannot_fit(pilot):
    """A model that fits no preset here: the picker asks before downloading; No fetches nothing, Yes downloads."""
    from chatapp.ui.screens.dialogs import ConfirmScreen

    app = pilot.app
    picker = await open_search(pilot, "huge")
    assert picker.rows["search"][0].ref == "TestOrg/huge-llama"
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question")
    question = app.screen.question
    assert "fits no preset on this machine" in question and "anyway?" in question, question
    await pilot.press("escape")
    await until(pilot, lambda: app.screen is picker and picker.downloading is None, what="back in the picker")
    assert not picker.query_one("#download-box").display
    assert weights_in_cache() == 0
    picker.query_one("#table-search").focus()
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the question again")
    await pilot.press("y")
    await until(pilot, lambda: app.screen is app.chat, what="the forced download")
    assert weights_in_cache() >= 1_000_000
    print("OK")


async def gated(pilot):
    picker = await open_search(pilot, "gated")
    await pilot.press("enter")
    await until(pilot, lambda: picker.query_one("#picker-error").display, what="the error")
    error = str(picker.query_one("#picker-error").content)
    assert "is gated: accept its license at https://huggingface.co/TestOrg/gated-llama" in error, error
    assert "hf auth login" in error
    print("OK")


SCENARIOS = {
    "download_and_chat": download_and_chat,
    "cancel_download": cancel_download,
    "cancel_crawling_download": cancel_crawling_download,
    "quit_during_download": quit_during_download,
    "gated": gated,
    "cannot_fit": asked_before_a_download_that_cannot_fit,
}


async def main(name: str, data: Path) -> None:
    settings = make_settings(load_settings(), data)
    app = make_app(settings, start_worker=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.pause()
        await SCENARIOS[name](pilot)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
