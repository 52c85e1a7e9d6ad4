"""UI themes: TOML files, one per textual Theme, shipped in chatapp/data/themes/ plus the user's themes_dir."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.css.constants import VALID_STYLE_FLAGS
from textual.theme import BUILTIN_THEMES, Theme

from ..errors import ConfigError

#: Package data, read through importlib.resources so an installed wheel finds it.
SHIPPED_THEMES_DIR: Traversable = files("chatapp") / "data" / "themes"
DEFAULT_THEME = "chatapp-dark"
# Textual's fallback when even our default is missing (a broken install); it is always registered.
_LAST_RESORT = "textual-dark"

_COLOR_FIELDS = (
    "primary",
    "secondary",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
    "warning",
    "error",
    "success",
)
_BOOL_FIELDS = ("dark", "ansi")
_NUMBER_FIELDS = ("luminosity_spread", "text_alpha")
_KNOWN = [f.name for f in dataclasses.fields(Theme)]
# Textual puts the name in a CSS class (-theme-<name>) and splits theme lists on commas.
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def load_theme_file(path: Path | Traversable) -> Theme:
    """One theme file as a Theme; ConfigError names the file and what is wrong with it."""
    try:
        raw = tomllib.loads((Path(path) if isinstance(path, str) else path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: can't be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    for key in raw:
        if key not in _KNOWN:
            raise ConfigError(f"{path}: unknown field '{key}' (known: {', '.join(_KNOWN)})")
    for key in ("name", "primary"):
        if key not in raw:
            raise ConfigError(f"{path}: missing field '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{path}: 'name' must be letters, digits, '-' or '_' (starting with a letter), got {name!r}")
    for key in _COLOR_FIELDS:
        if key in raw:
            _check_color(path, key, raw[key])
    for key in _BOOL_FIELDS:
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"{path}: '{key}' must be true or false, got {raw[key]!r}")
    for key in _NUMBER_FIELDS:
        value = raw.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"{path}: '{key}' must be a number from 0 to 1, got {value!r}")
    variables = raw.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ConfigError(f'{path}: [variables] must be a table of strings, like "border" = "#ffcc00"')
    for key, value in variables.items():
        _check_variable(path, key, value)
    theme = Theme(**raw)
    try:
        # Builds every derived shade: whatever Textual itself would choke on when the theme is applied.
        theme.to_color_system().generate()
    except Exception as exc:  # any failure here is this file's fault, so it is reported as one line
        raise ConfigError(f"{path}: Textual can't use this theme ({exc})") from None
    return theme


def _check_color(path: Path, key: str, value: object) -> None:
    if isinstance(value, str):
        try:
            Color.parse(value)
            return
        except ColorParseError:
            pass
    raise ConfigError(f"{path}: '{key}' is not a colour: {value!r} (use '#rrggbb', 'rgb(r, g, b)' or a colour name)")


# Textual's own variables and their defaults, to tell its colour variables from its style ones.
_TEXTUAL_VARIABLES = Theme(name="reference", primary="#0178d4").to_color_system().generate()
_ALPHA_SUFFIX = re.compile(r"^(.*?)(?:\s+\d+(?:\.\d+)?%)?$")


def _check_variable(path: Path, key: str, value: str) -> None:
    # A bad variable would otherwise stop the app with a stylesheet error when the theme is applied.
    if key.endswith("-style"):
        words = value.split()
        if not words or any(word not in VALID_STYLE_FLAGS for word in words):
            raise ConfigError(
                f"{path}: variable '{key}' must be text styles ({', '.join(sorted(VALID_STYLE_FLAGS))}), got {value!r}"
            )
        return
    if key not in _TEXTUAL_VARIABLES:
        return  # the app's own variable: its stylesheet decides what fits
    color = _ALPHA_SUFFIX.match(value.strip()).group(1)
    if color in ("auto", "initial", "transparent"):
        return
    try:
        Color.parse(color)
    except ColorParseError:
        raise ConfigError(
            f"{path}: variable '{key}' is not a colour: {value!r} "
            "(use '#rrggbb', optionally followed by an opacity like '35%')"
        ) from None


def load_themes(*dirs: Path | Traversable | None) -> tuple[list[Theme], list[str]]:
    """Every *.toml theme in each folder, in order (a later theme of the same name wins), and one line per bad file.

    A folder that doesn't exist holds no themes (the user's is optional); None is skipped likewise.
    """
    themes: dict[str, Theme] = {}
    errors: list[str] = []
    for folder in dirs:
        if isinstance(folder, str):
            folder = Path(folder)
        # A Traversable (the shipped folder) has is_dir/is_file/iterdir but no exists or glob.
        if folder is None or not (folder.is_dir() or folder.is_file()):
            continue
        if not folder.is_dir():
            errors.append(f"{folder}: not a folder of theme files")
            continue
        defined_here: dict[str, Path | Traversable] = {}
        tomls = [p for p in folder.iterdir() if p.name.endswith(".toml") and p.is_file()]
        for path in sorted(tomls, key=lambda p: p.name):
            try:
                theme = load_theme_file(path)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            if theme.name in defined_here:
                errors.append(
                    f"{path}: theme '{theme.name}' is also defined by {defined_here[theme.name].name}; using this file"
                )
            defined_here[theme.name] = path
            themes[theme.name] = theme
    return list(themes.values()), errors


def register_themes(app, user_dir: Path | None) -> list[str]:
    """Register the shipped themes, then the user's (which may replace them); returns one line per problem."""
    themes, errors = load_themes(SHIPPED_THEMES_DIR, user_dir)
    for theme in themes:
        app.register_theme(theme)
    if DEFAULT_THEME not in app.available_themes:
        errors.append(
            f"{SHIPPED_THEMES_DIR}: the default theme '{DEFAULT_THEME}' is missing; using Textual's '{_LAST_RESORT}'"
        )
    return errors


def resolve_theme(name: str, available: Iterable[str]) -> tuple[str, str | None]:
    """The theme to use for `name`, and a line saying why it isn't `name` (None when it is)."""
    names = set(available)
    if name in names:
        return name, None
    fallback = DEFAULT_THEME if DEFAULT_THEME in names else _LAST_RESORT
    # Textual's own twenty-odd themes would drown ours in the message; they are named only as a group.
    ours = ", ".join(sorted(n for n in names if n not in BUILTIN_THEMES))
    return fallback, f"unknown theme '{name}' (try {ours} or one of Textual's own); using {fallback}"
