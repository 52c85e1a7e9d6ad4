"""The Hugging Face Hub: errors in one line, search, list and delete local models. Downloads: hub_download.py."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ChatappError, HubError, ModelNotFound, first_line

#: Only what loading needs: no duplicate .bin/.gguf/onnx weights.
ALLOW_PATTERNS = (
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
)


def allow_patterns(*, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[str]:
    patterns = list(ALLOW_PATTERNS)
    if allow_pickle:
        patterns.append("*.bin")
    if trust_remote_code:
        patterns.append("*.py")
    return patterns


def offline_error(repo_id: str) -> HubError:
    return HubError(f"'{repo_id}' is not downloaded and the Hub can't be reached (offline, or HF_HUB_OFFLINE=1)")


def is_network_error(exc: BaseException) -> bool:
    """Connection failures come from whichever HTTP library huggingface_hub uses underneath (httpx2 in 2.4)."""
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "h11", "requests", "urllib3")


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def token_source() -> str:
    """Where the token huggingface_hub sends comes from, in words for an error message."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name, "").strip():
            return f"the {name} environment variable"
    if Path(constants.HF_TOKEN_PATH).is_file():
        return f"the saved login ({constants.HF_TOKEN_PATH})"
    return "huggingface_hub's login"


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None):
    """Turn huggingface_hub's exceptions into our one-line errors."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        yield
    except ChatappError:
        raise
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id, revision) from None
    except LocalEntryNotFoundError:
        raise offline_error(repo_id) from None
    except OSError as exc:
        raise HubError(f"talking to the Hub about '{repo_id}' failed: {first_line(exc)}") from None
    except Exception as exc:
        if is_network_error(exc):
            from huggingface_hub import constants

            raise HubError(f"can't reach the Hub at {constants.ENDPOINT} ({type(exc).__name__})") from None
        raise


def _http_error(exc, repo_id: str, revision: str | None) -> ChatappError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(exc.response, "status_code", None)
    if status == 401 and _token() is not None:
        # The Hub answers 401 to a token it doesn't know, on every route, even a public repo's: that is the fault
        # to name, not the gate or the missing repo it would otherwise look like.
        return HubError(
            f"the Hub rejected the token from {token_source()} (HTTP 401) while asking about '{repo_id}': "
            "it is invalid or expired; set a valid one, unset it, or log in again with `hf auth login`"
        )
    if isinstance(exc, GatedRepoError):
        return HubError(
            f"'{repo_id}' is gated: accept its license at https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` or set HF_TOKEN"
        )
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401:
            return HubError(
                f"'{repo_id}' is not on the Hub, or it is private or gated and needs a login: "
                f"accept its license at https://huggingface.co/{repo_id}, then `hf auth login` or set HF_TOKEN"
            )
        return ModelNotFound(
            f"unknown model '{repo_id}': no such repo on the Hub (or it is private: log in with `hf auth login`)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelNotFound(f"'{repo_id}' has no revision '{revision}'")
    if status in (401, 403):
        # A gated or private repo that didn't say so with X-Error-Code: the fix is the same.
        return HubError(
            f"the Hub refused access to '{repo_id}' (HTTP {status}): if it is gated, accept its license at "
            f"https://huggingface.co/{repo_id}; log in with `hf auth login` or set HF_TOKEN"
        )
    return HubError(f"talking to the Hub about '{repo_id}' failed: {first_line(exc)}")


def matching(filename: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(filename, p) for p in patterns)


#: Any one of these is enough for AutoTokenizer to build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken", "tiktoken.model")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def missing_for_loading(names: set[str], shards: set[str] = frozenset(), *, allow_pickle: bool = True) -> str | None:
    """What a set of repo files lacks before a model can load from it, in words, or None when nothing is missing.

    shards: the files a weight index names (a sharded model), which must all be there too.
    """
    if "config.json" not in names:
        return "config.json"
    if lost := sorted(shards - names):
        return f"{lost[0]} (one of {len(shards)} weight shards)"
    weights = ["*.safetensors", "*.bin"] if allow_pickle else ["*.safetensors"]
    if not any(matching(n, weights) and not n.endswith(".index.json") for n in names):
        return "weights (*.safetensors)"
    if not any(matching(Path(n).name, list(TOKENIZER_FILES)) for n in names):
        return "tokenizer (tokenizer.json or tokenizer.model)"
    return None


def pickle_only(label: str, filename: str) -> str:
    return (
        f"'{label}' has only pickle weights ({filename}), which can run code when loaded; "
        "pass --allow-pickle if you trust it"
    )


def folder_missing(folder: Path, *, allow_pickle: bool = True) -> str | None:
    """missing_for_loading for a local folder: a snapshot that some other tool filled only in part (a config read
    for planning) is not a model yet."""
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}  # is_file: no dangling links
    shards: set[str] = set()
    for index in WEIGHT_INDEXES:
        if index in names:
            try:
                shards |= set(json.loads((folder / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"readable {index}"
    return missing_for_loading(names, shards, allow_pickle=allow_pickle)


@dataclass(frozen=True)
class LocalModel:
    repo_id: str
    revisions: tuple[str, ...]
    size_bytes: int
    path: Path


def list_local() -> list[LocalModel]:
    """Models in the standard HF cache that can load (some snapshot has config, weights and tokenizer), biggest
    first. A snapshot that holds only what another tool read (config.json for a plan) is not listed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    models = [
        LocalModel(r.repo_id, tuple(sorted(rev.commit_hash[:12] for rev in r.revisions)), r.size_on_disk, r.repo_path)
        for r in info.repos
        if r.repo_type == "model" and any(folder_missing(rev.snapshot_path) is None for rev in r.revisions)
    ]
    return sorted(models, key=lambda m: -m.size_bytes)


def delete(repo_id: str) -> int:
    """Delete every cached revision of repo_id through huggingface_hub's own strategy; the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        info = None
    repo = next((r for r in (info.repos if info else ()) if r.repo_id == repo_id and r.repo_type == "model"), None)
    if repo is None:
        raise ModelNotFound(f"'{repo_id}' is not downloaded (see `chatapp models --local`)")
    strategy = info.delete_revisions(*(rev.commit_hash for rev in repo.revisions))
    freed = strategy.expected_freed_size
    strategy.execute()
    shutil.rmtree(repo.repo_path, ignore_errors=True)  # refs and .incomplete leftovers
    return freed


@dataclass(frozen=True)
class SearchResult:
    repo_id: str
    params: int | None
    gated: bool
    downloads: int
    last_modified: str


def search(text: str, limit: int = 20) -> list[SearchResult]:
    """Text-generation models on the Hub matching text, most downloaded first."""
    from huggingface_hub import HfApi

    with hub_errors(text):
        models = list(
            HfApi().list_models(
                search=text,
                pipeline_tag="text-generation",
                sort="downloads",
                limit=limit,
                expand=["safetensors", "gated", "downloads", "lastModified"],
            )
        )
    return [
        SearchResult(
            repo_id=m.id,
            params=getattr(getattr(m, "safetensors", None), "total", None),
            gated=bool(m.gated),
            downloads=int(m.downloads or 0),
            last_modified=str(m.last_modified or "")[:10],
        )
        for m in models
    ]


def model_facts(repo_id: str, revision: str | None = None):
    """Planner facts from config.json (a few KB) and the safetensors headers: no weights are downloaded."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from .facts import facts_from_config, read_config

    with hub_errors(repo_id, revision):
        config = read_config(Path(hf_hub_download(repo_id, "config.json", revision=revision)))
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    return facts_from_config(repo_id, config, sum(metadata.parameter_count.values()))
