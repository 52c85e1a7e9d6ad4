"""Text for `chatapp plan` and the picker: verdicts, the plan table, the hardware lines (simulated machines)."""

from __future__ import annotations

import pytest

from chatapp.catalog import load_catalog
from chatapp.facts import facts_from_spec
from chatapp.hardware import CpuInfo, GpuInfo, Hardware, describe_by_hand
from chatapp.planner import choose
from chatapp.report import describe_hardware, format_plan, speed, verdict, weights_verdict

GIB = 1024**3
CPU32 = CpuInfo(32 * GIB, 32 * GIB, frozenset({"avx2"}), cores=2)
T4 = describe_by_hand(Hardware(CPU32), gpus=["T4:16GiB:7.5"])
APPLE = Hardware(CPU32, mps=True)
LLAMA_8B = facts_from_spec(load_catalog()["llama-3.1-8b"])
PARAMS_8B = 8_030_261_248


@pytest.mark.parametrize(
    "hardware, expected",
    [
        # A T4 has no bf16: auto tries fp16, and so does the verdict (it used to show bf16).
        (T4, "fp16 ✗ 17.9 GB · nf4 ✓ 7.5 GB · up to 74k"),
        # MPS runs bf16 whatever the CPU's flags say: auto tries bf16 (the verdict used to show fp32).
        (APPLE, "bf16 ✓ 17.8 GB · up to 120k"),
        (Hardware(CPU32), "bf16 ✓ 21.3 GB · up to 29k"),  # no native bf16: bf16 weights, fp32 math and cache
    ],
    ids=["T4", "MPS", "cpu"],
)
def test_the_verdict_shows_the_presets_auto_tries(hardware, expected):
    plan = choose(hardware, LLAMA_8B, context=8192)
    assert verdict(plan) == expected
    assert verdict(plan).startswith(plan.choice.preset) or verdict(plan).split(" · ")[1].startswith(plan.choice.preset)


def test_weights_verdict_follows_the_same_ladder():
    assert weights_verdict(T4, PARAMS_8B) == "fp16 ✓ 16.1 GB · nf4 ✓ 4.1 GB (weights)"
    assert weights_verdict(APPLE, PARAMS_8B) == "bf16 ✓ 16.1 GB · nf4 ✓ 4.1 GB (weights)"
    assert weights_verdict(Hardware(CPU32), PARAMS_8B) == "bf16 ✓ 16.1 GB · nf4 ✓ 4.1 GB (weights)"
    assert weights_verdict(T4, None) == "size unknown"


def test_a_split_and_a_refusal_read_as_such():
    split = choose(describe_by_hand(Hardware(CPU32), gpus=["4GiB"]), LLAMA_8B, context=8192)
    assert verdict(split) == "bf16 ✗ 17.9 GB · nf4 ✗ 7.5 GB · GPU+CPU split, slow"
    assert speed(split) == "~0.4 tok/s"
    assert (
        "decode speed: ~0.4 tok/s (estimate: 17.1 GB read per token, part of it from CPU RAM at 6.0 GB/s, "
        "plus 26 ms of per-layer launch overhead; too slow to be usable)" in format_plan(split)
    )
    refused = choose(Hardware(CpuInfo(4 * GIB, 4 * GIB)), LLAMA_8B, context=8192)
    assert verdict(refused) == "bf16 ✗ 21.3 GB · nf4 ✗ 12.9 GB"
    assert speed(refused) == "-"
    assert "choice: none; nothing fits" in format_plan(refused) and "decode speed" not in format_plan(refused)


def test_format_plan_gives_the_longest_context_and_the_speed_estimate():
    text = format_plan(choose(T4, LLAMA_8B, context=8192))
    assert "choice: nf4 at 8,192 tokens on cuda:0, attention sdpa" in text
    assert "longest context that fits (nf4): 74,752 tokens" in text
    assert (
        "decode speed: ~17 tok/s (estimate: 200.0 GB/s ÷ 6.8 GB read per token, weights + KV cache at "
        "8,192 tokens, plus 26 ms of per-layer launch overhead)" in text
    )


def test_describe_hardware():
    h100 = Hardware(CPU32, (GpuInfo(0, "H100", 80 * GIB, 79 * GIB, (9, 0), bandwidth_bytes_per_s=3.35e12),))
    assert describe_hardware(h100) == [
        "GPU 0: H100, 80.0 GiB (79.0 GiB free), compute 9.0, 3,350 GB/s",
        "CPU: 2 cores, 32.0 GiB RAM (32.0 GiB available), no native bf16",
    ]
    assert describe_hardware(APPLE)[0] == "Apple GPU (MPS), sharing 32.0 GiB of unified memory"


@pytest.mark.parametrize(
    ("hardware", "line"),
    [
        (T4, "draft smollm2-135m: 0.3 GB weights + 0.2 GB cache, beside the model (speculative decoding)"),
        (
            Hardware(CpuInfo(int(7.3 * GIB), int(7.3 * GIB), frozenset({"avx2"}), cores=2)),
            "draft smollm2-135m left out: its 0.5 GB weights + 0.4 GB cache don't fit beside the model; "
            "the model loads without it",
        ),
    ],
    ids=["fits", "left out"],
)
def test_plan_shows_the_drafts_share_on_its_own_line(hardware, line):
    catalog = load_catalog()
    plan = choose(hardware, facts_from_spec(catalog["smollm2-1.7b"]), draft=facts_from_spec(catalog["smollm2-135m"]))
    text = format_plan(plan).splitlines()
    assert line in text
    assert not any(line in other for other in text if other != line)  # said once, not again among the reasons
    assert all("draft" not in row for row in format_plan(choose(hardware, plan.facts)).splitlines())


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((), "draft smollm2-135m: "),
        (("--draft", "smollm2-360m"), "draft smollm2-360m: "),
        (("--draft", "none"), None),
    ],
    ids=["the catalog's", "named", "none"],
)
def test_chatapp_plan_shows_the_draft(capsys, args, line):
    from chatapp.cli import main

    assert main(["plan", "smollm2-1.7b", "--no-gpu", "--ram", "32GiB", *args]) == 0
    drafts = [row for row in capsys.readouterr().out.splitlines() if row.startswith("draft")]
    if line is None:
        assert drafts == []
    else:
        # Its dtype follows this machine's CPU (bf16 or fp32), so only the shape of the line is fixed.
        assert len(drafts) == 1 and drafts[0].startswith(line)
        assert drafts[0].endswith(" cache, beside the model (speculative decoding)") and "GB weights + " in drafts[0]
