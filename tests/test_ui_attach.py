"""Files and large pastes in the TUI: `/read`, `@path` with Tab completion, the paste chip, and what is sent."""

from __future__ import annotations

from textual import events
from uihelpers import make_app, make_settings, run, say, until

from chatapp import protocol as p
from chatapp.attachments import Attachment, message_text


def _sent(app) -> list[tuple[str, str]]:
    return [r for r in app.backend.client.received if isinstance(r, p.Generate)][-1].messages


def _app(settings, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("The meeting is on Tuesday.\n")
    (work / "photo.bin").write_bytes(b"\x89PNG\x00\x00")
    monkeypatch.chdir(work)
    return make_app(make_settings(settings, tmp_path), fake=True)


def test_read_and_at_path_attach_files_that_are_sent_stored_and_shown(settings, tmp_path, monkeypatch):
    app = _app(settings, tmp_path, monkeypatch)

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "/read notes.txt", wait=False)
        await pilot.pause()
        assert [c.label.plain for c in chat.query(".chip")] == ["📎 notes.txt · 27 chars"]
        assert not app.store.messages(chat.conversation_id)  # a command, not a message
        await say(pilot, "When is the meeting?")
        note = Attachment("notes.txt", "The meeting is on Tuesday.\n", "file")
        assert _sent(app)[-1] == ("user", message_text("When is the meeting?", [note]))
        user = app.store.messages(chat.conversation_id)[0]
        assert user.content == "When is the meeting?" and user.attachments == [note.__dict__]
        assert not chat.pending and not chat.query(".chip")
        views = [v for v in chat.query("MessageView") if v.role == "user"]
        assert "📎 notes.txt · 27 chars" in views[-1]._header_text()
        # @path in the text attaches too; the next turn's history still carries the first file.
        await say(pilot, "Compare with @notes.txt please")
        sent = _sent(app)
        assert sent[0] == ("user", message_text("When is the meeting?", [note]))
        assert sent[-1] == ("user", message_text("Compare with @notes.txt please", [note]))

    run(app, scenario)


def test_a_file_that_cant_be_attached_is_one_line_and_nothing_is_sent(settings, tmp_path, monkeypatch):
    app = _app(settings, tmp_path, monkeypatch)

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        for text in ("Look at @missing.txt", "What is @photo.bin?"):
            await say(pilot, text, wait=False)
            await pilot.pause()
            assert chat.query_one("#prompt").text == text  # kept, to fix and send again
            assert app.notices[-1].startswith("Not sent: ") and "\n" not in app.notices[-1]
        assert not app.store.messages(chat.conversation_id)
        assert not [r for r in app.backend.client.received if isinstance(r, p.Generate)]
        await say(pilot, "/read photo.bin", wait=False)
        await pilot.pause()
        assert not chat.pending and "photo.bin" in app.notices[-1]

    run(app, scenario)


def test_a_large_paste_becomes_a_chip_that_opens_and_is_sent_whole(settings, tmp_path, monkeypatch):
    app = _app(settings, tmp_path, monkeypatch)
    pasted = "\n".join(f"line {i}: some log output" for i in range(200))

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        prompt = chat.query_one("#prompt")
        prompt.focus()
        app.post_message(events.Paste("short paste"))
        await pilot.pause()
        assert prompt.text == "short paste" and not chat.pending
        prompt.text = ""
        app.post_message(events.Paste(pasted))
        await pilot.pause()
        assert prompt.text == ""
        [chip] = chat.query(".chip")
        assert chip.label.plain == f"📎 pasted {len(pasted):,} chars"
        chip.press()
        await pilot.pause()
        assert app.screen.text == pasted
        await pilot.press("escape")
        await say(pilot, "What went wrong?")
        assert _sent(app)[-1] == (
            "user",
            message_text("What went wrong?", [Attachment("pasted text", pasted, "paste")]),
        )
        # Delete on a chip takes it off again.
        app.post_message(events.Paste(pasted))
        await pilot.pause()
        chat.query_one(".chip").focus()
        await pilot.press("delete")
        await pilot.pause()
        assert not chat.pending and not chat.query(".chip")

    run(app, scenario)


