"""Downloads (hub_download.py, `chatapp pull`): progress, resuming after a cut or a kill, cancel, disk space, where."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hubserver import HUGE_REPO, header_only, weight_reads

REPO = "TestOrg/SmolLM2-135M-Instruct"


def chatapp(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


def python(env, code: str):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600, env=env
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pull_shows_progress_and_fetches_only_what_loading_needs(hub_server, hub_env, starter_folder):
    out = chatapp(hub_env, "pull", REPO)
    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert (snapshot / "model.safetensors").is_file()
    assert sha256(snapshot / "model.safetensors") == sha256(starter_folder / "model.safetensors")
    assert "100.0%" in out.stderr and "MB/s" in out.stderr or "B/s" in out.stderr
    assert not list(snapshot.glob("*.gguf"))
    # A second pull finds everything in the cache and downloads nothing.
    server, _url = hub_server
    server.requests.clear()
    again = chatapp(hub_env, "pull", REPO)
    assert again.returncode == 0
    assert not any(r.startswith("GET") and "/resolve/" in r for r in server.requests)


def test_a_connection_cut_mid_file_still_completes_byte_identical(hub_server, hub_env, starter_folder):
    server, _url = hub_server
    server.drops = [25_000_000]
    try:
        out = chatapp(hub_env, "pull", REPO)
    finally:
        server.drops = []
    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert sha256(snapshot / "model.safetensors") == sha256(starter_folder / "model.safetensors")
    ranged = [r for r in server.requests if "model.safetensors" in r]
    assert len([r for r in ranged if r.startswith("GET")]) >= 2  # the cut, then the resumed request


def resumed_from(requests: list[str]) -> int:
    """The byte offset the first GET of the weights asked for (0 when it started from the beginning); reads of
    the safetensors header alone, to plan before downloading, are not that."""
    first = next(r for r in weight_reads(requests) if r.split()[1].endswith("model.safetensors") and not header_only(r))
    return int(first.split("Range:bytes=")[1].split("-")[0]) if "Range:" in first else 0


def partial_bytes(hf_home: Path) -> int:
    return sum(p.stat().st_size for p in hf_home.glob("hub/models--*/blobs/*.incomplete"))


def test_a_pull_cut_off_for_good_resumes_on_the_next_pull(hub_server, hub_env, starter_folder):
    server, _url = hub_server
    # A cut mid-file, then a network that stays down for longer than huggingface_hub retries: the pull gives up.
    server.drops = [25_000_000] + [0] * 10
    try:
        failed = chatapp(hub_env, "pull", REPO)
    finally:
        server.drops = []
    assert failed.returncode == 1
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("chatapp: error: the connection to the Hub broke while downloading model.safetensors")
    assert error.endswith("run the pull again to continue") and "Traceback" not in failed.stderr
    kept = partial_bytes(Path(hub_env["HF_HOME"]))
    assert 20_000_000 <= kept <= 25_000_000
    assert_next_pull_continues_from(kept, server, hub_env, starter_folder)


def assert_next_pull_continues_from(kept: int, server, hub_env, starter_folder) -> None:
    server.requests.clear()
    out = chatapp(hub_env, "pull", REPO)
    assert out.returncode == 0, out.stderr
    assert resumed_from(server.requests) == kept
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert sha256(snapshot / "model.safetensors") == sha256(starter_folder / "model.safetensors")
    assert partial_bytes(Path(hub_env["HF_HOME"])) == 0


def test_a_pull_killed_with_sigkill_resumes_on_the_next_pull(hub_server, hub_env, starter_folder):
    server, _url = hub_server
    hf_home = Path(hub_env["HF_HOME"])
    server.block_delay_s = 0.01
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatapp.cli", "pull", REPO],
            env=hub_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while partial_bytes(hf_home) < 2_000_000 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        server.block_delay_s = 0.0
    assert proc.returncode == -signal.SIGKILL
    kept = partial_bytes(hf_home)
    assert kept >= 2_000_000
    assert not list(hf_home.glob("hub/models--*/snapshots/*/model.safetensors"))
    assert_next_pull_continues_from(kept, server, hub_env, starter_folder)


def test_a_corrupt_partial_file_is_caught_by_the_hash_and_deleted(hub_server, hub_env, starter_folder):
    """A leftover partial file that isn't a prefix of the real one must never become the model."""
    hf_home = Path(hub_env["HF_HOME"])
    blobs = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha256(starter_folder / 'model.safetensors')}.incomplete").write_bytes(b"\0" * 1_000_000)
    out = chatapp(hub_env, "pull", REPO)
    assert out.returncode == 1
    assert "model.safetensors arrived corrupted" in out.stderr and "run the pull again" in out.stderr
    assert partial_bytes(hf_home) == 0
    again = chatapp(hub_env, "pull", REPO)
    assert again.returncode == 0, again.stderr
    snapshot = Path(again.stdout.strip().splitlines()[-1])
    assert sha256(snapshot / "model.safetensors") == sha256(starter_folder / "model.safetensors")


