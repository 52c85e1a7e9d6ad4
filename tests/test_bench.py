"""`chatapp bench` and its pieces: the app's decode loop against model.generate, and the JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from chatapp.engine.bench import app_decode, bare_decode, prompt_cache
from chatapp.engine.session import Message, render_ids


def chatapp(*args):
    return subprocess.run([sys.executable, "-m", "chatapp.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_apps_decode_loop_continues_a_cache_like_generate(tiny_words_fp32):
    loaded = tiny_words_fp32
    prompt = render_ids(loaded.tokenizer, [Message("user", "Hello")])
    cache = prompt_cache(loaded, prompt)
    ids, times = app_decode(loaded, prompt, cache, 20)
    assert len(ids) == len(times) == 20
    assert not set(ids) & loaded.stop_token_ids
    stop = sorted(loaded.stop_token_ids)
    with torch.inference_mode():
        out = loaded.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            cache=cache,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            eos_token_id=stop,
            pad_token_id=stop[0],
        )
    assert out[0, len(prompt) :].tolist() == ids
    assert app_decode(loaded, prompt, prompt_cache(loaded, prompt), 20)[0] == ids  # each run starts from a copy
    bare, bare_times = bare_decode(loaded, prompt, prompt_cache(loaded, prompt), 20)
    assert bare == ids and len(bare_times) == 20  # the bare loop decodes the same tokens, from its own copy


def test_bench_json_contract(tiny_folder):
    out = chatapp(
        "bench",
        "--model",
        str(tiny_folder),
        "--preset",
        "fp32",
        "--turns",
        "3",
        "--max-new-tokens",
        "6",
        "--user-tokens",
        "20",
        "--doc-tokens",
        "200",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in (
        "model",
        "preset",
        "device",
        "cached",
        "naive",
        "identical_outputs",
        "raw_generate_tok_s",
        "app_tok_s",
        "bare_step_tok_s",
        "app_vs_bare",
    ):
        assert key in result
    assert result["app_vs_bare"] == pytest.approx(result["app_tok_s"] / result["bare_step_tok_s"])
    assert result["identical_outputs"] is True
    fields = {
        "turn",
        "prompt_tokens",
        "prefilled_tokens",
        "generated_tokens",
        "ttft_s",
        "decode_tokens_per_s",
        "cache_tokens",
        "finish_reason",
    }
    assert all(fields <= set(turn) for turn in result["cached"] + result["naive"])
    assert [t["turn"] for t in result["cached"]] == [1, 2, 3]
    cached, naive = result["cached"], result["naive"]
    assert cached[0]["prompt_tokens"] > 200
    assert all(c["prefilled_tokens"] < 60 for c in cached[1:])
    assert all(n["prefilled_tokens"] == n["prompt_tokens"] for n in naive)
    assert [c["prompt_tokens"] for c in cached] == [n["prompt_tokens"] for n in naive]
    _check_speculative(result, "ngram")


def _check_speculative(result: dict, mode: str) -> None:
    spec = result["speculative"]
    assert set(spec) >= {"mode", "drafted", "accepted", "decode_tokens_per_s", "identical_outputs"}
    assert spec["mode"] == mode
    assert spec["identical_outputs"] is True  # greedy: drafts change no token
    assert spec["drafted"] == sum(c["drafted_tokens"] for c in result["cached"])
    assert spec["accepted"] == sum(c["accepted_tokens"] for c in result["cached"])
    assert 0 <= spec["accepted"] <= spec["drafted"]
    assert spec["decode_tokens_per_s"] > 0 and spec["plain_decode_tokens_per_s"] > 0
    if mode == "off":
        assert spec["drafted"] == 0 and spec["decode_tokens_per_s"] == spec["plain_decode_tokens_per_s"]


@pytest.mark.parametrize("mode", ["ngram", "off"])
def test_bench_quote_scenario_asks_to_quote_a_document(tiny_folder, mode):
    out = chatapp(
        *("bench", "--model", str(tiny_folder), "--preset", "fp32", "--turns", "3", "--max-new-tokens", "8"),
        *("--doc-tokens", "150", "--scenario", "quote", "--speculative", mode, "--json"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["scenario"] == "quote" and result["identical_outputs"] is True
    cached = result["cached"]
    assert cached[0]["prompt_tokens"] >= 150
    # Each later message is one short question about the document.
    assert all(c["prefilled_tokens"] < 40 for c in cached[1:])
    _check_speculative(result, mode)


def test_quote_messages_ask_for_sentences_the_document_has(tiny_fp32):
    from chatapp.engine.bench import quote_messages

    messages = quote_messages(tiny_fp32.tokenizer, 4, 200)
    document = messages[0].split("\nQuote")[0]
    for message in messages:
        word = message.split("'")[-2]
        assert "Quote, word for word" in message and word in document


def test_bench_table(tiny_folder):
    out = chatapp(
        "bench",
        "--model",
        str(tiny_folder),
        "--preset",
        "fp32",
        "--turns",
        "2",
        "--max-new-tokens",
        "4",
        "--user-tokens",
        "10",
        "--doc-tokens",
        "0",
    )
    assert out.returncode == 0, out.stderr
    assert "identical outputs: True" in out.stdout
    assert "whole conversation: cached" in out.stdout


def test_bench_restart_on_the_starter_model_restores_exactly_the_new_tokens(starter_folder):
    out = chatapp(
        "bench",
        "--model",
        "smollm2-135m-local",
        "--preset",
        "fp32",
        "--turns",
        "2",
        "--max-new-tokens",
        "8",
        "--user-tokens",
        "20",
        "--doc-tokens",
        "400",
        "--restart",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    restart = json.loads(out.stdout)["restart"]
    assert set(restart) == {"cold", "restored", "new_tokens", "identical_outputs"}
    assert set(restart["restored"]) == {"prefilled_tokens", "ttft_s", "restore_s", "snapshot_bytes"}
    assert restart["restored"]["prefilled_tokens"] == restart["new_tokens"] < 40
    assert restart["cold"]["prefilled_tokens"] > 400
    assert restart["identical_outputs"] is True
    assert restart["restored"]["snapshot_bytes"] > 0


@pytest.mark.parametrize("which", ["itself", "another model"])
def test_bench_speculative_with_a_draft_model_fills_the_same_entry(tiny_folder, tiny_words_folder, which):
    draft = str(tiny_folder if which == "itself" else tiny_words_folder)
    out = chatapp(
        *("bench", "--model", str(tiny_folder), "--preset", "fp32", "--turns", "3", "--max-new-tokens", "8"),
        *("--doc-tokens", "150", "--scenario", "quote", "--speculative", draft, "--json"),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["identical_outputs"] is True
    _check_speculative(result, draft)
    spec = result["speculative"]
    assert spec["drafted"] > 0
    if which == "itself":
        assert spec["accepted"] == spec["drafted"]
    else:
        assert spec["accepted"] < spec["drafted"]


def test_bench_refuses_a_draft_with_another_tokenizer_in_one_line(tiny_folder, tmp_path):
    import shutil

    draft = tmp_path / "draft"
    shutil.copytree(tiny_folder, draft)
    data = json.loads((draft / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["river"], vocab["town"] = vocab["town"], vocab["river"]
    (draft / "tokenizer.json").write_text(json.dumps(data))
    out = chatapp("bench", "--model", str(tiny_folder), "--preset", "fp32", "--speculative", str(draft), "--json")
    assert out.returncode != 0 and out.stdout == ""
    last = out.stderr.strip().splitlines()[-1]
    assert "its tokenizer differs" in last and "Traceback" not in out.stderr
