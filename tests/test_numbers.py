"""Nonsense numbers on the command line are one line each, and no plan shows a negative budget (issue 12, weak item
"nonsense numbers"). Negative sizes in a config.json or a models.toml entry are in test_broken_models.py."""

from __future__ import annotations

import json

import pytest

from chatapp.cli import main

#: (arguments, the flag the error names): counts of zero or less, and words where a count belongs.
BAD_COUNTS = [
    (["plan", "smollm2-135m-local", "--context", "-5"], "--context"),
    (["plan", "smollm2-135m-local", "--context", "0"], "--context"),
    (["plan", "smollm2-135m-local", "--context", "lots"], "--context"),
    (["ask", "Hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["repl", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["bench", "--turns", "0"], "--turns"),
    (["bench", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["bench", "--user-tokens", "0"], "--user-tokens"),
    (["bench", "--doc-tokens", "-1"], "--doc-tokens"),
    (["search", "llama", "--limit", "0"], "--limit"),
    (["cache", "clear", "--chat", "-2"], "--chat"),
]


@pytest.mark.parametrize("args, flag", BAD_COUNTS, ids=[" ".join(a[-2:]) for a, _ in BAD_COUNTS])
def test_a_count_of_zero_or_less_is_one_line(args, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"error: argument {flag}: " in lines[0], err


#: (arguments, the size the error quotes)
BAD_SIZES = [
    (["--gpu", "0GiB"], "0GiB"),
    (["--gpu", "0"], "0"),
    (["--gpu", "T4:0GiB:7.5"], "0GiB"),
    (["--gpu", "0.1B"], "0.1B"),
    (["--gpu", "24GiB", "--gpu", "0MiB"], "0MiB"),
    (["--ram", "0GB"], "0GB"),
]


@pytest.mark.parametrize("sizes, quoted", BAD_SIZES, ids=[" ".join(a) for a, _ in BAD_SIZES])
def test_a_memory_size_of_zero_is_one_line(sizes, quoted, capsys):
    assert main(["plan", "llama-3.1-8b", *sizes]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"chatapp: error: '{quoted}' is no memory at all: give a size above 0, like 24GiB"]


@pytest.mark.parametrize("gpus", [["1B"], ["100MiB"], ["500MiB"], ["100MiB", "300MiB"]], ids=" ".join)
def test_a_gpu_smaller_than_its_cuda_context_gets_no_negative_budget(gpus, capsys):
    args = ["plan", "llama-3.1-8b", *(a for g in gpus for a in ("--gpu", g)), "--ram", "64GiB"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert all(v >= 0 for v in (plan["choice"]["max_memory"] or {}).values()), plan["choice"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "(-" not in text and " -0." not in text, text