def test_tab_completes_an_at_path(settings, tmp_path, monkeypatch):
    app = _app(settings, tmp_path, monkeypatch)
    (tmp_path / "work" / "docs").mkdir()
    (tmp_path / "work" / "docs" / "guide.md").write_text("hi")

    async def scenario(pilot):
        prompt = app.chat.query_one("#prompt")
        prompt.focus()
        prompt.text = "read @no"
        prompt.move_cursor((0, len(prompt.text)))
        await pilot.press("tab")
        assert prompt.text == "read @notes.txt"
        prompt.text = "and @d"
        prompt.move_cursor((0, len(prompt.text)))
        await pilot.press("tab")
        await pilot.press("g", "tab")
        assert prompt.text == "and @docs/guide.md"
        prompt.text = "/read no"
        prompt.move_cursor((0, len(prompt.text)))
        await pilot.press("tab")
        assert prompt.text == "/read notes.txt"

    run(app, scenario)


def test_the_tokens_are_counted_before_sending_and_a_message_too_big_asks_or_is_refused(
    settings, tmp_path, monkeypatch
):
    from fakeworker import FakeWorkerClient

    work = tmp_path / "work"
    work.mkdir()
    (work / "short.txt").write_text("one two three\n")
    (work / "medium.txt").write_text("word " * 45)
    (work / "huge.txt").write_text("word " * 100)
    monkeypatch.chdir(work)
    # The fake counts a word as a token; 80 tokens of context, 12 kept for the reply.
    app = make_app(
        make_settings(settings, tmp_path), fake=True, client_factory=FakeWorkerClient.factory(context_length=80)
    )

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "Read @short.txt")
        assert app.store.messages(chat.conversation_id)[0].attachments[0]["name"] == "short.txt"
        assert any(n.startswith("Sending ") and "of 80)" in n for n in app.notices)
        # Alone it can never fit: refused, with the numbers, and nothing is lost.
        await say(pilot, "Read @huge.txt", wait=False)
        await until(pilot, lambda: app.notices[-1].startswith("Not sent: "), what="the refusal")
        assert "the model's context is 80, with 12 kept for the reply" in app.notices[-1]
        assert chat.query_one("#prompt").text == "Read @huge.txt" and len(app.store.messages(chat.conversation_id)) == 2
        # With the chat it doesn't fit, alone it does: asked first; Cancel keeps it, Send anyway sends it.
        chat.query_one("#prompt").text = ""
        await say(pilot, "/read medium.txt", wait=False)
        await say(pilot, "And this one?", wait=False)
        await until(pilot, lambda: app.screen is not chat, what="the question")
        assert "This won't fit: this message is" in str(app.screen.question)
        await pilot.click("#no")
        await pilot.pause()
        assert chat.query_one("#prompt").text == "And this one?" and chat.pending
        await say(pilot, "And this one?", wait=False)
        await until(pilot, lambda: app.screen is not chat, what="the question")
        await pilot.click("#yes")
        await until(pilot, lambda: len(app.store.messages(chat.conversation_id)) == 4, what="the reply")
        assert not chat.pending and chat.query_one("#prompt").text == ""

    run(app, scenario)


def test_a_mention_that_is_not_a_path_is_sent_as_text(settings, tmp_path, monkeypatch):
    app = _app(settings, tmp_path, monkeypatch)

    async def scenario(pilot):
        await until(pilot, lambda: app.chat.loaded is not None, what="the fake model")
        await say(pilot, "Say thanks to @alice for @notes.txt.")
        note = Attachment("notes.txt", "The meeting is on Tuesday.\n", "file")
        assert _sent(app)[-1] == ("user", message_text("Say thanks to @alice for @notes.txt.", [note]))

    run(app, scenario)
