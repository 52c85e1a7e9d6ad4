"""A reasoning model's thinking in the TUI: streamed into its own block, folded when the answer starts, counted
apart, stored apart, shown or hidden per chat, switched per chat where the template can."""

from __future__ import annotations

from fakeworker import FakeWorkerClient
from uihelpers import make_app, make_settings, run, say, until

from chatapp import protocol as p

MARKERS = ("<think>", "</think>")
THOUGHT = "<think> The user greets me. I should greet back. </think> Hello there!"


def _app(settings, tmp_path, reply=THOUGHT, switch=True, **options):
    factory = FakeWorkerClient.factory(reply=reply, thinking=MARKERS, switch=switch, **options)
    return make_app(make_settings(settings, tmp_path, max_new_tokens=40), fake=True, client_factory=factory)


def _reply_view(app):
    return [v for v in app.chat.query("MessageView") if v.role == "assistant"][-1]


def test_thinking_streams_into_a_folded_block_and_is_stored_and_counted_apart(settings, tmp_path):
    app = _app(settings, tmp_path, delay=0.05)

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "Hi", wait=False)
        # Mid-thinking: the block is open, the answer empty.
        await until(pilot, lambda: chat.turn and "greets" in chat.turn.text, what="some thinking")
        view = _reply_view(app)
        assert view.thinking_block is not None and not view.thinking_block.collapsed and view.content == ""
        await until(pilot, lambda: chat.turn is None, what="the reply")
        await pilot.pause()
        view = _reply_view(app)
        assert view.content == "Hello there!" and view.thinking.strip() == "The user greets me. I should greet back."
        assert view.thinking_block.collapsed
        assert view.thinking_block.title.startswith("thinking · 10 tokens · ")
        assert "2 tok + 10 thinking" in view._header_text()
        [_user, reply] = app.store.messages(chat.conversation_id)
        assert (reply.content, reply.thinking.strip()) == ("Hello there!", "The user greets me. I should greet back.")
        assert reply.stats["thinking_tokens"] == 10 and reply.stats["thinking_closed"] is True
        # `t` on the message opens the block again; the next turn sends the answer only.
        view.focus()
        await pilot.press("t")
        assert not view.thinking_block.collapsed
        await say(pilot, "Again")
        sent = [r for r in app.backend.client.received if isinstance(r, p.Generate)][-1]
        assert sent.messages[1] == ("assistant", "Hello there!")

    run(app, scenario)


def test_a_block_that_never_closes_is_all_thinking_and_says_so(settings, tmp_path):
    app = _app(settings, tmp_path, reply="<think> Hmm, let me think about this for a long while")

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "Hard question")
        view = _reply_view(app)
        assert view.content == "" and "let me think" in view.thinking
        assert view.thinking_block.title.endswith("never closed: the reply ended inside it")
        [_user, reply] = app.store.messages(chat.conversation_id)
        assert reply.content == "" and reply.stats["thinking_closed"] is False
        # Reopened from the store, it reads the same.
        await chat.open_conversation(chat.conversation_id)
        await pilot.pause()
        assert _reply_view(app).thinking_block.title.endswith("never closed: the reply ended inside it")

    run(app, scenario)


def test_ctrl_t_hides_thinking_per_chat_and_copy_and_export_follow_what_shows(settings, tmp_path):
    app = _app(settings, tmp_path)

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "Hi")
        first = chat.conversation_id
        view = _reply_view(app)
        view.focus()
        await pilot.press("c")
        assert app.clipboard == "Hello there!"  # folded: the answer only
        await pilot.press("t", "c")
        assert app.clipboard.startswith("The user greets me.") and app.clipboard.endswith("Hello there!")
        await pilot.press("ctrl+t")
        assert chat.query_one("#messages").has_class("hide-thinking")
        await pilot.press("ctrl+e")
        await pilot.pause()
        exported = next((app.settings.data_dir / "exports").glob("*.md")).read_text()
        assert "Hello there!" in exported and "greets" not in exported
        # Another chat shows its thinking; coming back, this one is still hidden.
        await chat.new_chat(None)
        assert not chat.query_one("#messages").has_class("hide-thinking")
        await chat.open_conversation(first)
        assert chat.query_one("#messages").has_class("hide-thinking")
        await pilot.press("ctrl+t", "ctrl+e")
        await pilot.pause()
        exported = next((app.settings.data_dir / "exports").glob("*.md")).read_text()
        assert "<details><summary>thinking</summary>" in exported and "greets" in exported

    run(app, scenario)


def test_the_thinking_switch_is_offered_only_where_the_template_has_it_and_goes_with_each_request(settings, tmp_path):
    app = _app(settings, tmp_path)

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await say(pilot, "Hi")
        sent = [r for r in app.backend.client.received if isinstance(r, p.Generate)]
        assert sent[-1].thinking is None  # the template's default
        await pilot.press("ctrl+o")
        await pilot.pause()
        app.screen.query_one("#thinking").value = "off"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.store.conversation(chat.conversation_id).settings.thinking is False
        await say(pilot, "Again")
        assert [r for r in app.backend.client.received if isinstance(r, p.Generate)][-1].thinking is False

    run(app, scenario)

    plain = _app(settings, tmp_path / "plain", switch=False)

    async def no_switch(pilot):
        await until(pilot, lambda: plain.chat.loaded is not None, what="the fake model")
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert not plain.screen.query("#thinking")

    run(plain, no_switch)


def test_a_personas_thinking_applies_where_the_chat_sets_none(settings, tmp_path):
    app = _app(settings, tmp_path)
    folder = app.settings.config_dir / "personas"
    folder.mkdir(parents=True)
    (folder / "quick.toml").write_text('name = "Quick"\nthinking = false\n')
    app.reload_personas()

    async def scenario(pilot):
        chat = app.chat
        await until(pilot, lambda: chat.loaded is not None, what="the fake model")
        await chat.new_chat("quick")
        await say(pilot, "Hi")
        assert [r for r in app.backend.client.received if isinstance(r, p.Generate)][-1].thinking is False
        settings = app.store.conversation(chat.conversation_id).settings
        app.store.set_settings(chat.conversation_id, type(settings)(persona="quick", thinking=True))
        await say(pilot, "Again")
        assert [r for r in app.backend.client.received if isinstance(r, p.Generate)][-1].thinking is True

    run(app, scenario)
