"""The app as a whole, without a model: themes, config errors, the command palette, the status bar, the last model."""

from __future__ import annotations

from fakeworker import FakeWorkerClient
from uihelpers import loaded, loaded_event, make_app, make_settings, run, seeded_store, until

from chatapp.config import load_settings_checked
from chatapp.store import Store
from chatapp.ui.backend import WorkerEvent


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
    # Started, it asks the worker for exactly that model and preset, and says so once loaded.
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    store.set_state("last_model", str(mine))
    app = make_app(s, store=store, client_factory=FakeWorkerClient.factory())

    async def scenario(pilot):
        await loaded(pilot)
        assert (app.chat.loaded.model, app.chat.loaded.preset) == (str(mine), "nf4")
        status = app.chat.query_one("StatusBar")
        # The backend knows before the screen has heard: wait for the status bar, don't race it.
        await until(pilot, lambda: status.model_line.startswith(f"{mine} · nf4 (fp32) · cpu"), what="the status bar")

    run(app, scenario)
