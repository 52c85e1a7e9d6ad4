"""Sampling parameters: the one table of their defaults and bounds, and the values a reply is generated with.

config.toml, the chat-settings dialog, the CLI flags, the protocol and the engine all check against LIMITS,
so a value accepted in one place is accepted everywhere. Plain Python: the UI imports it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    """A parameter's default and its allowed range (low_open: the low end itself is excluded)."""

    default: float | int | None
    low: float | int
    high: float | int | None = None
    low_open: bool = False
    #: int or float: what a typed value is read as.
    kind: type = float
    #: One line for forms and --help.
    help: str = ""

    def accepts(self, value: float | int) -> bool:
        if isinstance(value, bool) or (self.kind is int and not isinstance(value, int)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def rule(self) -> str:
        """The range in words, e.g. 'must be > 0 and <= 1'."""
        whole = "a whole number " if self.kind is int else ""
        low = f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"must be {whole}{low} and <= {self.high:g}" if self.high is not None else f"must be {whole}{low}"


#: Every sampling parameter: its default and bounds. Temperature 0 means greedy decoding; top_k 0, min_p 0 and
#: repetition_penalty 1 switch their filter off; no seed draws a fresh one for each reply.
LIMITS: dict[str, Limit] = {
    "temperature": Limit(0.7, 0.0, 2.0, help="0 means greedy"),
    "top_p": Limit(0.9, 0.0, 1.0, low_open=True, help="nucleus: sample from the likeliest tokens holding this mass"),
    "top_k": Limit(0, 0, 1000, kind=int, help="sample from the k likeliest tokens (0: off)"),
    "min_p": Limit(0.0, 0.0, 1.0, help="drop tokens less likely than this times the likeliest one (0: off)"),
    "repetition_penalty": Limit(
        1.0, 0.0, 3.0, low_open=True, help="above 1 makes tokens already in the chat less likely (1: off)"
    ),
    "max_new_tokens": Limit(512, 1, kind=int, help="reply length cap in tokens"),
    "seed": Limit(None, 0, 2**63 - 1, kind=int, help="the same seed gives the same sampled reply (empty: random)"),
}

#: Where a value came from, most specific first, as resolve_with_sources names them.
SOURCES = ("chat", "persona", "model", "config", "default")


def check(name: str, value: float | int) -> None:
    """Raise ValueError naming the parameter and its range when value is outside it."""
    limit = LIMITS[name]
    if not limit.accepts(value):
        raise ValueError(f"{name} {limit.rule()}, got {value!r}")


def parse(name: str, text: str) -> float | int | None:
    """A typed value for `name` ('' is None: not set); ValueError with the rule when it isn't one."""
    text = text.strip()
    if not text:
        return None
    limit = LIMITS[name]
    try:
        value = limit.kind(text)
    except ValueError:
        raise ValueError(
            f"{name} must be {'a whole number' if limit.kind is int else 'a number'}, got {text!r}"
        ) from None
    check(name, value)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """What one reply is generated with; checked against LIMITS when made."""

    max_new_tokens: int = LIMITS["max_new_tokens"].default
    temperature: float = LIMITS["temperature"].default
    top_p: float = LIMITS["top_p"].default
    top_k: int = LIMITS["top_k"].default
    min_p: float = LIMITS["min_p"].default
    repetition_penalty: float = LIMITS["repetition_penalty"].default
    #: Seeds a sampled reply so that it can be reproduced; None draws a fresh seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in LIMITS:
            value = getattr(self, name)
            if value is not None or LIMITS[name].default is not None:
                check(name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalised(self) -> bool:
        """A repetition penalty depends on every token before the one sampled, drafts included."""
        return self.repetition_penalty != 1.0


DEFAULTS = SamplingParams()
GREEDY = SamplingParams(temperature=0.0)


def _value(layer: object, name: str):
    return layer.get(name) if isinstance(layer, dict) else getattr(layer, name, None)


#: What generation_config.json can recommend, by our names (transformers uses the same ones).
MODEL_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_defaults(generation: dict, spec: object = None) -> dict[str, float | int]:
    """A model's own sampling defaults: its generation_config.json values (a dict of them), with the catalog
    entry's over them. do_sample false means greedy, as model.generate reads it. Values outside LIMITS are left
    out, so a model's odd choice falls back to ours instead of failing every reply."""
    values: dict[str, float | int] = {}
    for name in MODEL_FIELDS:
        value = _value(spec, name) if spec is not None else None
        if value is None:
            value = generation.get(name)
        if value is None and name == "temperature" and generation.get("do_sample") is False:
            value = 0.0
        if value is not None and not isinstance(value, bool) and LIMITS[name].accepts(value):
            values[name] = value
    return values


def resolve_with_sources(layers: list[tuple[str, object]], seed: int | None = None):
    """(SamplingParams, {name: source}): each parameter from the first layer that sets it (not None), else the
    table's default. Layers are (source, object or dict) pairs, most specific first, e.g. ("chat", settings),
    ("persona", persona), ("model", the model's defaults), ("config", settings). A seed given here wins."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name in LIMITS:
        sources[name] = "default"
        for source, layer in layers:
            value = _value(layer, name)
            if value is not None:
                values[name], sources[name] = value, source
                break
    if seed is not None:
        values["seed"], sources["seed"] = seed, "chat"
    return SamplingParams(**values), sources


def resolve(*layers: object, seed: int | None = None) -> SamplingParams:
    """Each parameter from the first layer that sets it (not None), else the table's default; layers as in
    resolve_with_sources, without their names."""
    return resolve_with_sources([("", layer) for layer in layers], seed)[0]
