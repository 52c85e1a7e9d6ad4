"""Settings: one TOML file in the user config dir, plus CHATAPP_* environment overrides."""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError
from .sampling import LIMITS

APP_NAME = "chatapp"


def _default_config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(os.environ.get("CHATAPP_CONFIG_DIR") or user_config_dir(APP_NAME))


def _default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("CHATAPP_DATA_DIR") or user_data_dir(APP_NAME))


def _default_themes_dir() -> Path:
    return _default_config_dir() / "themes"


def config_file_path() -> Path:
    """The config.toml that load_settings reads when given none."""
    return _default_config_dir() / "config.toml"


@dataclass(frozen=True)
class Settings:
    """Every field can be set in config.toml; the CHATAPP_<FIELD> variable wins over the file."""

    #: Model used when none is named: a catalog key, Hub repo id, folder or .gguf file.
    default_model: str = "smollm2-135m-local"
    #: Preset used when none is named: auto, bf16, fp16, fp32, int8 or nf4.
    default_preset: str = "auto"
    #: Upper bound on the context the app uses, in tokens (0: the model's own maximum).
    context_cap: int = 0
    #: Sampling temperature, 0 to 2, when the model recommends none (0: greedy).
    temperature: float = LIMITS["temperature"].default
    #: Nucleus sampling cutoff, above 0 and at most 1, when the model recommends none.
    top_p: float = LIMITS["top_p"].default
    #: Sample from the k likeliest tokens only (0: off), when the model recommends nothing.
    top_k: int = LIMITS["top_k"].default
    #: Drop tokens less likely than this times the likeliest one, 0 to 1 (0: off), when the model recommends nothing.
    min_p: float = LIMITS["min_p"].default
    #: Above 1 makes tokens already in the chat less likely, above 0 and at most 3 (1: off).
    repetition_penalty: float = LIMITS["repetition_penalty"].default
    #: Reply length cap in tokens.
    max_new_tokens: int = LIMITS["max_new_tokens"].default
    #: Seed for sampled replies: the same seed gives the same reply to the same chat (unset: a fresh one each time).
    seed: int | None = None
    #: The UI theme: a shipped one (chatapp-dark, chatapp-light, chatapp-high-contrast, chatapp-dusk)
    #: or one from themes_dir.
    theme: str = "chatapp-dark"
    #: Where converted models, the chat database (chatapp.db), exports and the worker log live.
    data_dir: Path = field(default_factory=_default_data_dir)
    #: Where config.toml and models.toml live.
    config_dir: Path = field(default_factory=_default_config_dir)
    #: Extra UI themes, one *.toml file each (default: the themes folder in config_dir).
    themes_dir: Path = field(default_factory=_default_themes_dir)
    #: GB of disk for chats' KV cache snapshots, which spare re-reading a chat after a restart or a switch
    #: (0: off). Never more than a quarter of the free disk; the least recently used go first.
    kv_disk_budget: float = 10.0
    #: Where downloaded models go (empty: huggingface_hub's own default, from HF_HUB_CACHE or HF_HOME).
    hub_cache: Path | None = None
    #: An OpenAI-compatible server to chat through instead of the local worker, e.g. http://gpu-box:8000/v1
    #: (empty: the local worker). Its API key comes from $CHATAPP_API_KEY or the system keyring, never from here.
    backend_url: str = ""

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def converted_dir(self) -> Path:
        return self.data_dir / "converted"


@functools.cache
def field_docs() -> dict[str, str]:
    """Each Settings field's `#:` comment, read from the source so the text lives in one place."""
    try:
        source = inspect.getsource(Settings)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


_ENV_PREFIX = "CHATAPP_"


def _kind(f) -> type:
    # Annotations are strings here (from __future__ import annotations), and the Path fields have factories.
    return Path if "Path" in str(f.type) else type(f.default)


def _optional(f) -> bool:
    return "None" in str(f.type)


def _coerce(kind: type, optional: bool, value: object) -> object:
    """The value as `kind`; raises ValueError with the reason."""
    if isinstance(value, str) and value == "" and optional:
        return None
    try:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError
        if kind is Path:
            if not isinstance(value, str):
                raise TypeError
            return Path(value).expanduser()
        if kind is int and isinstance(value, str):
            return int(value)
        if kind is float and isinstance(value, (str, int)):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError
        return value
    except (TypeError, ValueError):
        what = "a path" if kind is Path else kind.__name__
        raise ValueError(f"must be {what}, got {value!r}") from None


def _presets() -> tuple[str, ...]:
    from .planner import PRESETS  # the planner is plain Python; importing it here costs nothing at startup

    return PRESETS


# Per-key checks after the type is right: (accepts the value, the rule in words).
_RULES = {
    "default_model": (lambda v: bool(v.strip()), "must not be empty"),
    "default_preset": (lambda v: v in _presets(), lambda: f"must be one of {', '.join(_presets())}"),
    "context_cap": (lambda v: v >= 0, "must be >= 0 (0: the model's own maximum)"),
    **{name: (lambda v, limit=limit: v is None or limit.accepts(v), limit.rule()) for name, limit in LIMITS.items()},
    "theme": (lambda v: bool(v.strip()), "must not be empty"),
    "backend_url": (
        lambda v: not v or (v.startswith(("http://", "https://")) and len(v.split("//", 1)[1]) > 0),
        "must be empty or an http:// or https:// URL",
    ),
}


def _check(name: str, value: object, given: object) -> None:
    rule = _RULES.get(name)
    if rule and not rule[0](value):
        words = rule[1]() if callable(rule[1]) else rule[1]
        raise ValueError(f"{words}, got {given!r}")  # what the user wrote, not our float of it