def test_cancel_stops_promptly_and_leaves_nothing_taken_for_complete(hub_server, hub_env):
    server, _url = hub_server
    server.block_delay_s = 0.005
    try:
        out = python(
            hub_env,
            f"""
            import threading, json
            from chatapp import hub, hub_download
            cancel = threading.Event()
            seen = []
            def progress(p):
                seen.append(p.done_bytes)
                if p.done_bytes > 2_000_000:
                    cancel.set()
            try:
                hub_download.download("{REPO}", progress=progress, cancel=cancel)
                print("finished")
            except hub_download.DownloadCancelled as exc:
                print("cancelled:", exc)
            print(json.dumps({{"max_seen": max(seen), "local": [m.repo_id for m in hub.list_local()]}}))
            """,
        )
    finally:
        server.block_delay_s = 0.0
    assert out.returncode == 0, out.stderr
    assert "cancelled: download stopped" in out.stdout
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["max_seen"] < 100_000_000
    # No snapshot of the model file: loading it now fails cleanly instead of using half a file.
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    ask = chatapp(offline, "ask", "hi", "--model", REPO)
    assert ask.returncode == 1 and "not downloaded" in ask.stderr
    # The next pull continues from what arrived instead of starting over, and completes.
    server.requests.clear()
    pulled = chatapp(hub_env, "pull", REPO)
    assert pulled.returncode == 0, pulled.stderr
    assert resumed_from(server.requests) > 2_000_000


