"""Personas in the TUI: Ctrl+N offers them, a chat's settings switch them, and the palette manages them."""

from __future__ import annotations

from uihelpers import make_app, make_settings, run, say, until

from chatapp import protocol as p
from chatapp.personas import load_personas, personas_dir


def _generates(app) -> list[p.Generate]:
    return [r for r in app.backend.client.received if isinstance(r, p.Generate)]


def test_ctrl_n_offers_the_personas_and_a_reply_uses_the_picked_ones_prompt_and_sampling(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), fake=True)

    async def scenario(pilot):
        await until(pilot, lambda: app.chat.loaded is not None, what="the fake model")
        await pilot.press("ctrl+n")
        await pilot.pause()
        listing = app.screen.query_one("#personas")
        ids = [listing.get_option_at_index(i).id for i in range(listing.option_count)]
        assert ids[0] == " none" and {"assistant", "coder", "concise"} <= set(ids)
        listing.highlighted = ids.index("coder")
        await pilot.press("enter")
        await pilot.pause()
        chat = app.store.conversation(app.chat.conversation_id)
        assert chat.settings.persona == "coder" and chat.settings.system_prompt == ""
        await say(pilot, "Sort a list in Python")
        sent = _generates(app)[-1]
        coder = app.personas["coder"]
        assert sent.messages[0] == ("system", coder.system_prompt)
        # The persona's values win over config.toml's (temperature 0 in these tests); the rest come from config.
        assert (sent.params.temperature, sent.params.top_p, sent.params.max_new_tokens) == (0.2, 0.95, 12)
        # The next Ctrl+N starts on the persona picked last; "No persona" makes a plain chat.
        await pilot.press("ctrl+n")
        await pilot.pause()
        listing = app.screen.query_one("#personas")
        assert listing.get_option_at_index(listing.highlighted).id == "coder"
        listing.highlighted = 0
        await pilot.press("enter")
        await pilot.pause()
        assert app.store.conversation(app.chat.conversation_id).settings.persona is None
        await say(pilot, "Hello")
        assert _generates(app)[-1].messages == [("user", "Hello")]
        # Esc makes no chat.
        count = len(app.store.conversations())
        await pilot.press("ctrl+n", "escape")
        await pilot.pause()
        assert len(app.store.conversations()) == count

    run(app, scenario)


def test_chat_settings_switch_the_persona_and_show_where_each_value_comes_from(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), fake=True, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        await app.chat.new_chat(None)
        await pilot.press("ctrl+o")
        await pilot.pause()
        dialog = app.screen

        def label(name):
            return str(dialog.query_one(f"#label-{name}").content)

        assert label("temperature") == "temperature (0.0 · config)"
        dialog.query_one("#persona").value = "concise"
        await pilot.pause()
        assert label("temperature") == "temperature (0.3 · persona)"
        assert label("max_new_tokens") == "max_new_tokens (256 · persona)"
        assert dialog.query_one("#system-prompt").placeholder.startswith("the persona's: You are a concise")
        dialog.query_one("#top-k").value = "5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = app.store.conversation(app.chat.conversation_id).settings
        assert (saved.persona, saved.top_k, saved.system_prompt) == ("concise", 5, "")

    run(app, scenario)


def test_the_palette_makes_edits_duplicates_and_deletes_personas(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, fake=True, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        app.action_personas()
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
        form = app.screen
        form.query_one("#persona-name").value = "Pirate"
        form.query_one("#persona-system-prompt").text = "Talk like a pirate."
        form.query_one("#persona-temperature").value = "9"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "temperature must be >= 0 and <= 2, got 9.0" in str(form.query_one("#settings-error").content)
        form.query_one("#persona-temperature").value = "1.1"
        form.query_one("#persona-thinking").value = "off"
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved, errors = load_personas(s.config_dir)
        assert errors == [] and saved["persona"].name == "Pirate"
        assert (saved["persona"].sampling, saved["persona"].thinking) == ({"temperature": 1.1}, False)
        assert "persona" in app.personas
        listing = app.screen.query_one("#personas")
        assert listing.get_option_at_index(listing.highlighted).id == "persona"
        await pilot.press("d")
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert load_personas(s.config_dir)[0]["persona-2"].name == "Pirate (copy)"
        await pilot.press("delete")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert "persona-2" not in load_personas(s.config_dir)[0] and "persona-2" not in app.personas
        # A shipped persona can't be deleted.
        listing = app.screen.query_one("#personas")
        listing.highlighted = [listing.get_option_at_index(i).id for i in range(listing.option_count)].index("coder")
        await pilot.press("delete")
        await pilot.pause()
        assert "ships with chatapp" in str(app.screen.query_one("#personas-error").content)
        assert "coder" in app.personas

    run(app, scenario)


def test_a_broken_persona_file_is_one_notice_and_the_rest_still_load(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    personas_dir(s.config_dir).mkdir(parents=True)
    (personas_dir(s.config_dir) / "bad.toml").write_text('name = "Bad"\ntop_p = 5\n')
    app = make_app(s, fake=True, start_worker=False)

    async def scenario(pilot):
        await pilot.pause()
        assert any(n.startswith("persona ") and "'top_p' must be" in n for n in app.notices)
        assert "bad" not in app.personas and "coder" in app.personas

    run(app, scenario)
