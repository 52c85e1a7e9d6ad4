"""Downloads, listing and deletion through the real huggingface_hub client against the tests' Hub server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = "TestOrg/SmolLM2-135M-Instruct"


def chatapp(env, *args):
    return subprocess.run([sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def python(env, code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env=env)


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
    server.drop_after_bytes, server.drops_left = 5_000_000, 1
    try:
        out = chatapp(hub_env, "pull", REPO)
    finally:
        server.drop_after_bytes, server.drops_left = None, 0
    assert out.returncode == 0, out.stderr
    snapshot = Path(out.stdout.strip().splitlines()[-1])
    assert sha256(snapshot / "model.safetensors") == sha256(starter_folder / "model.safetensors")
    ranged = [r for r in server.requests if "model.safetensors" in r]
    assert len([r for r in ranged if r.startswith("GET")]) >= 2  # the cut, then the resumed request


def test_cancel_stops_promptly_and_leaves_nothing_taken_for_complete(hub_server, hub_env):
    server, _url = hub_server
    server.block_delay_s = 0.005
    try:
        out = python(hub_env, f"""
            import threading, json
            from chatapp import hub
            cancel = threading.Event()
            seen = []
            def progress(p):
                seen.append(p.done_bytes)
                if p.done_bytes > 2_000_000:
                    cancel.set()
            try:
                hub.download("{REPO}", progress=progress, cancel=cancel)
                print("finished")
            except hub.DownloadCancelled as exc:
                print("cancelled:", exc)
            print(json.dumps({{"max_seen": max(seen), "local": [m.repo_id for m in hub.list_local()]}}))
            """)
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
    # And the next pull completes.
    pulled = chatapp(hub_env, "pull", REPO)
    assert pulled.returncode == 0, pulled.stderr


def test_not_enough_disk_is_refused_before_downloading(hub_server, hub_env):
    server, _url = hub_server
    server.requests.clear()
    out = python(hub_env, f"""
        from chatapp import hub
        try:
            hub.download("{REPO}", free_bytes=lambda path: 1_000_000)
        except hub.HubError as exc:
            print(exc)
        """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("not enough disk space in ")
    assert "GB missing" in out.stdout
    assert not any("/resolve/" in r and r.startswith("GET") for r in server.requests)


def test_models_local_and_rm_report_bytes(hub_env):
    pulled = chatapp(hub_env, "pull", REPO)
    assert pulled.returncode == 0, pulled.stderr
    listing = chatapp(hub_env, "models", "--local", "--json")
    assert listing.returncode == 0, listing.stderr
    listed = json.loads(listing.stdout)
    entry = next(m for m in listed if m["repo"] == REPO)
    assert entry["size_bytes"] > 250_000_000
    out = chatapp(hub_env, "rm", REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"deleted {REPO}: {entry['size_bytes'] / 1e6:,.1f} MB freed"
    assert json.loads(chatapp(hub_env, "models", "--local", "--json").stdout) == []
    again = chatapp(hub_env, "rm", REPO)
    assert again.returncode == 1 and "is not downloaded" in again.stderr


def test_catalog_listing_marks_the_bundled_starter():
    import os

    out = chatapp(os.environ.copy(), "models", "--json")
    rows = {r["key"]: r for r in json.loads(out.stdout) if r["key"]}
    assert rows["smollm2-135m-local"]["downloaded"] is True
    assert rows["llama-3.1-8b"]["gated"] is True
    # Each catalog row carries the planner's verdict for this machine: the preset auto tries first, then nf4.
    assert all(r["fit"] and "nf4 " in r["fit"] for r in rows.values())
    assert "✓" in rows["smollm2-135m-local"]["fit"]
    assert "✗" in rows["llama-3.1-70b"]["fit"]


def test_search(hub_env):
    out = chatapp(hub_env, "search", "llama", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["repo_id"] for r in results] == ["TestOrg/tiny-llama", "TestOrg/gated-llama"]
    assert results[1]["gated"] is True and results[0]["params"] > 0
    assert results[0]["fit"].endswith("(weights)") and "bf16 ✓" in results[0]["fit"]
    table = chatapp(hub_env, "search", "nothing-like-this")
    assert "no text-generation models match" in table.stdout


def test_offline_mode_says_so_in_one_line(hub_env):
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    out = chatapp(offline, "pull", "TestOrg/tiny-llama")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "chatapp: error: 'TestOrg/tiny-llama' is not downloaded and the Hub can't be reached (offline, or HF_HUB_OFFLINE=1)"
    )
