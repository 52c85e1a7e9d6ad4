"""How sizes, speeds, durations and token counts are written, in one place. Plain Python, no imports."""

from __future__ import annotations


def gb(n: float, digits: int = 1) -> str:
    """Decimal gigabytes, as disks and downloads count them: gb(2.9e9) == '2.9 GB'."""
    return f"{n / 1e9:,.{digits}f} GB"


def mb(n: float) -> str:
    """Decimal megabytes: mb(1_234_567) == '1.2 MB'."""
    return f"{n / 1e6:,.1f} MB"


def params(n: int | None) -> str:
    """A parameter count in billions: params(135_000_000) == '0.14B'; '?' when unknown."""
    return f"{n / 1e9:.2f}B" if n else "?"


def gib(n: float) -> str:
    """Binary gibibytes, as RAM and GPU memory are sold: gib(16 * 1024**3) == '16.0 GiB'."""
    return f"{n / 1024**3:.1f} GiB"


def size(n: float) -> str:
    """The unit that fits: '512 B', '1.5 KB', '12.3 MB', '2.9 GB' (decimal)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def eta_s(done: float, total: float, per_s: float) -> float | None:
    """Seconds left at the current rate; None while there is no rate to go by."""
    if per_s <= 0:
        return None
    return max(0.0, total - done) / per_s


def duration(seconds: float) -> str:
    """'45s', '3m 20s', '2h 05m'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def tokens(n: int) -> str:
    """A context length, short: tokens(131072) == '131k', tokens(8192) == '8k', tokens(512) == '512'.

    Rounded down, so 'up to 32k' never promises more than there is.
    """
    return f"{n // 1000}k" if n >= 1000 else str(n)


def rate(tokens_per_s: float | None) -> str:
    """An estimated decode speed: '~25 tok/s', '~3.4 tok/s', '~0.4 tok/s'; '-' when unknown."""
    if tokens_per_s is None:
        return "-"
    return f"~{tokens_per_s:.0f} tok/s" if tokens_per_s >= 10 else f"~{tokens_per_s:.1f} tok/s"
