"""Personas: a named system prompt plus sampling settings (and thinking on or off), one TOML file each.

A few ship in the package (chatapp/data/personas); the user's live in <config_dir>/personas and win over a
shipped one of the same file name. A chat names its persona; a reply takes the chat's own settings first,
then the persona's, then the model's, then config.toml's (sampling.resolve_with_sources). Plain Python.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from .private import write_private_text
from .sampling import LIMITS

SHIPPED_DIR: Traversable = files("chatapp") / "data" / "personas"
#: A persona's key is its file name without .toml: letters, digits, - and _.
KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TEXT_FIELDS = ("name", "description", "system_prompt")


@dataclass(frozen=True)
class Persona:
    key: str
    name: str
    description: str = ""
    system_prompt: str = ""
    #: Only the sampling values it sets (sampling.LIMITS names); the rest come from the model or config.
    sampling: dict = field(default_factory=dict)
    #: Thinking on or off where the model's template has the switch; None: the template's default.
    thinking: bool | None = None
    #: Shipped with chatapp and not overridden: editing it saves a copy in the user's folder.
    shipped: bool = False


def personas_dir(config_dir: Path) -> Path:
    return Path(config_dir) / "personas"


def parse(key: str, text: str, shipped: bool = False) -> Persona:
    """A persona from its file's text; ValueError with the reason in one line."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML ({exc})") from None
    values: dict = {}
    sampling: dict = {}
    for name, value in table.items():
        if name in _TEXT_FIELDS:
            if not isinstance(value, str):
                raise ValueError(f"'{name}' must be text, got {value!r}")
            values[name] = value.strip()
        elif name == "thinking":
            if not isinstance(value, bool):
                raise ValueError(f"'thinking' must be true or false, got {value!r}")
            values[name] = value
        elif name in LIMITS:
            limit = LIMITS[name]
            if limit.kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not limit.accepts(value):
                raise ValueError(f"'{name}' {limit.rule()}, got {value!r}")
            sampling[name] = value
        else:
            known = ", ".join([*_TEXT_FIELDS, "thinking", *LIMITS])
            raise ValueError(f"unknown key '{name}' (known: {known})")
    if not values.get("name"):
        raise ValueError("'name' is missing")
    return Persona(key=key, sampling=sampling, shipped=shipped, **values)


def load_personas(config_dir: Path) -> tuple[dict[str, Persona], list[str]]:
    """Every persona by key, sorted by name, and one line for each file that couldn't be used (it is skipped)."""
    found: dict[str, Persona] = {}
    errors: list[str] = []
    sources: list[tuple[Traversable | Path, bool]] = [(SHIPPED_DIR, True), (personas_dir(config_dir), False)]
    for folder, shipped in sources:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".toml"):
                continue
            key = entry.name.removesuffix(".toml")
            try:
                if not KEY.fullmatch(key):
                    raise ValueError("the file name must be letters, digits, - or _ before .toml")
                found[key] = parse(key, entry.read_text(encoding="utf-8"), shipped)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                errors.append(f"persona {entry}: {reason}; skipped")
    return dict(sorted(found.items(), key=lambda item: item[1].name.casefold())), errors


def to_toml(persona: Persona) -> str:
    """The file's text. JSON strings are TOML basic strings once DEL is escaped."""

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        return repr(value)

    lines = [f"{name} = {literal(getattr(persona, name))}" for name in _TEXT_FIELDS if getattr(persona, name)]
    if persona.thinking is not None:
        lines.append(f"thinking = {literal(persona.thinking)}")
    lines += [f"{name} = {literal(persona.sampling[name])}" for name in LIMITS if name in persona.sampling]
    return "\n".join(lines) + "\n"


def save_persona(config_dir: Path, persona: Persona) -> Path:
    """Write the persona into the user's folder (a shipped one becomes the user's copy); OSError if it can't."""
    if not KEY.fullmatch(persona.key):
        raise ValueError(f"a persona's key must be letters, digits, - or _, got {persona.key!r}")
    folder = personas_dir(config_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{persona.key}.toml"
    write_private_text(path, to_toml(persona))
    return path


def delete_persona(config_dir: Path, key: str) -> bool:
    """Remove the user's file for `key`; False when there is none (a shipped persona can't be deleted)."""
    path = personas_dir(config_dir) / f"{key}.toml"
    if not KEY.fullmatch(key) or not path.is_file():
        return False
    path.unlink()
    return True


def free_key(taken, base: str) -> str:
    """A key made from `base` that isn't in `taken`: base, base-2, base-3..."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", base.strip().lower()).strip("-")[:56] or "persona"
    key, n = stem, 1
    while key in taken:
        n += 1
        key = f"{stem}-{n}"
    return key


def copy_of(persona: Persona, taken) -> Persona:
    """A duplicate under a free key, named as a copy, that the user owns."""
    return replace(persona, key=free_key(taken, persona.key), name=f"{persona.name} (copy)", shipped=False)
