"""The command line, run as a user runs it: a subprocess, real arguments, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys



def chatapp(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_ask_reads_stdin_and_streams_a_reply(tiny_folder):
    out = chatapp("ask", "--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "5", "--stats",
                  stdin="Hello?\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "prefilled" in out.stderr and "generated" in out.stderr


def test_unknown_model_is_one_line_and_nonzero():
    out = chatapp("ask", "hi", "--model", "no-such-model")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("chatapp: error: unknown model 'no-such-model'")
    assert "Traceback" not in out.stderr


def test_ask_without_prompt_on_empty_stdin():
    out = chatapp("ask", "--model", "no-such-model", stdin="")
    assert out.returncode == 1
    assert "the prompt is empty" in out.stderr


def test_repl_commands(tiny_folder):
    script = "Hello\n/regen\n/reset\nAgain\n/exit\n"
    out = chatapp("repl", "--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "4", "--stats",
                  stdin=script)
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stderr.splitlines() if "prefilled" in line]
    assert len(stats) == 3
    assert "prefilled 1," in stats[1]  # /regen re-runs only the last prompt token
    assert "conversation reset" in out.stderr


def test_bench_json_contract(tiny_folder):
    out = chatapp("bench", "--model", str(tiny_folder), "--preset", "fp32", "--turns", "3",
                  "--max-new-tokens", "6", "--user-tokens", "20", "--doc-tokens", "200", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("model", "preset", "device", "cached", "naive", "identical_outputs", "raw_generate_tok_s", "app_tok_s"):
        assert key in result
    assert result["identical_outputs"] is True
    fields = {"turn", "prompt_tokens", "prefilled_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s",
              "cache_tokens", "finish_reason"}
    assert all(fields <= set(turn) for turn in result["cached"] + result["naive"])
    assert [t["turn"] for t in result["cached"]] == [1, 2, 3]
    cached, naive = result["cached"], result["naive"]
    assert cached[0]["prompt_tokens"] > 200
    assert all(c["prefilled_tokens"] < 60 for c in cached[1:])
    assert all(n["prefilled_tokens"] == n["prompt_tokens"] for n in naive)
    assert [c["prompt_tokens"] for c in cached] == [n["prompt_tokens"] for n in naive]


def test_bench_table(tiny_folder):
    out = chatapp("bench", "--model", str(tiny_folder), "--preset", "fp32", "--turns", "2",
                  "--max-new-tokens", "4", "--user-tokens", "10", "--doc-tokens", "0")
    assert out.returncode == 0, out.stderr
    assert "identical outputs: True" in out.stdout
    assert "whole conversation: cached" in out.stdout
