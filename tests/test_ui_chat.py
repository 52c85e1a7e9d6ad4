"""The chat screen (screens/chat.py), driven with Pilot.

Its behaviour runs against the scripted FakeWorkerClient (no torch, replies in milliseconds); the tests at the
end go through the real worker process on the tiny model, for what only a model can show: real prefill counts
and each chat's own KV cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from uihelpers import (
    CODE_REPLY,
    last_stats,
    loaded,
    long_reply_app,
    make_app,
    make_settings,
    run,
    say,
    seeded_store,
    start_long_reply,
    until,
)

from chatapp.snapshots import kv_dir
from chatapp.store import ConvSettings, Store
from chatapp.ui.widgets import MessageView

# -- without a model: the sidebar, copy, export, chat settings, the prompt ------------------------------


def test_sidebar_rename_search_and_delete_with_confirmation(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    store = seeded_store(s)
    app = make_app(s, store=store, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        chat = app.chat
        assert store.conversation(chat.conversation_id).title == "Python help"  # the latest
        await pilot.press("f2")
        await pilot.pause()
        title_input = app.screen.query_one("#text")
        title_input.value = "Hello world"
        await pilot.press("enter")
        await pilot.pause()
        assert store.conversation(chat.conversation_id).title == "Hello world"

        await pilot.press("ctrl+f")
        await pilot.press(*"risotto")
        await pilot.pause(0.2)
        assert len(chat.query_one("#chats").children) == 1  # found by message content
        chat.query_one("#search").value = ""
        await pilot.pause(0.2)

        doomed = chat.conversation_id
        kv = kv_dir(s.data_dir)
        kv.mkdir(parents=True)
        snapshot, other = (
            kv / f"chat{doomed}-0123abcd.kv.safetensors",
            kv / f"chat{doomed + 100}-0123abcd.kv.safetensors",
        )
        snapshot.write_bytes(b"a chat's cache")
        other.write_bytes(b"another chat's cache")
        await pilot.press("ctrl+d")
        await pilot.pause()
        await pilot.click("#no")
        await pilot.pause()
        assert doomed in [c.id for c in store.conversations()]
        await pilot.press("ctrl+d")
        await pilot.pause()
        await pilot.click("#yes")
        await pilot.pause(0.2)
        assert [c.title for c in store.conversations()] == ["Dinner plans"]
        assert chat.conversation_id != doomed
        assert not snapshot.exists() and other.exists()  # its snapshots went with it, even with no worker running

    run(app, scenario)


def test_copy_message_and_code_block_and_export(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, store=seeded_store(s), start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        reply = [v for v in app.chat.query(MessageView) if v.role == "assistant"][-1]
        reply.focus()
        await pilot.press("c")
        assert app.clipboard == CODE_REPLY
        await pilot.press("k")
        assert app.clipboard == "print('hi')"
        await pilot.press("ctrl+e")
        await pilot.pause()
        exported = list((s.data_dir / "exports").glob("*.md"))
        assert len(exported) == 1 and "print('hi')" in exported[0].read_text()

    run(app, scenario)


def test_conversation_settings_are_validated_and_saved(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, store=seeded_store(s), start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        await pilot.press("ctrl+o")
        await pilot.pause()
        dialog = app.screen
        labels = [str(label.content) for label in dialog.query("Label")]
        assert "top_k (0 · config)" in labels and "seed (random · default)" in labels
        dialog.query_one("#system-prompt").text = "You are a pirate."
        dialog.query_one("#temperature").value = "hot"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "temperature must be a number" in str(dialog.query_one("#settings-error").content)
        dialog.query_one("#temperature").value = "0.3"
        dialog.query_one("#max-new-tokens").value = "64"
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = app.store.conversation(app.chat.conversation_id).settings
        assert saved == ConvSettings("You are a pirate.", 0.3, None, 64)

    run(app, scenario)


def test_ctrl_j_and_shift_enter_add_lines_and_enter_sends(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, fake=True, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        prompt = app.chat.query_one("#prompt")
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert prompt.text == "a\nb\nc"
        await pilot.press("enter")
        await pilot.pause()
        # No model yet: the message waits for the load instead of being lost.
        assert app.chat.queued == [(app.chat.conversation_id, "a\nb\nc", [])] and prompt.text == ""
        # Once a model has loaded, it goes out as one message of three lines.
        app.backend.restart()
        await loaded(pilot)

        def messages():
            return app.store.messages(app.chat.conversation_id)

        await until(pilot, lambda: len(messages()) == 2 and app.chat.turn is None, what="the queued message's reply")
        assert [(m.role, m.content) for m in messages()][0] == ("user", "a\nb\nc") and messages()[1].role == "assistant"
        assert not app.chat.queued

    run(app, scenario)


# -- replies, through the fake worker -----------------------------------------------------------------


def test_escape_stops_a_reply_and_keeps_it_marked_stopped(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path, max_new_tokens=1500), fake=True)

    async def scenario(pilot):
        await loaded(pilot)
        await start_long_reply(pilot, "Go on and on")
        await pilot.press("escape")
        await until(pilot, lambda: app.chat.turn is None, what="the stop")
        reply = app.store.messages(app.chat.conversation_id)[-1]
        assert reply.role == "assistant" and reply.cut and reply.content
        assert reply.stats["finish_reason"] == "cancelled" and reply.stats["generated_tokens"] < 1500
        view = list(app.chat.query(MessageView))[-1]
        assert "stopped" in view.query_one(".message-header").content

    run(app, scenario)


def test_what_is_typed_during_a_reply_is_queued_and_sent_after_it(settings, tmp_path):
    app = long_reply_app(settings, tmp_path, "A long answer please")

    async def scenario(pilot):
        await loaded(pilot)
        await start_long_reply(pilot, "A long answer please")
        await say(pilot, "Then this", wait=False)
        assert app.chat.queued == [(app.chat.conversation_id, "Then this", [])]
        assert app.chat.query_one("#prompt").text == ""
        await pilot.press("escape")
        await until(pilot, lambda: len(app.store.messages(app.chat.conversation_id)) == 4, what="the queued turn")
        roles = [(m.role, m.cut) for m in app.store.messages(app.chat.conversation_id)]
        assert roles[:3] == [("user", False), ("assistant", True), ("user", False)]
        assert app.store.messages(app.chat.conversation_id)[2].content == "Then this"

    run(app, scenario)


def test_chats_come_back_after_a_restart(settings, tmp_path):
    test_settings = make_settings(settings, tmp_path)
    first = make_app(test_settings, fake=True)

    async def chat(pilot):
        await loaded(pilot)
        await say(pilot, "Remember me")
        await pilot.press("ctrl+n", "enter")  # the persona picker: none
        await say(pilot, "The second chat")

    run(first, chat)
    first.store.close()
    second = make_app(test_settings, fake=True, store=Store.open(test_settings.data_dir))

    async def check(pilot):
        await pilot.pause(0.2)
        titles = [c.title for c in second.store.conversations()]
        assert titles == ["The second chat", "Remember me"]
        assert [v.content for v in second.chat.query(MessageView)][0] == "The second chat"
        assert len(second.chat.query_one("#chats").children) == 2

    run(second, check)


def test_a_killed_worker_leaves_the_app_up_keeps_the_partial_reply_and_restarts(settings, tmp_path):
    app = long_reply_app(settings, tmp_path, "Keep talking")

    async def scenario(pilot):
        await loaded(pilot)
        await start_long_reply(pilot, "Keep talking", min_chars=20)
        app.backend.client.kill()
        await until(pilot, lambda: app.chat.turn is None, what="the UI to notice")
        status = app.chat.query_one("StatusBar")
        assert "the worker stopped (killed): press F5 to restart it" in status.model_line
        reply = app.store.messages(app.chat.conversation_id)[-1]
        assert reply.role == "assistant" and reply.cut and reply.content
        await pilot.press("f5")
        await loaded(pilot)
        await say(pilot, "Back again?")
        assert app.store.messages(app.chat.conversation_id)[-1].content

    run(app, scenario)


def test_context_trimming_is_shown_and_an_evicted_chat_is_announced(settings, tmp_path):
    # The fake counts words as tokens: a 64-token context holds about three of these turns.
    app = make_app(make_settings(settings, tmp_path, context_cap=64, max_new_tokens=8), fake=True)

    async def scenario(pilot):
        await loaded(pilot)
        for turn in range(4):
            await say(pilot, f"Message number {turn} with a few more words in it")
        status = app.chat.query_one("StatusBar")
        assert last_stats(app)["dropped_messages"] > 0
        assert "no longer fit the context" in status.notice
        old = app.chat.conversation_id
        await pilot.press("ctrl+n", "enter")  # the persona picker: none
        app.backend.client.evict_after_next([old])
        await say(pilot, "A new chat that pushes the old one out of the cache")
        await until(pilot, lambda: any("left the KV cache" in n for n in app.notices), what="the eviction notice")

    run(app, scenario)


def test_the_sidebar_marks_where_each_chats_cache_is_and_a_restore_is_shown(settings, tmp_path):
    from chatapp import protocol as p

    app = make_app(make_settings(settings, tmp_path, max_new_tokens=8), fake=True)

    def marks() -> dict[str, str]:
        view = app.chat.query_one("#chats")
        texts = [str(item.query_one("Label").content) for item in view.children]
        return {text[2:]: text[:2] for text in texts}

    async def scenario(pilot):
        await loaded(pilot)
        await say(pilot, "First chat")
        first = app.chat.store.conversation(app.chat.conversation_id).title
        await until(pilot, lambda: marks().get(first) == "● ", what="the live mark")
        await pilot.press("ctrl+n", "enter")  # the persona picker: none
        app.backend.client.evict_after_next([app.chat.store.conversations()[-1].id])
        await say(pilot, "Second chat")
        second = app.chat.store.conversation(app.chat.conversation_id).title
        await until(pilot, lambda: marks() == {first: "○ ", second: "● "}, what="the disk mark")
        # A restored turn's note stays in the status bar.
        stats = p.TurnStats(900, 12, 3, 0.1, 5.0, 914, "stop", cache_note="restored 900 tokens from disk in 0.12 s")
        app.chat._show_stats(stats.as_dict())
        assert "restored 900 tokens from disk" in app.chat.query_one("StatusBar").notice
        app.backend.client.kill()
        await until(pilot, lambda: set(marks().values()) == {"○ "}, what="memory gone, the disk kept")

    run(app, scenario)


# -- end to end: the real worker process on the tiny model ---------------------------------------------


def test_send_streams_a_reply_and_stores_both_messages(settings, tiny_words_folder, tmp_path):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario(pilot):
        assert app.chat.loaded is None  # the screen is up before the model
        await loaded(pilot)
        await say(pilot, "Hello there")
        views = list(app.chat.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        stored = app.store.messages(app.chat.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant"]
        assert views[1].content == stored[1].content and stored[1].content
        assert stored[1].model == str(tiny_words_folder) and stored[1].preset == "fp32"
        stats = stored[1].stats
        assert stats["prefilled_tokens"] == stats["prompt_tokens"]
        status = app.chat.query_one("StatusBar")
        assert f"cached {stats['cache_tokens']}" in status.numbers and "TTFT" in status.numbers
        assert app.store.conversation(app.chat.conversation_id).title == "Hello there"
        # Turn two prefills only the new message.
        await say(pilot, "Tell me more")
        second = last_stats(app)
        assert second["prefilled_tokens"] < second["prompt_tokens"] - stats["prompt_tokens"] + 2

    run(app, scenario)


def test_regenerate_and_edit_reuse_the_cache(settings, tiny_words_folder, tmp_path):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario(pilot):
        await loaded(pilot)
        await say(pilot, "First question")
        await say(pilot, "Second question")
        before = app.store.messages(app.chat.conversation_id)[-1].created
        await pilot.press("ctrl+r")
        await until(
            pilot,
            lambda: app.chat.turn is None and app.store.messages(app.chat.conversation_id)[-1].created != before,
            what="the regenerated reply",
        )
        stored = app.store.messages(app.chat.conversation_id)
        assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
        # Regenerating re-runs nothing but the last prompt token.
        assert last_stats(app)["prefilled_tokens"] == 1

        first_user = next(v for v in app.chat.query(MessageView) if v.role == "user")
        first_user.focus()
        await pilot.press("e")
        await pilot.pause(0.1)
        await pilot.press("w")  # rewrite here, rather than branch: more of the chat comes after this message
        assert app.chat.editing == 0 and app.chat.query_one("#prompt").text == "First question"
        await say(pilot, "First question, rephrased")
        stored = app.store.messages(app.chat.conversation_id)
        assert [(m.role, m.content) for m in stored][:1] == [("user", "First question, rephrased")]
        assert len(stored) == 2
        stats = last_stats(app)
        assert 0 < stats["prefilled_tokens"] < stats["prompt_tokens"]  # the template's system part was reused
        assert [v.role for v in app.chat.query(MessageView)] == ["user", "assistant"]

    run(app, scenario)


def test_each_chat_keeps_its_own_cache_when_switching(settings, tiny_words_folder, tmp_path):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario(pilot):
        await loaded(pilot)
        await say(pilot, "Chat A first")
        chat_a = app.chat.conversation_id
        a_first = last_stats(app)
        await pilot.press("ctrl+n", "enter")  # the persona picker: none
        await say(pilot, "Chat B first")
        chat_b = app.chat.conversation_id
        assert chat_b != chat_a
        await app.chat.open_conversation(chat_a)
        assert [v.content for v in app.chat.query(MessageView)][0] == "Chat A first"
        await say(pilot, "Chat A second")
        a_second = last_stats(app)
        assert a_second["prompt_tokens"] - a_second["prefilled_tokens"] >= a_first["prompt_tokens"]
        assert a_second["prefilled_tokens"] < a_second["prompt_tokens"] - a_first["prompt_tokens"] + 2
        await app.chat.open_conversation(chat_b)
        await say(pilot, "Chat B second")
        b_second = last_stats(app)
        assert b_second["prefilled_tokens"] < b_second["prompt_tokens"] // 2

    run(app, scenario)


def test_the_ui_process_never_imports_torch(tiny_words_folder, tmp_path):
    """A whole chat turn in a fresh process: the model runs in the worker, and this process has no torch."""
    code = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, "tests")
        from pathlib import Path
        from chatapp.config import load_settings
        from uihelpers import loaded, make_app, make_settings, say

        async def main():
            app = make_app(make_settings(load_settings(), Path({str(tmp_path)!r})), {str(tiny_words_folder)!r})
            async with app.run_test() as pilot:
                await loaded(pilot)
                await say(pilot, "Hi")
                assert app.store.messages(app.chat.conversation_id)[-1].content
            print("torch" in sys.modules, "transformers" in sys.modules)

        if __name__ == "__main__":
            asyncio.run(main())
        """)
    script = tmp_path / "ui_only.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False False"
