"""hub.py against the tests' Hub server (HF_ENDPOINT): facts from headers only, and one line for each Hub error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def chatapp(env, *args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args], input=stdin, capture_output=True, text=True, timeout=600, env=env
    )


def test_plan_reads_hub_facts_from_headers_only(hub_server, hub_env):
    server, _url = hub_server
    server.requests.clear()
    out = chatapp(hub_env, "plan", "TestOrg/SmolLM2-135M-Instruct", "--no-gpu", "--ram", "8GiB", "--json")
    assert out.returncode == 0, out.stderr
    model = json.loads(out.stdout)["model"]
    assert (model["params"], model["layers"], model["kv_heads"], model["max_context"]) == (134_515_008, 30, 3, 8192)
    # Only config.json and the safetensors header: no weight bytes beyond the header's range.
    gets = [r for r in server.requests if r.startswith("GET") and "/resolve/" in r]
    assert any(r.endswith("config.json") for r in gets)
    assert not any("tokenizer" in r for r in gets)


def test_gated_repo_is_one_clear_line(hub_env):
    out = chatapp(hub_env, "ask", "hi", "--model", "TestOrg/gated-llama")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("chatapp: error: 'TestOrg/gated-llama' is gated: accept its license at ")
    assert "hf auth login" in last and "HF_TOKEN" in last
    assert "Traceback" not in out.stderr


def test_unknown_hub_repo_is_one_clear_line(hub_env):
    out = chatapp(hub_env, "ask", "hi", "--model", "TestOrg/no-such-model")
    assert out.returncode == 1
    assert "unknown model 'TestOrg/no-such-model': no such repo on the Hub" in out.stderr


def test_pull_of_a_gated_repo_is_one_line_with_license_and_login(hub_env):
    out = chatapp(hub_env, "pull", "TestOrg/gated-llama")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "chatapp: error: 'TestOrg/gated-llama' is gated: accept its license at "
        "https://huggingface.co/TestOrg/gated-llama, then log in with `hf auth login` or set HF_TOKEN"
    )


def test_a_bare_403_still_says_how_to_get_access(hub_env):
    out = chatapp(hub_env, "pull", "OtherOrg/forbidden")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    line = out.stderr.strip()
    assert line.startswith("chatapp: error: the Hub refused access to 'OtherOrg/forbidden' (HTTP 403)")
    assert "https://huggingface.co/OtherOrg/forbidden" in line and "hf auth login" in line


def test_offline_mode_says_so_in_one_line(hub_env):
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    out = chatapp(offline, "pull", "TestOrg/tiny-llama")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "chatapp: error: 'TestOrg/tiny-llama' is not downloaded and the Hub can't be reached "
        "(offline, or HF_HUB_OFFLINE=1)"
    )


@pytest.mark.parametrize("repo", ["TestOrg/tiny-llama", "TestOrg/gated-llama", "TestOrg/no-such-model"])
@pytest.mark.parametrize("source", ["env", "saved login"])
def test_a_rejected_token_is_named_with_where_it_came_from(hub_server, hub_env, repo, source):
    """The Hub refuses a token it doesn't know with a 401 on every route: that is what to say, whatever the repo."""
    server, _url = hub_server
    env = {k: v for k, v in hub_env.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    if source == "env":
        env["HF_TOKEN"] = "hf_not_a_real_token"
        where = "the HF_TOKEN environment variable"
    else:
        token_file = Path(env["HF_HOME"]) / "token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text("hf_not_a_real_token")
        where = f"the saved login ({token_file})"
    server.valid_tokens = {"hf_the_good_one"}
    try:
        out = chatapp(env, "pull", repo)
    finally:
        server.valid_tokens = None
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"chatapp: error: the Hub rejected the token from {where} (HTTP 401) while asking about '{repo}': "
        "it is invalid or expired; set a valid one, unset it, or log in again with `hf auth login`"
    )


def test_a_good_token_still_opens_a_gated_repo(hub_server, hub_env):
    server, _url = hub_server
    server.valid_tokens = {"hf_the_good_one"}
    try:
        out = chatapp({**hub_env, "HF_TOKEN": "hf_the_good_one"}, "pull", "TestOrg/gated-llama")
    finally:
        server.valid_tokens = None
    assert out.returncode == 0, out.stderr