def format_value(value: object) -> str:
    """A value as it would be written in config.toml (unset is the empty string)."""
    if value is None:
        return '""'
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    return repr(value)


def _show_default(value: object) -> str:
    return "unset" if value is None else format_value(value)


def load_settings_sourced(
    config_file: Path | None = None, strict: bool = False
) -> tuple[Settings, list[str], dict[str, str]]:
    """Like load_settings_checked (or, if strict, load_settings), plus where each field's value came from:
    default, the file's name or $CHATAPP_X."""
    return _load(config_file, strict=strict)


def load_settings_checked(config_file: Path | None = None) -> tuple[Settings, list[str]]:
    """Defaults, then the TOML file, then the environment; a bad value gives one error line and its default."""
    settings, errors, _sources = _load(config_file, strict=False)
    return settings, errors


def load_settings(config_file: Path | None = None) -> Settings:
    """Defaults, then the TOML file, then the environment; raises ConfigError at the first bad value."""
    return _load(config_file, strict=True)[0]


def _load(config_file: Path | None, strict: bool) -> tuple[Settings, list[str], dict[str, str]]:
    base = Settings()
    path = config_file or config_file_path()
    specs = {f.name: f for f in fields(Settings)}
    values: dict[str, object] = {}
    sources = {name: "default" for name in specs}
    errors: list[str] = []

    def reject(message: str, fallback: str) -> None:
        if strict:
            raise ConfigError(message)
        errors.append(f"{message}; {fallback}")

    def take(source: str, label: str, name: str, value: object) -> None:
        spec = specs[name]
        try:
            coerced = _coerce(_kind(spec), _optional(spec), value)
            _check(name, coerced, value)
        except ValueError as exc:
            reject(f"{source}: '{name}' {exc}", f"using the default ({_show_default(getattr(base, name))})")
            return
        values[name] = coerced
        sources[name] = label

    raw: dict[str, object] = {}
    if path.is_file():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            reject(f"{path}: not valid TOML ({exc})", "using the defaults")
    for key, value in raw.items():
        if key in specs:
            take(str(path), path.name, key, value)
        else:
            reject(f"{path}: unknown setting '{key}' (known: {', '.join(sorted(specs))})", "ignored")
    for name in specs:
        env_name = _ENV_PREFIX + name.upper()
        env = os.environ.get(env_name)
        if env:
            take(f"${env_name}", f"${env_name}", name, env)
    if "config_dir" in values and "themes_dir" not in values:
        # The themes folder follows a config_dir moved by the file, as it does one moved by the environment.
        values["themes_dir"] = Path(values["config_dir"]) / "themes"
    return replace(base, **values), errors, sources


_FOLDERS = {"data_dir": "data folder", "config_dir": "config folder"}


def check_folders(settings: Settings, sources: dict[str, str] | None = None) -> None:
    """Raise ConfigError, in one line, when the data or config folder can't be used: checked up front, so the
    user hears it once and by name instead of as a traceback from whichever file is written first. Makes nothing."""
    for name, label in _FOLDERS.items():
        path = Path(getattr(settings, name)).absolute()
        # Only saving settings writes to the config folder, and it says so itself if it can't.
        problem = _folder_problem(path, need_write=name == "data_dir")
        if problem:
            source = (sources or {}).get(name, "default")
            origin = "" if source == "default" else f" (set by {source})"
            raise ConfigError(
                f"the {label} {path}{origin} {problem}; fix that, or choose another folder with {name} in "
                f"config.toml or ${_ENV_PREFIX}{name.upper()}"
            )


def _folder_problem(path: Path, need_write: bool) -> str | None:
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    nearest = path
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        return f"can't be made: {nearest} is a file, not a folder"
    if need_write and not os.access(nearest, os.W_OK | os.X_OK):
        return "can't be written to" if nearest == path else f"can't be made: {nearest} can't be written to"
    return None


def parse_setting(name: str, text: str) -> object:
    """A value typed into a form, checked as config.toml's would be; ValueError says why it is refused."""
    spec = {f.name: f for f in fields(Settings)}[name]
    value = _coerce(_kind(spec), _optional(spec), text.strip())
    _check(name, value, text)
    return value


def save_setting(config_file: Path, key: str, value: str | int | float) -> None:
    """Set one top-level key in config.toml, keeping every other line (comments included)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        raise ValueError(f"not a bare TOML key: {key!r}")
    # A JSON string is a valid TOML basic string, once DEL (which JSON leaves bare and TOML forbids) is escaped.
    literal = json.dumps(value).replace("\x7f", "\\u007f")
    text = config_file.read_text(encoding="utf-8") if config_file.is_file() else ""
    lines = text.splitlines()
    # Only the lines before the first [table] are top level; a key after it would belong to that table.
    first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    assignment = re.compile(rf"""^(\s*){re.escape(key)}(\s*=\s*)("(?:[^"\\]|\\.)*"|'[^']*'|[^\s#]*)(\s*(?:#.*)?)$""")
    for i in range(first_table):
        match = assignment.match(lines[i])
        if match:
            indent, equals, _old, rest = match.groups()
            lines[i] = f"{indent}{key}{equals}{literal}{rest}"
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            lines[i] = f"{key} = {literal}"  # a value we can't parse on one line: replace the whole line
            break
    else:
        lines.insert(first_table, f"{key} = {literal}")
    config_file.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a crash never leaves half a config file.
    tmp = config_file.with_name(config_file.name + ".tmp")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(config_file)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old file, and no half-written one beside it
        raise
