"""Talking to a real worker process from a test."""

from __future__ import annotations

import queue
import time

from chatapp import protocol as p


def load_result(client, events: queue.Queue, request: p.Load, timeout: float = 120):
    """What the worker answers to a Load: Loaded, Error or WorkerDied (the status lines before it are skipped)."""
    client.send(request)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(event, (p.Loaded, p.Error, p.WorkerDied)):
            return event
    raise AssertionError("the worker gave no answer to the Load")
