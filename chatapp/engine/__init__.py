"""The engine: torch + transformers live here and nowhere else in chatapp. It never imports textual."""

from .loader import LoadedModel, load_model
from .session import ChatSession, Message

__all__ = ["ChatSession", "LoadedModel", "Message", "load_model"]
