"""`chatapp models`, `rm` and `search` (cli_hub.py) against the tests' Hub server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from chatapp.hardware import detect
from chatapp.planner import auto_ladder

REPO = "TestOrg/SmolLM2-135M-Instruct"


def chatapp(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


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
    out = chatapp(os.environ.copy(), "models", "--json")
    rows = {r["key"]: r for r in json.loads(out.stdout) if r["key"]}
    assert rows["smollm2-135m-local"]["downloaded"] is True
    assert rows["llama-3.1-8b"]["gated"] is True
    # Each catalog row carries the planner's verdict for this machine: the preset auto tries first, and nf4
    # where that one doesn't fit.
    fast = auto_ladder(detect())[0]
    assert all(r["fit"] and r["fit"].startswith(f"{fast} ") for r in rows.values())
    assert all("nf4 " in r["fit"] for r in rows.values() if r["fit"].startswith(f"{fast} ✗"))
    assert "✓" in rows["smollm2-135m-local"]["fit"]
    assert "✗" in rows["llama-3.1-70b"]["fit"]


def test_search(hub_env):
    out = chatapp(hub_env, "search", "llama", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["repo_id"] for r in results] == ["TestOrg/tiny-llama", "TestOrg/gated-llama"]
    assert results[1]["gated"] is True and results[0]["params"] > 0
    fast = auto_ladder(detect())[0]  # the preset auto tries first on this machine
    assert results[0]["fit"].endswith("(weights)") and results[0]["fit"].startswith(f"{fast} ✓")
    table = chatapp(hub_env, "search", "nothing-like-this")
    assert "no text-generation models match" in table.stdout
