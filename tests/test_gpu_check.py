"""bench/gpu_check.py, the GPU check of issue 16: its dry run on the CPU end to end, and its pure parts.

The dry run is the device run's rehearsal: the same steps, through chatapp's loader, sessions and worker, on tiny
models. These tests check that every step leaves a well-formed record, and what the CPU can check for real (cache
reuse is exact in fp32, a squeezed worker answers a forced load with one out-of-memory line and comes back).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
STEPS = ["attention", "exactness", "switch", "oom", "decode", "graphs", "planner", "alloc"]


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run as the device runs it, a script in its own process: (results.json's data, results.md, stdout)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(out), "--dry-run", "--scratch", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - started < 150, "the dry run is meant to take about half a minute"
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), done.stdout


def _step(data: dict, name: str) -> dict:
    return next(record for record in data["steps"] if record["step"] == name)


def test_the_dry_run_records_every_step_in_order_and_all_ran(dry_run):
    data, markdown, stdout = dry_run
    assert data["finished"] is True and data["meta"]["dry_run"] is True
    assert [record["step"] for record in data["steps"]] == STEPS
    for record in data["steps"]:
        assert record["status"] == "ok", (record["step"], record.get("error"))
        assert record["seconds"] >= 0 and record["goal"] and record["title"] in markdown
        assert f"step {record['step']}: ok" in stdout  # progress lines, timestamped
    assert "[" in stdout.splitlines()[0] and " s] step attention" in stdout.splitlines()[0]


def test_the_planner_rows_carry_the_estimate_parts_and_the_measured_ones(dry_run):
    record = _step(dry_run[0], "planner")
    rows = record["rows"]
    assert [(r["model"], r["preset"]) for r in rows] == [
        (model, preset) for model in ("llama-3.1-8b", "gemma-2-9b", "qwen2.5-7b") for preset in ("bf16", "nf4", "int8")
    ]
    for row in rows:
        parts = ("est_weights_bytes", "est_kv_bytes", "est_activations_bytes", "est_overhead_bytes")
        assert row["est_total_bytes"] == sum(row[part] for part in parts)
        # Weights are counted right: the footprint of what was loaded is within 3% of the estimate.
        assert row["weights_bytes"] == pytest.approx(row["est_weights_bytes"], rel=0.03)
        # The session's cache grows in 256-token steps (kvcache.STEP): never less than the estimate of what it holds.
        assert row["est_kv_bytes"] <= row["kv_bytes"] < 3 * row["est_kv_bytes"]
        assert row["context"] == 192 + 4 - 1  # the prompt and the reply but its last token
        assert "needs CUDA" in row["status"] and "est_vs_process" not in row  # no device memory to compare on a CPU
    assert record["goal_met"] is None


def test_the_decode_rows_set_each_rate_against_the_same_bandwidth(dry_run):
    record = _step(dry_run[0], "decode")
    bandwidth = record["copy_bandwidth_bytes_per_s"]
    rows = record["rows"]
    assert [(r["preset"], r["decode"], r["chat"]) for r in rows] == [
        ("bf16", "dynamic", "first"),
        ("bf16", "static", "first"),
        ("bf16", "static", "another, same size"),
        ("bf16", "dynamic", "first"),
        ("bf16", "static", "first"),
        ("nf4", "dynamic", "first"),
        ("nf4", "dynamic", "first"),
        ("nf4", "static", "first"),
    ]
    for row in rows:
        read = row["weights_read_bytes"] + row["kv_read_bytes"]
        assert row["limit_tokens_per_s"] == pytest.approx(bandwidth / read, rel=1e-6)
        assert row["fraction_of_limit"] == pytest.approx(row["tokens_per_s"] / row["limit_tokens_per_s"], rel=1e-9)
        # A prompt of context - new - warm tokens, then the measured turn's new tokens but the last.
        assert row["tokens_per_s"] > 0 and row["context"] in (128 - 2 - 1, 512 - 2 - 1)
        assert row["step"] == "eager"  # no compiling on the CPU
    static = [r["kv_read_bytes"] for r in rows if r["decode"] == "static" and r["preset"] == "bf16"]
    assert static[0] == static[2], "a static cache is read whole: a 1,024-token bucket at both contexts"
    # The Markdown gives the bandwidth in the unit its heading names.
    assert f"| copy_bandwidth MiB_per_s |\n|---|\n| {bandwidth / 2**20:,.1f} |" in dry_run[1]


def test_the_graphs_rows_set_three_rates_against_one_limit_and_profile_the_apps_variant(dry_run):
    record = _step(dry_run[0], "graphs")
    rows = record["rows"]
    assert [row["variant"] for row in rows] == [
        "cuda graphs, a token read back each step",
        "cuda graphs, one step ahead (the app's)",
        "cuda graphs, one step ahead, the cache copied to every head (transformers')",
    ]
    for row in rows:
        assert row["status"] == "ok (eager: a dry run)" and row["step"] == "eager"
        assert row["context"] == 128 - 2 - 1 and row["limit_tokens_per_s"] > 0
        for kind in ("app", "step", "queued"):
            rate = row[f"{kind}_tokens_per_s"]
            assert rate > 0
            assert row[f"{kind}_fraction_of_limit"] == pytest.approx(rate / row["limit_tokens_per_s"], abs=2e-3)
        assert row["cudagraph_skips"] == 0 and row["graph_breaks"] == 0 and "profile" not in row
    profile = record["profile"]
    assert profile[0]["kernel"] == "all (per step)" and profile[0]["host_wall_ms"] > 0
    assert any(row["kernel"].startswith("host: ") for row in profile)
    assert "Profile:" in dry_run[1]  # a second table in the Markdown


def test_the_graphs_drafts_rows_bound_drafting_by_drafters_that_know_the_reply(dry_run):
    record = _step(dry_run[0], "graphs")
    drafts = {row["drafter"]: row for row in record["drafts"]}
    assert list(drafts) == ["off", "ngram (the app's)", "every draft right", "every draft wrong"]
    for row in drafts.values():
        assert row["status"] == "ok" and row["app_tokens_per_s"] > 0
        assert row["agree_with_off"] == row["tokens"] == 6  # fp32 on the CPU: every reply the same
    assert drafts["off"]["drafted"] == 0
    right, wrong = drafts["every draft right"], drafts["every draft wrong"]
    assert right["accepted"] == right["drafted"] == 5  # a draft at each token after the first, all of it kept
    assert wrong["accepted"] == 0 and wrong["drafted"] > 5
    (verify,) = record["verify"]
    assert verify["in_steps"] == pytest.approx(verify["verify_ms"] / verify["step_ms"], abs=0.01)
    assert "Drafts:" in dry_run[1] and "Verify:" in dry_run[1]


def test_the_graphs_step_runs_the_variants_and_context_asked_for(tmp_path):
    """At a whole bucket's context, as the device runs it (--contexts 8192): the turn ends 3 tokens short of the
    static cache's end, and the verify after the drafts, 7 tokens wide, must still fit (it once wrote past the end)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    run = [sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path), "--dry-run", "--scratch", str(tmp_path)]
    done = subprocess.run(
        [*run, "--only", "graphs", "--contexts", "1024", "--variants", "ahead"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = _step(json.loads((tmp_path / "results.json").read_text()), "graphs")
    assert record["status"] == "ok", record.get("error")
    assert [(row["variant"], row["context"]) for row in record["rows"]] == [
        ("cuda graphs, one step ahead (the app's)", 1024 - 3)
    ]
    assert [row["status"] for row in record["drafts"]] == ["ok"] * 4 and record["verify"][0]["verify_ms"] > 0
    refused = subprocess.run([*run, "--variants", "ahead,fast"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "unknown variant(s) fast; they are read-back, ahead, copies" in refused.stderr


def test_the_alloc_rows_read_each_allocator_setting_in_its_own_process(dry_run):
    record = _step(dry_run[0], "alloc")
    phases = [
        "int8 loaded, cache not emptied",
        "after empty_cache (the loader's)",
        "after a 1k-token turn",
        "after the worker's trim",
    ]
    assert [(row["allocator"], row["phase"]) for row in record["rows"]] == [
        (allocator, phase) for allocator in ("default", "expandable segments") for phase in phases
    ]
    assert all(row["process_bytes"] > 0 for row in record["rows"])
    (graphs,) = record["graphs_under_expandable_segments"]
    assert graphs == {
        "allocator": "expandable segments",
        "static_step": "eager",
        "cudagraph_skips": 0,
        "same_replies_as_eager": True,
    }


def test_the_exactness_rows_compare_every_turn_with_a_reencode(dry_run):
    record = _step(dry_run[0], "exactness")
    rows = record["rows"]
    assert [(r["preset"], r["decode"]) for r in rows] == [
        ("fp32", "dynamic"),
        ("fp32", "static"),
        ("bf16", "dynamic"),
        ("bf16", "static"),
    ]
    for row in rows:
        assert row["turns"] == 2 and len(row["tokens_agreeing_before_divergence"]) == 2
        assert row["identical_turns"] == sum(n == 6 for n in row["tokens_agreeing_before_divergence"])
        # After the first turn only the new message and the template's glue are prefilled, not the history.
        first, second = row["prefilled_per_turn"]
        assert first == row["prompt_per_turn"][0] and row["prompt_per_turn"][1] - second >= first
    assert all(row["all_identical"] for row in rows if row["preset"] == "fp32")
    assert record["goal_met"] is True


def test_the_worker_steps_switch_and_come_back_from_a_failed_load(dry_run):
    data = dry_run[0]
    switch = _step(data, "switch")
    phases = [row["phase"] for row in switch["rows"]]
    assert phases == [
        "baseline: nothing loaded",
        "loaded bf16, one turn",
        "unloaded bf16",
        "loaded nf4, one turn",
        "unloaded nf4",
        "loaded bf16, one turn",
        "unloaded bf16",
    ]
    assert all("back_to_baseline" in row for row in switch["rows"] if row["phase"].startswith("unloaded"))
    oom = _step(data, "oom")
    assert oom["answered"] == "Error" and "memory" in oom["error_line"].lower()
    for check in ("out_of_memory", "one_line", "worker_alive", "previous_back", "answers", "memory_as_before"):
        assert oom[check] is True, check
    assert [row["phase"] for row in oom["rows"]][-1] == "worker stopped"


def test_the_attention_rows_name_the_backend_sdpa_chooses(dry_run):
    record = _step(dry_run[0], "attention")
    assert "not measured" in record["flash_attention_2"]
    for case in ("causal prefill of 512", "128 over a 512 cache"):
        rows = {row["backend"]: row for row in record["rows"] if row["case"] == case}
        default = next(name for name in rows if name.startswith("default (chooses "))
        assert rows["MATH"]["ms"] > 0 and rows["MATH"]["vs_math"] == 1.0
        assert default.removeprefix("default (chooses ").rstrip(")") in (*rows, "MATH")
        assert all(("ms" in row) != ("error" in row) for row in rows.values())


# -- the pure parts ---------------------------------------------------------------------------------------------


def test_bandwidth_fraction_is_the_rate_over_bandwidth_per_bytes_read(bench_path):
    import gpu_speed

    limit, fraction = gpu_speed.bandwidth_fraction(50.0, 16 * 10**9, 3.2e12)
    assert limit == pytest.approx(200.0) and fraction == pytest.approx(0.25)
    assert gpu_speed.bandwidth_fraction(200.0, 16 * 10**9, 3.2e12)[1] == pytest.approx(1.0)


def test_the_verdict_allows_ten_percent_over_and_five_under(bench_path):
    import gpu_memory

    assert gpu_memory.verdict(110, 100)[1:] == ("within", True)
    assert gpu_memory.verdict(95, 100)[1:] == ("within", True)
    assert gpu_memory.verdict(94, 100)[1:] == ("under by 6%", False)
    assert gpu_memory.verdict(111, 100)[1:] == ("over by 11%", False)
    assert gpu_memory.verdict(50, 100)[0] == 0.5


def _context(budget_s: float):
    import gpu_check

    return gpu_check.Context(
        dry_run=True,
        device="cpu",
        sizes=gpu_check.DRY_SIZES,
        settings=None,
        checkpoints=None,
        scratch=Path("."),
        deadline=time.monotonic() + budget_s,
        say=lambda _text: None,
    )


def test_a_step_that_raises_is_one_line_and_the_next_step_still_runs(bench_path):
    import gpu_check

    def broken(ctx, record):
        record["rows"] = [{"got": "this far"}]
        raise ValueError("the first line\nand a second")

    def fine(ctx, record):
        record["measured"] = 1

    written = []
    steps = [gpu_check.Step("broken", "B", "g", broken, 1.0), gpu_check.Step("fine", "F", "g", fine, 1.0)]
    records = gpu_check.run_steps(steps, _context(60), 60, lambda rs: written.append(len(rs)))
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["error"] == "ValueError: the first line" and records[0]["rows"] == [{"got": "this far"}]
    assert records[1]["measured"] == 1 and written == [1, 2]  # the report is rewritten after each step


def test_the_time_budget_stops_a_long_step_and_skips_what_is_left(bench_path):
    import gpu_check

    def slow(ctx, record):
        record["started"] = True
        time.sleep(30)

    steps = [
        gpu_check.Step("first", "1", "g", slow, 0.4),
        gpu_check.Step("second", "2", "g", slow, 1.0),
        gpu_check.Step("third", "3", "g", slow, 1.0),
    ]
    started = time.monotonic()
    records = gpu_check.run_steps(steps, _context(3.0), 3.0, lambda rs: None)
    assert time.monotonic() - started < 5
    assert [r["status"] for r in records] == ["failed", "failed", "skipped"]
    assert records[0]["error"].startswith("out of time: stopped after") and records[0]["started"]
    assert records[0]["seconds"] == pytest.approx(1.2, abs=0.5)  # its share: 40% of the budget
    assert records[1]["seconds"] == pytest.approx(1.8, abs=0.5)  # what was left of the budget
    assert records[2]["reason"] == "out of time: the 3 s budget is spent"


def test_steps_not_asked_for_are_recorded_as_skipped(bench_path):
    import gpu_check

    ran = []
    steps = [gpu_check.Step(name, name, "g", lambda ctx, rec, n=name: ran.append(n), 1.0) for name in "abc"]
    records = gpu_check.run_steps(steps, _context(60), 60, lambda rs: None, only={"b"})
    assert ran == ["b"] and [r["status"] for r in records] == ["skipped", "ok", "skipped"]
    assert records[0]["reason"] == "not asked for (--only)"
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", "unused", "--only", "planner,nonsense"])


def test_without_cuda_the_device_run_says_so_in_its_results(bench_path, tmp_path):
    import gpu_check
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    data = json.loads((tmp_path / "results.json").read_text())
    assert "no CUDA" in data["meta"]["error"] and data["steps"] == []


def test_the_configs_have_the_catalogs_shapes(bench_path):
    """The published configs agree with models.toml's own numbers for the same models (found independently)."""
    import gpu_models
    from transformers import AutoConfig

    from chatapp.catalog import load_catalog

    catalog = load_catalog()
    for name in gpu_models.MODELS:
        raw = gpu_models.read_config(name)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        shape = catalog[name].architecture
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        found = (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
        assert found == (shape["layers"], shape["hidden_size"], shape["intermediate_size"], shape["attention_heads"])
        assert (config.num_key_value_heads, head_dim, config.vocab_size) == (
            shape["kv_heads"],
            shape["head_dim"],
            shape["vocab_size"],
        )
        assert config.tie_word_embeddings == shape["tied_embeddings"], name
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        assert window == shape.get("sliding_window"), name


def test_a_shrunk_config_keeps_its_family_and_fits_bitsandbytes_cpu_kernels(bench_path):
    import gpu_models

    gemma = gpu_models.shrink(gpu_models.read_config("gemma-2-9b"))
    assert gemma["model_type"] == "gemma2" and gemma["sliding_window"] == 32
    assert gemma["attn_logit_softcapping"] == 50.0 and gemma["final_logit_softcapping"] == 30.0
    llama = gpu_models.shrink(gpu_models.read_config("llama-3.1-8b"))
    assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["num_hidden_layers"] == 2
    for config in (gemma, llama):
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        assert config["num_key_value_heads"] * head_dim % 32 == 0 and config["intermediate_size"] % 32 == 0


def test_the_tokenizer_is_the_same_when_transformers_rebuilds_it_as_qwen2s(bench_path, tmp_path):
    """transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, rebuilt from the vocabulary; a reply's
    text must still encode back to its ids, and a prompt have the asked length."""
    import gpu_models
    from transformers import AutoTokenizer

    from chatapp.engine.session import Message, render_ids

    folder = gpu_models.build("qwen2.5-7b", tmp_path / "qwen", device="cpu", dry_run=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 512
    reply = [gpu_models.reply_ids()[(7 * i) % 95] for i in range(200)]
    assert tokenizer(tokenizer.decode(reply), add_special_tokens=False)["input_ids"] == reply
    assert len(render_ids(tokenizer, [Message("user", gpu_models.user_message(tokenizer, 100))])) == 100
    saved = gpu_models.byte_tokenizer(512)
    assert saved("hello, world", add_special_tokens=False)["input_ids"] == tokenizer("hello, world")["input_ids"]


def test_the_device_command_is_the_same_in_both_places_and_fits_one_run():
    """The one command a GPU session runs is written in bench/gpu_check.py and bench/gpu_wheels.sh."""

    def command(path: Path) -> str:
        lines = [line.lstrip("#").strip() for line in path.read_text().splitlines()]
        start = next(i for i, line in enumerate(lines) if line.startswith("python3 -m pip install"))
        end = next(i for i in range(start, len(lines)) if lines[i].endswith("--out $OUT"))
        return " ".join(lines[start : end + 1])

    ours = command(BENCH / "gpu_check.py")
    assert ours == command(BENCH / "gpu_wheels.sh") and len(ours) < 2000
    assert "--no-index --no-deps" in ours and ".whl/*.whl" in ours and "PYTHONPATH=/tmp/site:$PWD" in ours
    assert "timeout 540 python3 bench/gpu_check.py --out $OUT" in ours
