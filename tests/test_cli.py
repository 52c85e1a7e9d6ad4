"""The command line, run as a user runs it: a subprocess, real arguments, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def chatapp(*args: str, stdin: str | None = None, timeout: int = 600, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", "chatapp.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_ask_reads_stdin_and_streams_a_reply(tiny_folder):
    out = chatapp(
        "ask", "--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "5", "--stats", stdin="Hello?\n"
    )
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
    out = chatapp(
        "repl", "--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "4", "--stats", stdin=script
    )
    assert out.returncode == 0, out.stderr
    stats = [line for line in out.stderr.splitlines() if "prefilled" in line]
    assert len(stats) == 3
    assert "prefilled 1," in stats[1]  # /regen re-runs only the last prompt token
    assert "conversation reset" in out.stderr


# -- chatapp plan ------------------------------------------------------------------------------


def test_plan_cli_starter_on_a_cpu():
    out = chatapp("plan", "smollm2-135m-local", "--no-gpu", "--ram", "16GiB", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["choice"]["preset"] in ("fp32", "bf16")
    assert result["choice"]["device_map"] == "cpu"
    assert result["hardware"]["gpus"] == []
    table = chatapp("plan", "llama-3.1-8b", "--gpu", "24GiB", "--context", "8192")
    assert "choice: bf16 at 8,192 tokens on cuda:0" in table.stdout
    assert "preset |  weights | KV cache | overhead |    total | fits on" in table.stdout


def test_plan_cli_bad_input_is_one_line():
    out = chatapp("plan", "llama-3.1-8b", "--gpu", "lots")
    assert out.returncode == 1
    assert out.stderr.strip() == "chatapp: error: 'lots' is not a size like 24GiB, 12GB or 8192MiB"
    out = chatapp("plan", "no-such-model")
    assert out.returncode == 1 and "unknown model" in out.stderr and "Traceback" not in out.stderr


def test_an_empty_model_name_or_a_bad_repo_id_is_one_line_and_exit_1():
    for model, expected in (("", "no model named"), ("Org/name-", "is not a valid Hub repo id")):
        out = chatapp("ask", "--model", model, "Hello")
        assert out.returncode == 1 and expected in out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`chatapp plan ... | head`: no BrokenPipeError traceback, the status a shell gives such a tool."""
    for args in (["models"], ["plan", "smollm2-135m-local"], ["plan", "smollm2-135m-local", "--json"]):
        process = subprocess.Popen(
            [sys.executable, "-m", "chatapp.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        process.stdout.close()  # the reader is gone before a line is written
        err = process.stderr.read().decode()
        assert process.wait(timeout=120) == 141 and "Traceback" not in err, err


# -- input that is not UTF-8 ---------------------------------------------------------------------

NOT_UTF8 = [b"caf\xe9", b"\xff\xfe", b"half \xe2\x82", b"\xc0\xaf overlong"]


def _run_bytes(args: list[bytes], stdin: bytes, locale: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": locale}
    return subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"chatapp.cli", *args], input=stdin, capture_output=True, env=env
    )


@pytest.mark.parametrize("bad", NOT_UTF8)
def test_every_byte_that_is_not_utf8_becomes_a_replacement_character(bad, capsys):
    from chatapp.cli import _as_text

    text = _as_text(os.fsdecode(b"hello " + bad), "the prompt")  # how Python hands such bytes over
    assert text == (b"hello " + bad).decode("utf-8", "replace")
    assert capsys.readouterr().err.count("the prompt is not valid UTF-8") == 1


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_a_prompt_that_is_not_utf8_is_answered_on_stdin_and_as_arguments(tiny_folder, locale):
    model = [b"--model", os.fsencode(tiny_folder), b"--preset", b"fp32", b"--max-new-tokens", b"2"]
    bad = b" ".join(NOT_UTF8)
    on_stdin = _run_bytes([b"ask", *model], b"hello " + bad + b"\n", locale)
    as_arg = _run_bytes([b"ask", b"hello " + bad, *model, b"--system", bad], b"", locale)
    for out in (on_stdin, as_arg):
        err = out.stderr.decode("utf-8", "replace")
        assert out.returncode == 0, err
        assert "Traceback" not in err
        assert "the prompt is not valid UTF-8" in err
    assert "the system prompt is not valid UTF-8" in as_arg.stderr.decode("utf-8", "replace")


def test_a_repl_line_that_is_not_utf8_keeps_the_conversation(tiny_folder):
    script = b"Hello\nsay \xff\xfe\n/regen\n/exit\n"
    model = [b"--model", os.fsencode(tiny_folder), b"--preset", b"fp32", b"--max-new-tokens", b"3", b"--stats"]
    out = _run_bytes([b"repl", *model], script, "C.UTF-8")
    err = out.stderr.decode()
    assert out.returncode == 0, err
    assert "Traceback" not in err
    assert "that line is not valid UTF-8" in err
    stats = [line for line in err.splitlines() if "prefilled" in line]
    assert len(stats) == 3  # the bad line was answered, and /regen still had the conversation
    assert "prefilled 1," in stats[2]


def test_sampling_flags_are_checked_before_anything_loads(tiny_folder):
    out = chatapp("ask", "hi", "--model", "no-such-model", "--top-k", "2.5")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "chatapp ask: error: argument --top-k: must be a whole number, got '2.5' (`chatapp ask -h` lists the options)"
    )
    seeded = ("ask", "Hello?", "--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "6")
    flags = ("--temperature", "1", "--top-k", "30", "--min-p", "0.01", "--repetition-penalty", "1.2", "--seed", "5")
    first, again = chatapp(*seeded, *flags), chatapp(*seeded, *flags)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout.strip()


def test_a_persona_gives_its_system_prompt_and_sampling_and_a_bad_one_is_one_line(tiny_folder, tmp_path):
    env = {"CHATAPP_CONFIG_DIR": str(tmp_path)}
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "greedy.toml").write_text('name = "Greedy"\nsystem_prompt = "Be terse."\ntemperature = 0\n')
    (folder / "broken.toml").write_text('name = "Broken"\nmin_p = 7\n')
    model = ("--model", str(tiny_folder), "--preset", "fp32", "--max-new-tokens", "6")
    # temperature 0 from the persona: two runs give the same reply, which is the --system + --temperature one.
    first = chatapp("ask", "Hello?", *model, "--persona", "greedy", env=env)
    assert first.returncode == 0, first.stderr
    plain = chatapp("ask", "Hello?", *model, "--system", "Be terse.", "--temperature", "0", env=env)
    assert first.stdout == plain.stdout and first.stdout.strip()
    unknown = chatapp("ask", "hi", *model, "--persona", "nobody", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1].startswith("chatapp: error: unknown persona 'nobody' (known: ")
    broken = chatapp("ask", "hi", *model, "--persona", "broken", env=env)
    assert broken.returncode == 1
    assert broken.stderr.strip().splitlines()[-1] == (
        f"chatapp: error: persona {folder / 'broken.toml'}: 'min_p' must be >= 0 and <= 1, got 7.0"
    )


