"""The scripts under bench/ that time things for notes: their output's shape and their errors, not their speed."""

from __future__ import annotations

import pytest
from modelhelpers import build_family_model
from transformers import AttentionInterface

from chatapp.engine import cpu_attention


def test_bench_prefill_growth_prints_each_context(starter_folder, tmp_path, capsys):
    """bench/prefill_growth.py: a line per SDPA, each with every context (its speed is for notes, not a test)."""
    folder = build_family_model(starter_folder, tmp_path / "llama", "llama")
    bench = _bench_module("prefill_growth")
    args = ["--model", str(folder), "--preset", "fp32", "--new", "4", "--contexts", "8,20", "--reps", "2", "--both"]
    assert bench.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 new tokens, median of 2" in lines[0]
    for kind, line in zip(("chatapp", "transformers"), lines[1:], strict=True):
        assert line.strip().startswith(f"{kind} SDPA: over 8:") and "over 20:" in line and "(1.00x)" in line
    assert AttentionInterface()["sdpa"] is cpu_attention.sdpa_forward  # put back after timing transformers'


def _bench_module(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_shaped_model_takes_a_catalog_entrys_shape(starter_folder, tmp_path):
    import json

    from chatapp.catalog import load_catalog

    shaped = _bench_module("shaped_model")
    assert shaped.main(["smollm2-135m", str(tmp_path / "shaped")]) == 0
    config = json.loads((tmp_path / "shaped" / "config.json").read_text())
    shape = load_catalog()["smollm2-135m"].architecture
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == shape["layers"]
    assert (config["hidden_size"], config["num_key_value_heads"]) == (shape["hidden_size"], shape["kv_heads"])
    assert (tmp_path / "shaped" / "tokenizer.json").is_file()
    with pytest.raises(SystemExit, match="no shape for 'gemma-2-2b'; one of: .*qwen2.5-0.5b"):
        shaped.main(["gemma-2-2b", str(tmp_path / "other")])


def test_bench_serve_reports_each_turn(url, engine, tiny_words_folder):
    """bench/serve.py: the fields exist and agree with each other (its speed is for the note, not a test)."""
    from transformers import AutoTokenizer

    bench = _bench_module("serve")
    tokenizer = AutoTokenizer.from_pretrained(tiny_words_folder)
    result = bench.run(f"{url}/v1", None, "none", 3, 24, 4, tokenizer)
    assert result["model"] == engine.name and len(result["turns"]) == 3
    rows = result["turns"]
    assert all(0 < row["ttft_s"] <= row["turn_s"] for row in rows)
    assert sum(row["turn_s"] for row in rows) <= result["total_s"]
    for before, row in zip(rows, rows[1:], strict=False):
        assert row["prompt_tokens"] > before["prompt_tokens"] + before["completion_tokens"]
        assert row["cached_tokens"] >= before["prompt_tokens"] + before["completion_tokens"] - 1
    assert "turn-3 TTFT / turn-2 TTFT" in bench.table(result)
    # Another run is another conversation: a tag of its own keeps it from the first run's cache.
    again = bench.run(f"{url}/v1", None, "none", 2, 24, 4, tokenizer, tag="b1e2")
    assert again["turns"][0]["cached_tokens"] < again["turns"][0]["prompt_tokens"] / 2
    assert again["turns"][1]["cached_tokens"] >= again["turns"][0]["prompt_tokens"]
    mid = bench.medians([result, {**again, "turns": again["turns"] + rows[2:]}])
    assert mid["ttft_s"][2] == rows[2]["ttft_s"] and len(mid["ttft_s"]) == 3
    assert "median of 2 runs" in bench.median_table([result, result])


def test_bench_memory_sets_the_planners_terms_against_a_real_load(starter_folder, capsys):
    """bench/memory.py: weights and KV cache measured as the planner counts them, and a peak RSS above both."""
    import json

    _bench_module("memory").main(["--presets", "bf16", "--tokens", "400", "--json"])
    (row,) = json.loads(capsys.readouterr().out)
    assert row["preset"] == "bf16" and 300 < row["prompt_tokens"] <= 400
    assert abs(row["footprint"] - row["est_weights"]) < 1e-3 * row["footprint"] and row["kv_cache"] == row["est_kv"]
    assert row["peak_rss"] > row["runtime_rss"] + row["footprint"]


def test_bench_heap_ab_runs_each_mode_in_its_own_process(starter_folder, capsys):
    """bench/heap_ab.py: a line per mode, each with its peak and a time per prefill."""
    heap_ab = _bench_module("heap_ab")
    assert heap_ab.main(["--presets", "bf16", "--tokens", "64", "--rounds", "2", "--turns", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [["bf16", mode] for mode in heap_ab.MODES]
    assert all(line.count(",") >= 1 and " MB " in line for line in lines)
