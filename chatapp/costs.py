"""What re-reading a conversation costs, from the prefill rate measured on this machine. Plain Python, no torch."""

from __future__ import annotations

from collections.abc import Iterable

from .units import duration

#: Shorter prefills are dominated by the fixed cost of a turn (rendering, the first decode step), not by tokens.
MIN_PREFILL_TOKENS = 64
#: How many of the latest qualifying turns the rate is taken from: recent enough to follow the model, preset and
#: machine load of now, enough that one slow turn (a busy CPU, a first call) doesn't set it.
RECENT_TURNS = 16


def prefill_rate(stats_dicts: Iterable[dict | None]) -> float | None:
    """Prefill tokens/s: the best of the latest turns that prefilled at least MIN_PREFILL_TOKENS tokens.

    stats_dicts are stored TurnStats dicts, oldest first (None and incomplete entries are skipped).
    A turn's time to first token includes its first decode step, so the rate errs on the slow side.
    """
    rates = []
    for stats in stats_dicts:
        tokens, seconds = (stats or {}).get("prefilled_tokens"), (stats or {}).get("ttft_s")
        if tokens and seconds and tokens >= MIN_PREFILL_TOKENS and seconds > 0:
            rates.append(tokens / seconds)
    return max(rates[-RECENT_TURNS:]) if rates else None


def reread_text(tokens: int, rate: float | None) -> str:
    """'re-reads 4,210 tokens, ≈ 6s'; without a rate, only the tokens."""
    text = f"re-reads {tokens:,} token{'' if tokens == 1 else 's'}"
    if rate is None or rate <= 0:
        return text
    seconds = tokens / rate
    return f"{text}, {'< 1s' if seconds < 1 else '≈ ' + duration(seconds)}"
