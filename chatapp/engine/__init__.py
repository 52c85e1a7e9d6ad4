"""The engine: torch + transformers live here and nowhere else in chatapp. It never imports textual.

The names below load lazily, so `chatapp.engine.worker` can be named as a child process's entry point by a
parent that must not import torch itself (the UI).
"""

__all__ = ["ChatSession", "LoadedModel", "Message", "load_model"]


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model"):
        from . import loader

        return getattr(loader, name)
    if name in ("ChatSession", "Message"):
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'chatapp.engine' has no attribute {name!r}")
