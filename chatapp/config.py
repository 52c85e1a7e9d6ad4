"""Settings: one TOML file in the user config dir, plus CHATAPP_* environment overrides."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError

APP_NAME = "chatapp"


def _default_config_dir() -> Path:
    from platformdirs import user_config_dir

    return Path(os.environ.get("CHATAPP_CONFIG_DIR") or user_config_dir(APP_NAME))


def _default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(os.environ.get("CHATAPP_DATA_DIR") or user_data_dir(APP_NAME))


@dataclass(frozen=True)
class Settings:
    """Every field can be set in config.toml; the CHATAPP_<FIELD> variable wins over the file."""

    #: Model used when none is named: a catalog key, Hub repo id, folder or .gguf file.
    default_model: str = "smollm2-135m-local"
    #: Preset used when none is named: auto, bf16, fp16, fp32, int8 or nf4.
    default_preset: str = "auto"
    #: Upper bound on the context the app uses, in tokens (0: the model's own maximum).
    context_cap: int = 0
    #: Generation defaults.
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 512
    #: Where converted models and (later) conversations live.
    data_dir: Path = field(default_factory=_default_data_dir)
    config_dir: Path = field(default_factory=_default_config_dir)

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def converted_dir(self) -> Path:
        return self.data_dir / "converted"


_ENV_PREFIX = "CHATAPP_"


def _coerce(name: str, kind: type, value: object, source: str) -> object:
    try:
        if kind is Path:
            return Path(str(value)).expanduser()
        if kind is int and isinstance(value, str):
            return int(value)
        if kind is float and isinstance(value, (str, int)):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{name}' must be {kind.__name__}, got {value!r}") from None


def load_settings(config_file: Path | None = None) -> Settings:
    """Defaults, then the TOML file, then the environment."""
    base = Settings()
    path = config_file or base.config_file
    kinds = {f.name: (Path if f.name.endswith("_dir") else type(getattr(base, f.name))) for f in fields(Settings)}
    values: dict[str, object] = {}
    if path.is_file():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        for key, value in raw.items():
            if key not in kinds:
                raise ConfigError(f"{path}: unknown setting '{key}' (known: {', '.join(sorted(kinds))})")
            values[key] = _coerce(key, kinds[key], value, str(path))
    for name, kind in kinds.items():
        env = os.environ.get(_ENV_PREFIX + name.upper())
        if env:
            values[name] = _coerce(name, kind, env, f"${_ENV_PREFIX}{name.upper()}")
    return replace(base, **values)
