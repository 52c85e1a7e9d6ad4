"""Broken model files and catalog entries (issue 12, bad item 8): one line that names the file and what is wrong,
in `plan`, in `ask` (auto and an explicit preset), in the TUI's preset picker (F4), and in the worker's load."""

from __future__ import annotations

import queue
from dataclasses import replace
from pathlib import Path

import pytest
from brokenmodels import BROKEN_ENTRIES, BROKEN_FOLDERS, broken_catalog, broken_folder
from uihelpers import make_app, make_settings, run, until
from workerhelpers import load_result

from chatapp import protocol as p
from chatapp.cli import main

KINDS = list(BROKEN_FOLDERS)


def one_error_line(capsys) -> str:
    """The command's only error line, which is its last line on stderr; no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("chatapp: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize("kind", KINDS)
def test_plan_names_the_broken_file(kind, tiny_folder, tmp_path, capsys):
    folder, name, words = broken_folder(tiny_folder, kind, tmp_path / "model")
    assert main(["plan", str(folder), "--no-gpu", "--ram", "16GiB"]) == 1
    line = one_error_line(capsys)
    assert f"'{name}'" in line and words in line


@pytest.mark.parametrize("preset", ["auto", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_ask_names_the_broken_file(kind, preset, tiny_folder, tmp_path, capsys):
    folder, name, words = broken_folder(tiny_folder, kind, tmp_path / "model")
    assert main(["ask", "Hello", "--model", str(folder), "--preset", preset, "--max-new-tokens", "2"]) == 1
    line = one_error_line(capsys)
    assert f"'{name}'" in line and words in line


@pytest.mark.parametrize("command", ["plan", "ask"])
@pytest.mark.parametrize("kind", list(BROKEN_ENTRIES))
def test_a_broken_catalog_entry_names_the_file_and_field(kind, command, tmp_path, capsys, monkeypatch):
    path, words = broken_catalog(tmp_path / "config", kind)
    monkeypatch.setenv("CHATAPP_CONFIG_DIR", str(tmp_path / "config"))
    args = ["plan", "broken", "--no-gpu", "--ram", "16GiB"] if command == "plan" else ["ask", "Hi", "-m", "broken"]
    assert main(args) == 1
    line = one_error_line(capsys)
    assert str(path) in line and "entry 'broken'" in line and words in line


@pytest.mark.parametrize("kind", KINDS)
def test_the_preset_picker_names_the_broken_file(kind, settings, tiny_folder, tmp_path):
    folder, name, words = broken_folder(tiny_folder, kind, tmp_path / "model")
    app = make_app(make_settings(settings, tmp_path), str(folder), preset="fp32", start_worker=False)

    async def check(pilot):
        await pilot.pause()
        await pilot.press("f4")
        await until(pilot, lambda: any("can't plan presets" in n for n in app.notices), what="the notice", timeout=30)
        notice = next(n for n in app.notices if "can't plan presets" in n)
        assert f"'{name}'" in notice and words in notice and "\n" not in notice
        assert type(app.screen).__name__ != "PresetScreen"

    run(app, check)


@pytest.fixture(scope="module")
def worker(settings, tmp_path_factory):
    from chatapp.worker_client import WorkerClient

    tmp = tmp_path_factory.mktemp("worker")
    events: queue.Queue = queue.Queue()
    client = WorkerClient(replace(settings, data_dir=tmp / "data"), events.put, log_path=tmp / "worker.log")
    client.start()
    yield client, events
    client.stop()


@pytest.mark.parametrize("preset", ["auto", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_worker_refuses_a_broken_model_in_one_line(kind, preset, worker, tiny_folder, tmp_path):
    """The load the TUI's F4 and model picker ask for: the worker stays up and answers in one line."""
    client, events = worker
    folder, name, words = broken_folder(tiny_folder, kind, tmp_path / "model")
    answer = load_result(client, events, p.Load(str(folder), preset))
    assert isinstance(answer, p.Error), answer
    assert f"'{name}'" in answer.message and words in answer.message and "\n" not in answer.message


def starter_gguf() -> Path:
    from chatapp.catalog import load_catalog
    from chatapp.refs import parse_ref

    return parse_ref("smollm2-135m-local", load_catalog()).path


#: kind -> the file's bytes
BROKEN_GGUF = {
    "empty": lambda: b"",
    "text": lambda: b"hello\n",
    "an unknown version": lambda: b"GGUF" + b"x" * 60,
    "cut short": lambda: starter_gguf().read_bytes()[:4096],
}


@pytest.mark.parametrize("command", ["plan", "ask"])
@pytest.mark.parametrize("kind", list(BROKEN_GGUF))
def test_a_broken_gguf_file_is_one_line_naming_it(kind, command, tmp_path, capsys, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(BROKEN_GGUF[kind]())
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path / "data"))  # conversions go to this test's own folder
    args = ["plan", str(path), "--no-gpu"] if command == "plan" else ["ask", "Hi", "-m", str(path), "-p", "fp32"]
    assert main(args) == 1
    assert f"'{path}'" in one_error_line(capsys)
