"""The app on a full disk and on a database damaged under it: one line, the app goes on or ends non-zero, and
what was typed or written is kept."""

from __future__ import annotations

import sqlite3

import pytest
from diskhelpers import damage_pages, fill_up, many_chats, small_disk
from uihelpers import loaded, long_reply_app, make_app, make_settings, run, start_long_reply, until

from chatapp.errors import ChatappError
from chatapp.store import Store
from chatapp.ui.app import exit_status


class Full:
    """A full disk under the app's data folder: a small real disk filled up, or SQLite's own page limit."""

    def __init__(self, kind: str, app):
        self.kind, self.app = kind, app

    def fill(self) -> None:
        if self.kind == "small disk":
            self.filler = fill_up(self.app.settings.data_dir.parent)
        else:
            pages = self.app.store._db.execute("PRAGMA page_count").fetchone()[0]
            self.app.store._db.execute(f"PRAGMA max_page_count = {pages}")

    def free(self) -> None:
        if self.kind == "small disk":
            self.filler.unlink()
        else:
            self.app.store._db.execute("PRAGMA max_page_count = 1073741823")


@pytest.fixture(params=["small disk", "page limit"])
def full_disk_app(request, settings, tmp_path):
    """(make(app_factory) -> (app, Full)): an app whose data folder sits on a disk the test can fill."""

    def make(factory):
        folder = tmp_path / "disk"
        if request.param == "small disk":
            stack.enter_context(small_disk(folder))
        app = factory(make_settings(settings, folder))
        return app, Full(request.param, app)

    from contextlib import ExitStack

    with ExitStack() as stack:
        yield make


def notice(app) -> str:
    return app.notices[-1] if app.notices else ""


def test_a_message_sent_on_a_full_disk_stays_in_the_prompt_and_is_sent_again(full_disk_app):
    app, disk = full_disk_app(lambda s: make_app(s, fake=True))
    text = "Supercalifragilisticexpialidocious " * 200  # more than a page, so storing it needs room

    async def scenario(pilot):
        await loaded(pilot)
        chat = app.chat
        disk.fill()
        chat.query_one("#prompt").text = text
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert notice(app) == (
            f"Not sent: the disk holding {app.store.path} is full, so nothing was saved; free some space, then "
            "retry. Your message is still in the prompt."
        )
        assert chat.query_one("#prompt").text == text
        assert chat.turn is None and app.store.messages(chat.conversation_id) == []
        disk.free()
        await pilot.press("enter")
        await until(pilot, lambda: chat.turn is None and len(app.store.messages(chat.conversation_id)) == 2)
        assert app.store.messages(chat.conversation_id)[0].content == text
        assert chat.query_one("#prompt").text == ""

    run(app, scenario)
    assert exit_status(app) == 0


async def stop_a_long_reply_on_a_full_disk(pilot, disk) -> None:
    """Stop a reply of more than a page (so storing it needs room) once the disk has filled up under it."""
    await loaded(pilot)
    await start_long_reply(pilot, "Tell me everything", min_chars=6000)
    disk.fill()
    await pilot.press("escape")
    await until(pilot, lambda: pilot.app.chat.turn is None, what="the stop")


def test_a_reply_finished_on_a_full_disk_is_kept_and_saved_with_the_next_message(full_disk_app):
    app, disk = full_disk_app(lambda s: long_reply_app(s, s.data_dir.parent, "Tell me everything"))

    async def scenario(pilot):
        await stop_a_long_reply_on_a_full_disk(pilot, disk)
        chat = app.chat
        assert "It is kept, and saved with your next message." in " ".join(app.notices)
        assert [m.role for m in app.store.messages(chat.conversation_id)] == ["user"]
        kept = chat.unsaved[0][1]
        disk.free()
        chat.query_one("#prompt").text = "Thanks"
        await pilot.press("enter")
        await until(pilot, lambda: chat.turn is None and len(app.store.messages(chat.conversation_id)) == 4)
        stored = app.store.messages(chat.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
        assert stored[1].content == kept and stored[1].cut and stored[2].content == "Thanks"

    run(app, scenario)


def test_an_export_on_a_full_disk_says_so_and_leaves_no_file(settings, tmp_path):
    folder = tmp_path / "disk"
    with small_disk(folder):
        s = make_settings(settings, folder)
        store = Store.open(s.data_dir)
        chat = store.new_conversation("Notes")
        store.add_message(chat.id, "user", "remember this " * 2000)
        app = make_app(s, store=store, start_worker=False)

        async def scenario(pilot):
            await pilot.pause()
            filler = fill_up(folder)
            await pilot.press("ctrl+e")
            await pilot.pause(0.2)
            assert notice(app) == f"Not exported: the disk holding {s.data_dir / 'exports'} is full."
            assert not any(p.is_file() for p in (s.data_dir / "exports").glob("*"))
            filler.unlink()
            await pilot.press("ctrl+e")
            await pilot.pause(0.2)
            assert notice(app).startswith("Exported to")
            assert [p.name for p in (s.data_dir / "exports").iterdir()] == [f"notes-{chat.id}.md"]

        run(app, scenario)


def test_a_database_damaged_while_the_app_runs_ends_it_with_one_line_and_status_1(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    with Store.open(s.data_dir) as seeding:
        many_chats(seeding)  # closed: every page is in the database file now, none in the WAL
    store = Store.open(s.data_dir)
    app = make_app(s, store=store, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        damage_pages(store.path)
        # Another writer's commit makes the app's connection read the file again instead of its page cache.
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('other', '1')")
        other.close()
        app.chat.query_one("#chats").focus()
        await pilot.press("down", "down", "down", "down", "down")  # to a chat from the damaged middle
        # Not pilot.press: it would wait for the screen, which stops handling messages once the app is ending.
        app.simulate_key("enter")
        await until(pilot, lambda: app.fatal is not None, timeout=10, what="the damage to be found")

    run(app, scenario)
    assert app.return_code == 1
    with pytest.raises(ChatappError) as caught:
        exit_status(app)
    assert f"{store.path} is damaged" in str(caught.value) and ".recover" in str(caught.value)
    assert "\n" not in str(caught.value)
    store.close()


def test_the_app_ends_non_zero_after_a_crash(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        app.call_later(lambda: 1 / 0)
        await pilot.pause(0.2)

    with pytest.raises(ZeroDivisionError):  # run_test hands the app's crash to the test as well
        run(app, scenario)
    assert exit_status(app) == 1


def test_quitting_with_a_reply_the_disk_had_no_room_for_asks_first(full_disk_app):
    app, disk = full_disk_app(lambda s: long_reply_app(s, s.data_dir.parent, "Tell me everything"))

    async def scenario(pilot):
        await stop_a_long_reply_on_a_full_disk(pilot, disk)
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
        assert app.is_running and "1 reply(ies) are not saved yet" in notice(app)
        disk.free()
        await pilot.press("ctrl+q")  # now there is room: the reply is saved on the way out

    run(app, scenario)
    conversation = app.store.conversations()[0]
    assert [m.role for m in app.store.messages(conversation.id)] == ["user", "assistant"]
