"""The model picker (F3), downloads in the app, and switching presets and models mid-conversation."""

from __future__ import annotations

import html
import shutil
import subprocess
import sys

import pytest
from uihelpers import last_stats, loaded, make_app, make_settings, run, say, until

from chatapp.hardware import CpuInfo, Hardware, describe_by_hand
from chatapp.ui.backend import Target

GIB = 1024**3
SIMULATED = describe_by_hand(
    Hardware(cpu=CpuInfo(ram_total_bytes=32 * GIB, ram_available_bytes=32 * GIB, flags=frozenset())),
    gpus=["RTX 4070:12GiB"],
)


def screen_text(app) -> str:
    """The screen as plain text, from the SVG a snapshot takes."""
    return html.unescape(app.export_screenshot()).replace("\xa0", " ")


async def picker_ready(pilot):
    app = pilot.app
    await until(
        pilot,
        lambda: type(app.screen).__name__ == "ModelPickerScreen" and app.screen.rows["catalog"],
        what="the picker",
    )
    # Ready: the first row painted whole. A table that painted before it measured its rows once stayed with
    # header-wide columns (1 snapshot in 4 on a busy machine); the picker now sets the widths itself.
    await until(
        pilot,
        lambda: app.screen.rows[app.screen._active_tab()][0].name in screen_text(app),
        what="the picker's first row painted whole",
    )
    await pilot.pause(0.1)
    return app.screen


def scenario(hub_env, tmp_path, name: str):
    out = subprocess.run(
        [sys.executable, "tests/ui_hub_scenarios.py", name, str(tmp_path)],
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (out.stdout + out.stderr)[-3000:]


def test_download_in_the_app_then_chat_then_delete(hub_env, tmp_path):
    scenario(hub_env, tmp_path, "download_and_chat")


def test_a_download_shows_progress_and_can_be_cancelled(hub_server, hub_env, tmp_path):
    server, _url = hub_server
    server.block_delay_s = 0.01
    try:
        scenario(hub_env, tmp_path, "cancel_download")
    finally:
        server.block_delay_s = 0.0


def test_esc_stops_a_download_from_a_crawling_server_at_once(hub_server, hub_env, tmp_path):
    server, _url = hub_server
    server.fast_bytes, server.bytes_per_s = 2_000_000, 2_000  # then 2 kB/s
    try:
        scenario(hub_env, tmp_path, "cancel_crawling_download")
    finally:
        server.fast_bytes, server.bytes_per_s = 0, 0


def test_quitting_the_app_never_waits_on_a_download(hub_server, hub_env, tmp_path):
    server, _url = hub_server
    server.fast_bytes, server.bytes_per_s = 2_000_000, 2_000
    proc = subprocess.Popen(
        [sys.executable, "tests/ui_hub_scenarios.py", "quit_during_download", str(tmp_path)],
        env=hub_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "QUIT":
                break
        assert lines and lines[-1].strip() == "QUIT", "".join(lines)[-3000:]
        try:
            proc.wait(timeout=10)  # a generous bound: it acts at once, but CI machines are busy
        except subprocess.TimeoutExpired:
            raise AssertionError("the app did not exit within 10 s of quitting during a download") from None
        assert proc.returncode == 0, proc.stdout.read()[-3000:]
    finally:
        server.fast_bytes, server.bytes_per_s = 0, 0
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_picker_asks_before_downloading_a_model_that_cannot_fit(huge_repo, hub_env, tmp_path):
    scenario(hub_env, tmp_path, "cannot_fit")


def test_a_gated_repo_shows_the_license_page_and_how_to_log_in(hub_env, tmp_path):
    scenario(hub_env, tmp_path, "gated")


def test_the_picker_plans_for_the_hardware_it_is_given(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), start_worker=False, hardware=SIMULATED)

    async def check(pilot):
        await pilot.press("f3")
        picker = await picker_ready(pilot)
        catalog = {r.ref: r for r in picker.rows["catalog"]}
        assert catalog["llama-3.1-8b"].verdict.startswith("bf16 ✗") and "nf4 ✓" in catalog["llama-3.1-8b"].verdict
        assert picker.rows["recommended"][0].ref == "smollm2-135m-local"
        assert "llama-3.1-70b" not in [r.ref for r in picker.rows["recommended"]]
        assert "RTX 4070" in str(picker.query_one("#picker-title").content)
        assert "reasons:" in str(picker.query_one("#details").content)

    run(app, check, size=(140, 40))


def test_first_run_opens_the_picker_with_the_starter_on_top(settings, tmp_path):
    app = make_app(make_settings(settings, tmp_path), start_worker=False, hardware=SIMULATED, first_run=None)

    async def check(pilot):
        await picker_ready(pilot)
        assert app.screen.selected().ref == "smollm2-135m-local" and app.screen.selected().ready

    run(app, check, size=(140, 40))


@pytest.mark.parametrize("size", [(120, 40)])
def test_picker_snapshot(snap_compare, settings, tmp_path, size):
    app = make_app(make_settings(settings, tmp_path), start_worker=False, hardware=SIMULATED)

    async def ready(pilot):
        await pilot.press("f3")
        await picker_ready(pilot)

    assert snap_compare(app, terminal_size=size, run_before=ready)


def test_switching_presets_keeps_the_conversation_and_prefills_it_once(settings, tiny_words_folder, tmp_path):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder), preset="nf4")

    async def scenario_(pilot):
        await loaded(pilot)
        assert app.chat.loaded.preset == "nf4"
        await say(pilot, "Hello in nf4")
        await say(pilot, "Still nf4")
        app.backend.switch(Target(str(tiny_words_folder), "bf16"))
        await until(pilot, lambda: app.chat.loaded is not None and app.chat.loaded.preset == "bf16", what="bf16")
        await say(pilot, "Now in bf16")
        once = last_stats(app)
        assert once["prefilled_tokens"] == once["prompt_tokens"]  # the cache is rebuilt once, on the new weights
        await say(pilot, "And again")
        after = last_stats(app)
        assert after["prefilled_tokens"] < after["prompt_tokens"] - once["prompt_tokens"] + 2
        presets = [m.preset for m in app.store.messages(app.chat.conversation_id) if m.role == "assistant"]
        assert presets == ["nf4", "nf4", "bf16", "bf16"]
        assert app.store.get_state("last_preset") == "bf16"

    run(app, scenario_)


