"""The app on a remote backend: our own `chatapp serve` on 127.0.0.1 (the tiny model), driven through the TUI as on
the local worker; a stub server only for a stream that is cut mid-reply."""

from __future__ import annotations

import pytest
from servehelpers import StubServer, serving
from uihelpers import last_stats, loaded, make_app, make_settings, run, say, start_long_reply, until

from chatapp.ui.widgets import MessageView


@pytest.fixture(scope="module")
def server(tiny_words_fp32):
    from chatapp.server.slots import Engine

    engine = Engine(tiny_words_fp32, slots=2)
    with serving(engine) as base:
        yield f"{base}/v1", engine
    engine.close()


def remote_app(settings, tmp_path, url, **overrides):
    return make_app(make_settings(settings, tmp_path, backend_url=url, **overrides), first_run=None)


def test_a_chat_on_a_remote_server_works_as_on_the_worker(settings, tmp_path, server):
    url, engine = server
    app = remote_app(settings, tmp_path, url)

    async def scenario(pilot):
        await loaded(pilot)
        status = app.chat.query_one("StatusBar")
        host = url.split("//")[1].removesuffix("/v1")
        await until(pilot, lambda: "remote:" in status.model_line, what="the status bar")
        assert status.model_line == f"{engine.name} · remote: {host} · presets decided by the server"
        await say(pilot, "Tell me about rivers")
        await say(pilot, "And bridges?")
        views = list(app.chat.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant", "user", "assistant"]
        stored = app.store.messages(app.chat.conversation_id)
        assert stored[-1].content == views[-1].content and stored[-1].preset == "remote"
        assert stored[-1].model == engine.name  # the server's model, not the default the app asked for
        stats = last_stats(app)
        cached = stats["prompt_tokens"] - stats["prefilled_tokens"]
        assert stats["remote"] and cached > 0  # the server's usage: it reused its cache
        assert f"prompt {stats['prompt_tokens']:,} · cached {cached:,}" in status.numbers
        # Regenerate: the server is asked again, with the same history.
        before = stored[-1].created
        await pilot.press("ctrl+r")
        newest = lambda: app.store.messages(app.chat.conversation_id)[-1].created  # noqa: E731
        await until(pilot, lambda: app.chat.turn is None and newest() != before, what="the regenerated reply")
        assert [m.role for m in app.store.messages(app.chat.conversation_id)] == ["user", "assistant"] * 2
        # The presets are the server's business; the picker lists the server's models.
        await pilot.press("f4")
        await until(pilot, lambda: any("decided by the server" in n for n in app.notices), what="the notice")
        await pilot.press("f3")
        await until(pilot, lambda: type(app.screen).__name__ == "RemoteModelsScreen", what="the picker")
        options = app.screen.query_one("OptionList")
        await until(pilot, lambda: options.option_count and options.get_option_at_index(0).id, what="the models")
        assert options.get_option_at_index(0).id == engine.name
        await pilot.press("escape")

    run(app, scenario)


def test_esc_stops_a_remote_reply_and_keeps_what_came(settings, tmp_path, server):
    url, _engine = server
    app = remote_app(settings, tmp_path, url, max_new_tokens=1500)

    async def scenario(pilot):
        await loaded(pilot)
        await start_long_reply(pilot, "Talk for a long time", min_chars=5)
        await pilot.press("escape")
        await until(pilot, lambda: app.chat.turn is None, what="the stop")
        stored = app.store.messages(app.chat.conversation_id)[-1]
        assert stored.role == "assistant" and stored.cut and stored.content
        assert stored.stats["finish_reason"] == "cancelled" and stored.stats["generated_tokens"] < 1500

    run(app, scenario)


def test_a_stream_cut_mid_reply_is_one_line_and_the_partial_reply_is_kept(settings, tmp_path):
    stub = StubServer("cut")
    app = remote_app(settings, tmp_path, stub.url)

    async def scenario(pilot):
        await loaded(pilot)
        # The server hasn't the default model: its own is used, with a notice.
        await until(pilot, lambda: any("using 'stub'" in n for n in app.notices), what="the notice")
        await say(pilot, "hi")
        assert any("closed the stream mid-reply" in n for n in app.notices)
        stored = app.store.messages(app.chat.conversation_id)[-1]
        assert stored.role == "assistant" and stored.content == "Hello there" and stored.cut

    try:
        run(app, scenario)
    finally:
        stub.close()


def test_the_app_picks_the_remote_backend_from_the_settings(settings, tmp_path):
    from chatapp.remote_client import RemoteClient
    from chatapp.worker_client import WorkerClient

    remote = remote_app(settings, tmp_path, "http://127.0.0.1:9/v1")
    assert isinstance(remote.backend.client, RemoteClient) and remote.backend.remote and not remote.first_run
    local = make_app(make_settings(settings, tmp_path / "local"), first_run=None)
    assert isinstance(local.backend.client, WorkerClient) and not local.backend.remote
