"""The Hugging Face Hub: fetch what loading a model needs into the standard HF cache."""

from __future__ import annotations

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


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """The local snapshot folder of repo_id, downloading what's missing. Resumes interrupted downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = allow_patterns(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
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
        raise HubError(f"downloading '{repo_id}' failed: {exc}") from None
