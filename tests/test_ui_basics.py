"""The app's screens without a model: themes, config errors, the sidebar, dialogs, copy and export."""

from __future__ import annotations

from uihelpers import CODE_REPLY, loaded_event, make_app, make_settings, run, seeded_store

from chatapp.config import load_settings_checked
from chatapp.store import ConvSettings, Store
from chatapp.ui.backend import WorkerEvent
from chatapp.ui.widgets import MessageView


def notifications(app) -> list[str]:
    return [n for n in app.notices]


def test_an_invalid_theme_file_is_reported_and_the_default_theme_used(settings, tmp_path):
    s = make_settings(settings, tmp_path, theme="broken")
    s.themes_dir.mkdir(parents=True)
    (s.themes_dir / "broken.toml").write_text('name = "broken"\nprimary = "not a colour"\n')
    app = make_app(s, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        assert app.theme == "chatapp-dark"
        assert any("broken.toml" in line for line in notifications(app))
        assert {"chatapp-dark", "chatapp-light", "chatapp-high-contrast", "chatapp-dusk"} <= set(app.available_themes)

    run(app, scenario)


def test_a_bad_config_value_is_shown_and_the_app_runs_on_the_default(settings, tmp_path):
    config = tmp_path / "config" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('top_p = 7\ntheme = "chatapp-light"\n')
    loaded, errors = load_settings_checked(config)
    assert loaded.top_p == 0.9 and loaded.theme == "chatapp-light"
    s = make_settings(loaded, tmp_path, theme=loaded.theme, top_p=loaded.top_p)
    app = make_app(s, start_worker=False, settings_errors=errors)

    async def scenario(pilot):
        await pilot.pause()
        assert any("'top_p'" in line and "config.toml" in line for line in notifications(app))
        assert app.theme == "chatapp-light"

    run(app, scenario)


def test_the_theme_choice_is_saved_to_config_toml(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        app.theme = "chatapp-high-contrast"
        await pilot.pause()

    run(app, scenario)
    assert load_settings_checked(s.config_file)[0].theme == "chatapp-high-contrast"


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


def test_every_chat_action_is_in_the_command_palette(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        titles = {command.title for command in app.get_system_commands(app.chat)}
        assert {b.description for b in app.chat.BINDINGS} <= titles
        assert "Theme" in " ".join(titles)

    run(app, scenario)


def test_status_bar_shows_the_loaded_model(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, store=seeded_store(s), start_worker=False)

    async def scenario(pilot):
        app.post_message(WorkerEvent(loaded_event()))
        await pilot.pause(0.2)
        status = app.chat.query_one("StatusBar")
        assert status.model_line.startswith("TestOrg/tiny-llama · fp32 · cpu · sdpa")
        assert "ctx 52/2,048" in status.numbers and "cached 51" in status.numbers

    run(app, scenario)


def test_the_app_opens_on_the_last_used_model_else_the_default(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    store = Store.open(s.data_dir)
    assert make_app(s, store=store, start_worker=False).backend.model == s.default_model
    store.set_state("last_model", "TestOrg/tiny-llama")
    store.set_state("last_preset", "nf4")
    app = make_app(s, store=store, start_worker=False)
    assert (app.backend.model, app.backend.preset) == ("TestOrg/tiny-llama", "nf4")


def test_ctrl_j_and_shift_enter_add_lines_and_enter_sends(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        prompt = app.chat.query_one("#prompt")
        prompt.focus()
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert prompt.text == "a\nb\nc"
        await pilot.press("enter")
        await pilot.pause()
        # No model yet: the message waits for the load instead of being lost.
        assert app.chat.queued == [(app.chat.conversation_id, "a\nb\nc")] and prompt.text == ""

    run(app, scenario)
