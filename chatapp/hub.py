"""The Hugging Face Hub: fetch what loading a model needs into the standard HF cache."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .errors import HubError, ModelNotFound

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


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None):
    """Turn huggingface_hub's exceptions into our one-line errors."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubError(
            f"'{repo_id}' is gated: accept its license at https://huggingface.co/{repo_id}, "
            "then log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"unknown model '{repo_id}': no such repo on the Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(f"'{repo_id}' has no revision '{revision}'") from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"'{repo_id}' is not downloaded and the Hub can't be reached (offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except OSError as exc:
        raise HubError(f"talking to the Hub about '{repo_id}' failed: {str(exc).splitlines()[0]}") from None


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """The local snapshot folder of repo_id, downloading what's missing. Resumes interrupted downloads."""
    from huggingface_hub import snapshot_download

    patterns = allow_patterns(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def model_facts(repo_id: str, revision: str | None = None):
    """Planner facts from config.json (a few KB) and the safetensors headers: no weights are downloaded."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from .facts import facts_from_config

    with hub_errors(repo_id, revision):
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    return facts_from_config(repo_id, config, sum(metadata.parameter_count.values()))
