"""How sizes, durations, token counts and speeds are written."""

from __future__ import annotations

from chatapp.units import duration, eta_s, gb, gib, mb, rate, size, tokens


def test_sizes():
    assert gb(2.9e9) == "2.9 GB"
    assert gb(16_060_522_496, 2) == "16.06 GB"
    assert gb(301.8e9) == "301.8 GB"
    assert gib(16 * 1024**3) == "16.0 GiB"
    assert mb(1_234_567) == "1.2 MB" and mb(2_345_678_901) == "2,345.7 MB"
    assert [size(n) for n in (512, 1500, 12_345_678, 2.9e9, 3.5e12)] == [
        "512 B",
        "1.5 KB",
        "12.3 MB",
        "2.9 GB",
        "3,500.0 GB",
    ]


def test_eta_and_duration():
    assert eta_s(250, 1000, 50) == 15.0
    assert eta_s(1200, 1000, 50) == 0.0  # never negative
    assert eta_s(0, 1000, 0) is None
    assert [duration(s) for s in (45, 200, 7500)] == ["45s", "3m 20s", "2h 05m"]


def test_tokens_and_rates():
    assert [tokens(n) for n in (131072, 8192, 32768, 130048, 512)] == ["131k", "8k", "32k", "130k", "512"]
    assert [rate(r) for r in (25.4, 3.44, 0.35, None)] == ["~25 tok/s", "~3.4 tok/s", "~0.3 tok/s", "-"]