def test_switching_models_mid_conversation_and_a_failed_load_goes_back(
    settings, tiny_words_folder, tiny_folder, tmp_path
):
    app = make_app(make_settings(settings, tmp_path), str(tiny_words_folder))

    async def scenario_(pilot):
        await loaded(pilot)
        await say(pilot, "First model")
        app.backend.switch(Target(str(tiny_folder), "fp32"))
        await until(
            pilot,
            lambda: app.chat.loaded is not None and app.chat.loaded.model == str(tiny_folder),
            what="the other model",
        )
        await say(pilot, "Second model")
        models = [m.model for m in app.store.messages(app.chat.conversation_id) if m.role == "assistant"]
        assert models == [str(tiny_words_folder), str(tiny_folder)]
        # A model the worker fails to load: the previous model and preset come back.
        broken = tmp_path / "broken"
        shutil.copytree(tiny_folder, broken)
        (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
        app.backend.switch(Target(str(broken), "fp32"))
        await until(pilot, lambda: any("Going back to" in n for n in app.notices), what="the fallback")
        await until(
            pilot,
            lambda: app.chat.loaded is not None and app.chat.loaded.model == str(tiny_folder),
            what="the previous model to come back",
        )
        assert (app.backend.model, app.backend.preset) == (str(tiny_folder), "fp32")
        # A model that names nothing fails before the worker is asked: what is loaded never leaves.
        app.backend.switch(Target("no-such-model-anywhere", "fp32"))
        await until(
            pilot, lambda: any("unknown model 'no-such-model-anywhere'" in n for n in app.notices), what="the error"
        )
        assert app.chat.loaded is not None and app.chat.loaded.model == str(tiny_folder)
        assert (app.backend.model, app.backend.preset) == (str(tiny_folder), "fp32")
        await say(pilot, "Still here?")
        assert app.store.messages(app.chat.conversation_id)[-1].model == str(tiny_folder)

    run(app, scenario_)


def test_names_and_licenses_from_a_users_catalog_are_shown_literally(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    s.config_dir.mkdir(parents=True, exist_ok=True)
    name, license_text = "[bold]Bold[/bold] [@click=app.quit]Quit[/]", "[/] mit"
    (s.config_dir / "models.toml").write_text(
        f"""[models.markup-test]
name = "{name}"
repo = "Org/markup-test"
license = "{license_text}"
context_length = 2048

[models.markup-test.architecture]
layers = 2
hidden_size = 64
intermediate_size = 128
attention_heads = 4
kv_heads = 2
head_dim = 16
vocab_size = 1000
tied_embeddings = true
"""
    )
    app = make_app(s, start_worker=False, hardware=SIMULATED)

    async def check(pilot):
        await pilot.press("f3")
        screen = await picker_ready(pilot)
        screen.query_one("#picker-tabs").active = "catalog"
        await pilot.pause(0.2)
        table = screen.query_one("#table-catalog")
        cells = [str(cell) for cell in table.get_row("markup-test")]
        assert cells[0] == name and cells[5] == license_text
        table.move_cursor(row=table.get_row_index("markup-test"))
        await pilot.click("#table-catalog", offset=(2, table.get_row_index("markup-test") + 1))
        await pilot.pause(0.2)
        assert app.is_running  # the "[@click=app.quit]" in the name was not an action

    run(app, check, size=(140, 40))


def test_a_broken_user_catalog_is_named_once_and_the_shipped_one_stays_usable(settings, tmp_path):
    s = make_settings(settings, tmp_path)
    s.config_dir.mkdir(parents=True, exist_ok=True)
    bad = s.config_dir / "models.toml"
    bad.write_text("[models.mine\nname = 'unclosed")
    app = make_app(s, start_worker=False, first_run=True, hardware=SIMULATED)  # the picker opens by itself

    async def check(pilot):
        screen = await picker_ready(pilot)
        assert "smollm2-135m-local" in [row.ref for row in screen.rows["catalog"]]
        problems = [n for n in app.notices if str(bad) in n]
        assert len(problems) == 1 and "not valid TOML" in problems[0] and "\n" not in problems[0]
        await pilot.press("escape")
        await pilot.press("f3")  # again: still usable, and not said twice
        await picker_ready(pilot)
        assert len([n for n in app.notices if str(bad) in n]) == 1

    run(app, check, size=(140, 40))
