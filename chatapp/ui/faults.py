"""A write the conversation database had no room for: one line, and the screen goes on with nothing lost."""

from __future__ import annotations

import functools
import inspect

from ..store import StoreFull


async def _noting_disk_full(widget, fn, args, kwargs) -> None:
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            await result
    except StoreFull as exc:  # the store rolled the write back whole, so trying again later is safe
        widget.notify(str(exc), severity="error", timeout=10)


def unless_disk_full(method):
    """A screen's action whose StoreFull becomes a notification."""

    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        await _noting_disk_full(self, method, (self, *args), kwargs)

    return guarded


def noting_disk_full(widget, callback):
    """A dialog's callback whose StoreFull becomes a notification on `widget`."""

    async def guarded(*args, **kwargs):
        await _noting_disk_full(widget, callback, args, kwargs)

    return guarded
