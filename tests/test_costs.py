"""The cost of re-reading a conversation: the measured prefill rate, and how it is said."""

from __future__ import annotations

import subprocess
import sys

from chatapp.costs import MIN_PREFILL_TOKENS, RECENT_TURNS, prefill_rate, reread_text


def turn(prefilled: int, ttft: float) -> dict:
    return {"prompt_tokens": prefilled + 100, "prefilled_tokens": prefilled, "ttft_s": ttft, "generated_tokens": 8}


def test_rate_is_the_best_recent_long_prefill():
    stats = [turn(1000, 2.0), turn(30, 0.01), None, {}, turn(640, 0.8), turn(500, 1.0)]
    # 30 tokens in 0.01 s would say 3,000 tok/s: too short to measure the rate, so it is left out.
    assert prefill_rate(stats) == 800.0
    assert prefill_rate([turn(MIN_PREFILL_TOKENS, 0.5)]) == MIN_PREFILL_TOKENS / 0.5
    assert prefill_rate([turn(MIN_PREFILL_TOKENS - 1, 0.5)]) is None


def test_old_turns_age_out():
    fast_then_slow = [turn(2000, 1.0)] + [turn(100, 1.0)] * RECENT_TURNS
    assert prefill_rate(fast_then_slow) == 100.0
    assert prefill_rate(fast_then_slow[:-1]) == 2000.0
    assert prefill_rate(iter(fast_then_slow)) == 100.0  # any iterable, read once


def test_no_rate_without_usable_turns():
    assert prefill_rate([]) is None
    assert prefill_rate([None, turn(500, 0.0), {"prefilled_tokens": 500}, turn(0, 1.0)]) is None


def test_reread_text():
    assert reread_text(4210, 700.0) == "re-reads 4,210 tokens, ≈ 6s"
    assert reread_text(90_000, 700.0) == "re-reads 90,000 tokens, ≈ 2m 09s"
    assert reread_text(120, 700.0) == "re-reads 120 tokens, < 1s"
    assert reread_text(4210, None) == "re-reads 4,210 tokens"
    assert reread_text(1, None) == "re-reads 1 token"


def test_no_heavy_imports():
    code = "import sys, chatapp.costs; print([m for m in ('torch', 'transformers', 'textual') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