# -- files in the prompt -----------------------------------------------------------------------

TINY = ("--preset", "fp32", "--max-new-tokens", "4", "--stats")


def _counted(stderr: str) -> list[int]:
    """The token counts of the "the message comes to N tokens" lines."""
    lines = [line for line in stderr.splitlines() if "the message comes to" in line]
    return [int(line.split("comes to ")[1].split(" tokens")[0].replace(",", "")) for line in lines]


def _prompts(stderr: str) -> list[int]:
    return [int(line.split("prompt ")[1].split(" tok")[0]) for line in stderr.splitlines() if "prefilled" in line]


def test_ask_attach_puts_the_files_in_the_message(tiny_folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("The meeting moved to Tuesday.\n" * 20)
    plain = chatapp("ask", "When is it?", "--model", str(tiny_folder), *TINY)
    out = chatapp(
        "ask", "When is it?", "--model", str(tiny_folder), *TINY, "--attach", str(notes), "--attach", str(notes)
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(f"chatapp: attached {notes} (600 chars)") == 2
    assert "tokens of the 2,048-token context (4 kept for the reply)" in out.stderr
    [counted] = _counted(out.stderr)
    assert _prompts(out.stderr) == [counted]  # the count said is what was sent
    assert counted > _prompts(plain.stderr)[0] + 2 * 120  # each copy of the file is over 120 tokens
    assert _counted(plain.stderr) == []  # without attachments nothing more is said


def test_a_bad_attachment_is_one_line_before_the_model_loads(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    for path, reason in (("missing.txt", "no such file"), ("blob.bin", "it is a binary file")):
        out = chatapp("ask", "hi", "--model", "no-such-model", "--attach", str(tmp_path / path))
        assert out.returncode == 1
        assert out.stderr.strip() == f"chatapp: error: can't attach '{tmp_path / path}': {reason}" + (
            "; only text files can be attached" if path == "blob.bin" else ""
        )
        assert out.stdout == ""


def test_repl_read_attaches_a_file_to_the_next_message_only(tiny_folder, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Buy milk and eggs.\n" * 10)
    script = f"/read {tmp_path / 'missing.txt'}\n/read {notes}\nWhat do I buy?\nThanks\n/exit\n"
    out = chatapp("repl", "--model", str(tiny_folder), *TINY, stdin=script)
    assert out.returncode == 0, out.stderr
    assert f"chatapp: error: can't attach '{tmp_path / 'missing.txt'}': no such file" in out.stderr
    assert f"chatapp: attached {notes} (190 chars) to the next message" in out.stderr
    [counted] = _counted(out.stderr)  # said for the message with the file, not for the one after
    first, second = _prompts(out.stderr)
    assert first == counted and second > first


def test_a_message_too_long_for_the_context_is_not_sent(tiny_folder, tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("apple " * 3000)
    args = ("ask", "Summarise", "--model", str(tiny_folder), *TINY, "--attach", str(book))
    out = chatapp(*args)
    assert out.returncode == 1 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("chatapp: error: not sent: the message is ")
    assert last.endswith(
        "tokens, and with 4 for the reply that is more than the 2,048-token context "
        "(attach less, or lower --max-new-tokens)"
    )
    assert "prefilled" not in out.stderr
    forced = chatapp(*args, "--force")  # with nothing older to drop, the session itself refuses it
    assert forced.returncode == 1 and forced.stdout == ""
    assert "more than the 2048-token context; shorten it or lower max_new_tokens" in forced.stderr.splitlines()[-1]


def test_repl_refuses_a_message_that_fits_only_without_the_turns_before_it_until_force(tiny_folder, tmp_path):
    part = tmp_path / "part.txt"
    part.write_text("apple " * 1200)
    script = f"/read {part}\nOne\n/read {part}\nTwo\n/force\n/exit\n"
    out = chatapp("repl", "--model", str(tiny_folder), *TINY, stdin=script)
    assert out.returncode == 0, out.stderr
    refusal = [line for line in out.stderr.splitlines() if "not sent" in line]
    assert len(refusal) == 1 and refusal[0].startswith("chatapp: error: not sent: with the conversation before it")
    assert refusal[0].endswith("2,048-token context; /force sends it anyway, dropping the oldest turns")
    assert len(_prompts(out.stderr)) == 2  # the first message, and the second once forced
    assert "the oldest 2 messages were dropped" in out.stderr
