"""A preset named by hand goes through the planner too (issue 12, bad item 9): one that can't fit is refused in one
line with what it needs and what is here, in `ask`, `repl`, `bench` and the worker's load (which the TUI's F4 and
its start use), unless the user forces it (--force, or F4's 'Load anyway')."""

from __future__ import annotations

import json
import queue
import resource
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from uihelpers import make_app, make_settings, run, until
from workerhelpers import load_result

from chatapp import protocol as p
from chatapp.cli import main

#: Config sizes far beyond any machine; each shows in the planner's weights, KV cache or activations.
ABSURD = {
    "10^9 layers": {"num_hidden_layers": 10**9},
    "10^9 hidden_size": {"hidden_size": 10**9},
    "10^12 intermediate_size": {"intermediate_size": 10**12},
    "10^12 vocab_size": {"vocab_size": 10**12},
    "10^9 kv heads": {"num_key_value_heads": 10**9},
}
PRESETS = ["bf16", "fp16", "fp32", "int8", "nf4"]


def edited_folder(tiny_folder: Path, out: Path, **changes) -> Path:
    """tiny_folder with config.json changed (the other files are links)."""
    out.mkdir(parents=True)
    for path in tiny_folder.iterdir():
        if path.name != "config.json":
            (out / path.name).symlink_to(path)
    config = json.loads((tiny_folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **changes}))
    return out


@contextmanager
def memory_ceiling(extra: int = 1024**3):
    """An address-space limit a little above what this process maps now (processes it starts inherit it): were a
    refusal missing, the load fails with MemoryError instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(
        next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize")).split()[
            1
        ]
    )
    resource.setrlimit(resource.RLIMIT_AS, (mapped * 1024 + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("chatapp: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.mark.parametrize("command", ["ask", "repl", "bench"])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", list(ABSURD))
def test_a_named_preset_that_cant_fit_is_refused_in_one_line(kind, preset, command, tiny_folder, tmp_path, capsys):
    folder = edited_folder(tiny_folder, tmp_path / "model", **ABSURD[kind])
    args = [command, *(["Hello"] if command == "ask" else []), "--model", str(folder), "--preset", preset]
    with memory_ceiling():
        try:
            code = main(args)
        except MemoryError:
            pytest.fail(f"{preset} started allocating {kind} instead of refusing")
    assert code == 1
    line = one_error_line(capsys)
    assert f"won't fit with preset {preset}: {preset} needs " in line and " usable; force it" in line
    assert "--force" in line


def test_force_loads_a_preset_the_planner_says_wont_fit(tiny_folder, tmp_path, capsys, monkeypatch):
    """The context cap makes the plan need terabytes of KV cache; the cache only grows as the chat does, so a forced
    load works: the planner's verdict is advice the user may overrule."""
    folder = edited_folder(tiny_folder, tmp_path / "model", max_position_embeddings=10**9)
    monkeypatch.setenv("CHATAPP_CONTEXT_CAP", str(10**9))
    args = ["ask", "Hello", "--model", str(folder), "--preset", "fp32", "--max-new-tokens", "2"]
    assert main(args) == 1
    assert "won't fit with preset fp32: fp32 needs " in one_error_line(capsys)
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert "fp32 won't fit (fp32 needs " in err and "loading it anyway, as forced" in err


@pytest.fixture(scope="module")
def worker(settings, tmp_path_factory):
    from chatapp.worker_client import WorkerClient

    tmp = tmp_path_factory.mktemp("worker")
    events: queue.Queue = queue.Queue()
    client = WorkerClient(replace(settings, data_dir=tmp / "data"), events.put, log_path=tmp / "worker.log")
    with memory_ceiling():  # the worker inherits it
        client.start()
    yield client, events
    client.stop()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", list(ABSURD))
def test_the_worker_refuses_a_named_preset_that_cant_fit(kind, preset, worker, tiny_folder, tmp_path):
    """What the TUI's start with --preset and F4's switch ask for: one line back, the worker still up."""
    client, events = worker
    folder = edited_folder(tiny_folder, tmp_path / "model", **ABSURD[kind])
    answer = load_result(client, events, p.Load(str(folder), preset))
    assert isinstance(answer, p.Error), answer
    assert f"won't fit with preset {preset}: {preset} needs " in answer.message and "\n" not in answer.message
    # F4 passes the context and attention it planned: the worker plans again all the same.
    answer = load_result(client, events, p.Load(str(folder), preset, context_tokens=2048, attn_implementation="sdpa"))
    assert isinstance(answer, p.Error) and "won't fit" in answer.message, answer
    assert client.alive


