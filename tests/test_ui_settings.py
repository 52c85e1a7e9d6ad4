"""The settings form (F9): each field checked, and config.toml saved."""

from __future__ import annotations

from uihelpers import make_app, make_settings, run, until


def test_the_settings_form_checks_each_field_and_saves_config_toml(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    app = make_app(s, start_worker=False)

    async def check(pilot):
        await pilot.pause()
        await pilot.press("f9")
        await until(pilot, lambda: type(app.screen).__name__ == "SettingsScreen", what="the settings")
        form = app.screen
        form.query_one("#set-top_p").value = "7"
        form.query_one("#set-default_preset").value = "q3"
        await pilot.press("ctrl+s")
        await pilot.pause()
        error = str(form.query_one("#settings-error").content)
        assert "top_p must be > 0 and <= 1" in error and "default_preset must be one of" in error
        form.query_one("#set-top_p").value = "0.5"
        form.query_one("#set-default_preset").value = "nf4"
        form.query_one("#set-theme").value = "chatapp-light"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.settings.top_p == 0.5 and app.theme == "chatapp-light"

    run(app, check)
    text = s.config_file.read_text()
    assert "top_p = 0.5" in text and 'default_preset = "nf4"' in text and 'theme = "chatapp-light"' in text
