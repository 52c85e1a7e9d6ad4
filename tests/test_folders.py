"""An unusable data or config folder is one line naming it, exit 1, before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from uihelpers import make_app, make_settings, run, until


def _immutable(path: Path) -> bool:
    """Make `path` a folder nobody can write in, root included (permissions don't stop root)."""
    path.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def places(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    locked = tmp_path / "locked"
    can_lock = _immutable(locked)
    yield {
        "a file": (a_file, "is a file, not a folder"),
        "a folder under a file": (a_file / "data", f"can't be made: {a_file} is a file"),
        "a folder that can't be written": (locked, "can't be written to") if can_lock else None,
        "a folder that can't be made": (locked / "data", f"can't be made: {locked} can't be written to")
        if can_lock
        else None,
    }
    subprocess.run(["chattr", "-i", str(locked)], capture_output=True)


def _chatapp(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("command", [(), ("models",), ("cache",), ("ask", "hi")], ids=["tui", "models", "cache", "ask"])
def test_an_unusable_data_folder_is_one_line_before_anything_runs(places, command):
    for kind, place in places.items():
        if place is None:
            continue  # not root, or no chattr: permissions don't stop root
        path, problem = place
        out = _chatapp(*command, CHATAPP_DATA_DIR=str(path))
        assert out.returncode == 1, (kind, out.stderr)
        assert "Traceback" not in out.stderr, kind
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (kind, lines)
        assert lines[0].startswith(f"chatapp: error: the data folder {path} (set by $CHATAPP_DATA_DIR) {problem}")
        assert "CHATAPP_DATA_DIR" in lines[0]


@pytest.mark.parametrize("command", [(), ("models",)], ids=["tui", "models"])
def test_a_config_folder_that_is_a_file_is_one_line(places, command):
    for kind in ("a file", "a folder under a file"):
        path, problem = places[kind]
        out = _chatapp(*command, CHATAPP_CONFIG_DIR=str(path))
        assert out.returncode == 1, (kind, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr, (kind, lines)
        assert lines[0].startswith(f"chatapp: error: the config folder {path} (set by $CHATAPP_CONFIG_DIR) {problem}")


def test_settings_that_cant_be_saved_keep_the_form_and_what_was_typed(settings, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    s = make_settings(settings, tmp_path, config_dir=a_file / "config")
    app = make_app(s, start_worker=False)

    async def check(pilot):
        await pilot.pause()
        await pilot.press("f9")
        await until(pilot, lambda: type(app.screen).__name__ == "SettingsScreen", what="the settings")
        form = app.screen
        form.query_one("#set-top_p").value = "0.5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen is form
        assert str(form.query_one("#settings-error").content).startswith(f"can't save {s.config_file}:")
        assert form.query_one("#set-top_p").value == "0.5"

    run(app, check)
    assert a_file.read_text() == "not a folder"