def test_the_worker_loads_a_forced_preset(worker, tiny_folder, tmp_path):
    client, events = worker
    folder = edited_folder(tiny_folder, tmp_path / "model", max_position_embeddings=10**9)
    refused = load_result(client, events, p.Load(str(folder), "fp32", context_tokens=10**9))
    assert isinstance(refused, p.Error) and "won't fit with preset fp32" in refused.message
    loaded = load_result(client, events, p.Load(str(folder), "fp32", context_tokens=10**9, force=True))
    assert isinstance(loaded, p.Loaded) and any("loading it anyway, as forced" in n for n in loaded.notes), loaded


def test_load_anyway_in_the_preset_picker_forces_the_load(settings, tiny_folder, tmp_path):
    from chatapp.facts import facts_from_folder
    from chatapp.hardware import CpuInfo, Hardware
    from chatapp.planner import SAFETY_MARGIN, estimate

    facts = facts_from_folder(tiny_folder)
    need = {
        preset: estimate(facts, preset, facts.max_context, device_type="cpu", bf16_supported=False).total_bytes
        for preset in ("fp32", "nf4")
    }
    ram = int((need["fp32"] + need["nf4"]) / 2 / (1 - SAFETY_MARGIN))  # nf4 fits, fp32 doesn't
    tight = Hardware(cpu=CpuInfo(ram_total_bytes=ram, ram_available_bytes=ram, flags=frozenset()))
    app = make_app(make_settings(settings, tmp_path), str(tiny_folder), preset="nf4", fake=True, hardware=tight)

    async def check(pilot):
        await until(pilot, lambda: app.backend.loaded is not None, what="the first load")
        await pilot.press("f4")
        await until(pilot, lambda: type(app.screen).__name__ == "PresetScreen", what="the preset picker")
        app.screen.query_one("#presets").highlighted = 3  # fp32
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", what="the confirmation")
        await pilot.click("#yes")
        loads = lambda: [r for r in app.backend.client.received if isinstance(r, p.Load)]  # noqa: E731
        await until(pilot, lambda: len(loads()) == 2, what="the forced load")
        assert (loads()[-1].preset, loads()[-1].force) == ("fp32", True)
        assert not loads()[0].force  # the start's load is not forced
        await until(pilot, lambda: app.backend.loaded is not None, what="the forced load to finish")
        assert app.backend.force

    run(app, check)


@pytest.mark.parametrize("planned", [True, False], ids=["with a plan", "forced past no plan"])
def test_a_load_the_gpu_runs_out_of_memory_for_is_one_line_with_the_need(planned, tiny_folder, settings, monkeypatch):
    """torch's CUDA out-of-memory message is one long paragraph about this process's memory; the user gets one
    line: the model, the preset, what it needs (the plan's numbers, else the size torch couldn't allocate), and
    what to do. The GPU itself ran it in bench/gpu_check.py's oom step; here torch's error is raised in its place."""
    import transformers

    from chatapp.engine import loader
    from chatapp.errors import ChatappError, ModelLoadError

    torch_says = (
        "CUDA out of memory. Tried to allocate 29.93 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
        "3.95 GiB is free. Including non-PyTorch memory, this process has 135.2 GiB memory in use. Of the "
        "allocated memory 134.2 GiB is allocated by PyTorch, and 1.1 MiB is reserved by PyTorch but unallocated."
    )

    def runs_out(*args, **kwargs):
        import torch

        raise torch.OutOfMemoryError(torch_says)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", runs_out)
    if not planned:

        def no_plan(*args, **kwargs):
            raise ChatappError("no plan for this one")

        monkeypatch.setattr(loader, "_plan", no_plan)
    with pytest.raises(ModelLoadError) as caught:
        loader.load_model(str(tiny_folder), "fp32", settings=settings, device="cpu", force=True)
    line = str(caught.value)
    assert "\n" not in line and len(line) < 300, line
    assert line.startswith(f"'{tiny_folder}' ran out of GPU memory loading fp32 (")
    assert line.endswith("; free the GPU or pick a smaller preset")
    if planned:
        assert "fp32 needs " in line and " usable)" in line
    else:
        assert "(Tried to allocate 29.93 GiB)" in line
