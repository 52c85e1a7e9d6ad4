"""A one-line terminal progress bar for downloads: bytes, total, speed, ETA."""

from __future__ import annotations

import sys
import time

from .units import eta_s, size


class ProgressBar:
    def __init__(self, label: str, stream=sys.stderr, min_interval_s: float = 0.2):
        self.label = label
        self.stream = stream
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._shown = False

    def update(self, p) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval_s and p.done_bytes < p.total_bytes:
            return
        self._last = now
        share = p.done_bytes / p.total_bytes if p.total_bytes else 1.0
        filled = int(share * 24)
        left = eta_s(p.done_bytes, p.total_bytes, p.bytes_per_s)
        eta = "" if left is None else f", {left:,.0f}s left"
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (24 - filled)}] {share:6.1%} "
            f"{size(p.done_bytes)} / {size(p.total_bytes)}, {size(p.bytes_per_s)}/s{eta}"
        )
        self.stream.write(line)
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