def test_not_enough_disk_is_refused_before_downloading(hub_server, hub_env):
    server, _url = hub_server
    server.requests.clear()
    out = python(
        hub_env,
        f"""
        from chatapp import hub, hub_download
        try:
            hub_download.download("{REPO}", free_bytes=lambda path: 1_000_000)
        except hub.HubError as exc:
            print(exc)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("not enough disk space in ")
    assert "GB missing" in out.stdout
    assert not any("/resolve/" in r and r.startswith("GET") for r in server.requests)


def test_the_hub_cache_setting_decides_where_models_go(hub_env, tmp_path):
    config = tmp_path / "cfg"
    config.mkdir()
    cache = tmp_path / "my-hub-cache"
    (config / "config.toml").write_text(f"hub_cache = {json.dumps(str(cache))}\n")
    out = chatapp({**hub_env, "CHATAPP_CONFIG_DIR": str(config)}, "pull", "TestOrg/tiny-llama")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip().splitlines()[-1]).is_relative_to(cache)
    assert list(cache.glob("models--TestOrg--tiny-llama/snapshots/*/config.json"))


def test_ask_pulls_a_hub_model_then_answers(hub_env):
    out = chatapp(
        hub_env,
        "ask",
        "What is the capital of France?",
        "--model",
        "TestOrg/SmolLM2-135M-Instruct",
        "--preset",
        "fp32",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "chatapp: downloading TestOrg/SmolLM2-135M-Instruct [" in out.stderr and "100.0%" in out.stderr


TINY = "TestOrg/tiny-llama"


@pytest.mark.parametrize(
    "fetched_before",
    [
        ("config.json",),
        ("config.json", "tokenizer.json", "tokenizer_config.json"),
        ("config.json", "model.safetensors"),
    ],
    ids=["config-only", "no-weights", "no-tokenizer"],
)
def test_a_snapshot_another_tool_filled_in_part_is_completed_by_pull(hub_env, tiny_folder, fetched_before):
    """`chatapp plan` (or any HF tool) leaves a snapshot folder that huggingface_hub returns as if complete."""
    fetched = python(
        hub_env,
        f"""
        from huggingface_hub import hf_hub_download
        for name in {list(fetched_before)!r}:
            hf_hub_download("{TINY}", name)
        """,
    )
    assert fetched.returncode == 0, fetched.stderr
    listed = chatapp(hub_env, "models", "--local", "--json")
    assert listed.returncode == 0, listed.stderr
    assert TINY not in [m["repo"] for m in json.loads(listed.stdout)]

    out = chatapp(hub_env, "pull", TINY)
    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert sha256(snapshot / name) == sha256(tiny_folder / name)
    listed = json.loads(chatapp(hub_env, "models", "--local", "--json").stdout)
    assert TINY in [m["repo"] for m in listed]


def test_plan_then_pull_gives_a_complete_model(hub_env):
    planned = chatapp(hub_env, "plan", TINY, "--no-gpu", "--ram", "8GiB")
    assert planned.returncode == 0, planned.stderr
    out = chatapp(hub_env, "pull", TINY)
    assert out.returncode == 0, out.stderr
    assert (Path(out.stdout.strip().splitlines()[-1]) / "model.safetensors").is_file()
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    ask = chatapp(offline, "ask", "hi", "--model", TINY, "--preset", "fp32", "--max-new-tokens", "2")
    assert ask.returncode == 0, ask.stderr


def crawling(server, *, after: int = 2_000_000, rate: int = 2_000):
    """The server sends `after` bytes of each file fast, then 2 kB/s: a link that slows to a crawl."""
    server.fast_bytes, server.bytes_per_s = after, rate


def test_ctrl_c_stops_a_pull_from_a_crawling_server_at_once_and_keeps_what_arrived(hub_server, hub_env, starter_folder):
    server, _url = hub_server
    hf_home = Path(hub_env["HF_HOME"])
    crawling(server)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatapp.cli", "pull", REPO],
            env=hub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while partial_bytes(hf_home) < 1_000_000 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # into the crawl
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=5)  # "within a second" on an idle machine; CI machines are busy
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("Ctrl+C did not stop the pull within 5 s") from None
    finally:
        server.fast_bytes, server.bytes_per_s = 0, 0
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("chatapp: download stopped with ") and "kept" in last, err
    assert "Traceback" not in err
    kept = partial_bytes(hf_home)
    assert kept >= 1_000_000
    assert_next_pull_continues_from(kept, server, hub_env, starter_folder)


PICKLED = "TestOrg/pickle-llama"


@pytest.fixture
def pickle_repo(hub_server, tiny_folder, tmp_path):
    """tiny-llama with its weights as pytorch_model.bin only, as many older Hub repos are."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickle-llama"
    folder.mkdir()
    for path in tiny_folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    torch.save(load_file(tiny_folder / "model.safetensors"), folder / "pytorch_model.bin")
    server, _url = hub_server
    server.add(PICKLED, folder)
    yield server
    del server.repos[PICKLED]


def pickle_refusal(stderr: str) -> bool:
    return stderr.strip().splitlines()[-1] == (
        f"chatapp: error: '{PICKLED}' has only pickle weights (pytorch_model.bin), which can run code when loaded; "
        "pass --allow-pickle if you trust it"
    )


@pytest.mark.parametrize("command", [["pull", PICKLED], ["ask", "hi", "--model", PICKLED]], ids=["pull", "ask"])
def test_a_pickle_only_repo_is_refused_naming_allow_pickle_before_any_download(pickle_repo, hub_env, command):
    pickle_repo.requests.clear()
    out = chatapp(hub_env, *command)
    assert out.returncode == 1 and pickle_refusal(out.stderr), out.stderr
    assert not any(r.startswith("GET") and "/resolve/" in r for r in pickle_repo.requests)


def test_allow_pickle_pulls_and_loads_a_pickle_only_repo(pickle_repo, hub_env):
    out = chatapp(hub_env, "pull", PICKLED, "--allow-pickle")
    assert out.returncode == 0, out.stderr
    assert (Path(out.stdout.strip().splitlines()[-1]) / "pytorch_model.bin").is_file()
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    refused = chatapp(offline, "ask", "hi", "--model", PICKLED)
    assert refused.returncode == 1 and pickle_refusal(refused.stderr), refused.stderr
    ask = ["ask", "hi", "--model", PICKLED, "--allow-pickle", "--preset", "fp32", "--max-new-tokens", "2"]
    allowed = chatapp(offline, *ask)
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("command", [["pull", HUGE_REPO], ["ask", "hi", "--model", HUGE_REPO]], ids=["pull", "ask"])
def test_a_model_that_can_never_fit_is_refused_before_its_weights_are_fetched(huge_repo, hub_env, command):
    out = chatapp(hub_env, *command)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"chatapp: error: '{HUGE_REPO}' fits no preset on this machine")
    assert "nothing fits" in last and "nothing was downloaded" in last, last
    if command[0] == "pull":
        assert last.endswith("(--force downloads it anyway)")
    reads = weight_reads(huge_repo.requests)
    assert reads and all(header_only(r) for r in reads), reads


def test_pull_force_downloads_what_cannot_fit(huge_repo, hub_env):
    out = chatapp(hub_env, "pull", HUGE_REPO, "--force")
    assert out.returncode == 0, out.stderr
    assert not all(header_only(r) for r in weight_reads(huge_repo.requests))
    assert (Path(out.stdout.strip().splitlines()[-1]) / "model.safetensors").is_file()
