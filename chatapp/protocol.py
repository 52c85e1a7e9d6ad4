"""Plain dataclasses passed between the engine and its callers (and, later, between UI and worker)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FINISH_REASONS = ("stop", "length", "cancelled", "overflow-trimmed")


@dataclass
class TurnStats:
    #: Length of the rendered conversation the reply was conditioned on.
    prompt_tokens: int
    #: Tokens run through the model before the first new token (history reused from the cache is not counted).
    prefilled_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    #: Tokens held in the KV cache when the turn ended.
    cache_tokens: int
    #: stop, length, cancelled, or overflow-trimmed (older turns were dropped to fit the context).
    finish_reason: str
    #: How many old messages were dropped from the context this turn (0 unless finish_reason says so).
    trimmed_messages: int = 0

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens

    def as_dict(self) -> dict:
        return asdict(self)
