"""Sampling parameters: the one table of their defaults and bounds, and the values a reply is generated with.

config.toml, the chat-settings dialog, the CLI flags, the protocol and the engine all check against LIMITS,
so a value accepted in one place is accepted everywhere. Plain Python: the UI imports it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limit:
    """A parameter's default and its allowed range (low_open: the low end itself is excluded)."""

    default: float | int
    low: float | int
    high: float | int | None = None
    low_open: bool = False

    def accepts(self, value: float | int) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def rule(self) -> str:
        """The range in words, e.g. 'must be > 0 and <= 1'."""
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"must be {low} and <= {self.high:g}" if self.high is not None else f"must be {low}"


#: Every sampling parameter with a default. Temperature 0 means greedy decoding.
LIMITS: dict[str, Limit] = {
    "temperature": Limit(0.7, 0.0, 2.0),
    "top_p": Limit(0.9, 0.0, 1.0, low_open=True),
    "max_new_tokens": Limit(512, 1),
}


def check(name: str, value: float | int) -> None:
    """Raise ValueError naming the parameter and its range when value is outside it."""
    limit = LIMITS[name]
    if not limit.accepts(value):
        raise ValueError(f"{name} {limit.rule()}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """What one reply is generated with; checked against LIMITS when made."""

    max_new_tokens: int = LIMITS["max_new_tokens"].default
    temperature: float = LIMITS["temperature"].default
    top_p: float = LIMITS["top_p"].default
    #: Seeds a sampled reply so that it can be reproduced; None draws a fresh seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in LIMITS:
            check(name, getattr(self, name))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


DEFAULTS = SamplingParams()
GREEDY = SamplingParams(temperature=0.0)


def resolve(*layers: object, seed: int | None = None) -> SamplingParams:
    """Each parameter from the first layer that sets it (not None), else the table's default.

    Layers are objects or dicts with some of the parameter names, most specific first: for example the
    chat's own settings, then the model's recommendation, then config.toml.
    """
    values: dict[str, object] = {}
    for f in fields(SamplingParams):
        if f.name == "seed":
            continue
        for layer in layers:
            value = layer.get(f.name) if isinstance(layer, dict) else getattr(layer, f.name, None)
            if value is not None:
                values[f.name] = value
                break
    return SamplingParams(**values, seed=seed)
