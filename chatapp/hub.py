"""The Hugging Face Hub: search, download into the standard HF cache (progress, cancel, disk check), list, delete."""

from __future__ import annotations

import fnmatch
import json
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ChatappError, HubError, ModelNotFound


class DownloadCancelled(ChatappError):
    """The user stopped a download. Finished files stay in the cache; the file in flight starts over next time."""


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int
    bytes_per_s: float

    @property
    def eta_s(self) -> float | None:
        if self.bytes_per_s <= 0:
            return None
        return max(0.0, (self.total_bytes - self.done_bytes) / self.bytes_per_s)

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


def _offline(repo_id: str) -> HubError:
    return HubError(f"'{repo_id}' is not downloaded and the Hub can't be reached (offline, or HF_HUB_OFFLINE=1)")


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
    except ChatappError:
        raise
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
        raise _offline(repo_id) from None
    except OSError as exc:
        raise HubError(f"talking to the Hub about '{repo_id}' failed: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        # Connection failures come from whichever HTTP library huggingface_hub uses underneath.
        if type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "h11", "requests", "urllib3"):
            from huggingface_hub import constants

            raise HubError(f"can't reach the Hub at {constants.ENDPOINT} ({type(exc).__name__})") from None
        raise


def remote_files(repo_id: str, revision: str | None, patterns: list[str]) -> dict[str, int]:
    """The files a download would fetch, with their sizes."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return {
        s.rfilename: int(s.size or 0)
        for s in info.siblings or []
        if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)
    }


def check_disk(needed: int, where: Path, free_bytes: Callable[[Path], int] | None = None) -> None:
    """Refuse before starting when the cache's disk can't hold what is left to download."""
    where = Path(where)
    probe = next((p for p in [where, *where.parents] if p.exists()), Path("/"))
    free = free_bytes(probe) if free_bytes else shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(
            f"not enough disk space in {where}: the download needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB is free ({(needed - free) / 1e9:.2f} GB missing)"
        )


def _cached_bytes(cache_dir: Path, repo_id: str, *, finished_only: bool = False) -> int:
    """Bytes in the cache for this repo: finished blobs, plus the .incomplete files being written unless finished_only."""
    blobs = cache_dir / f"models--{repo_id.replace('/', '--')}" / "blobs"
    if not blobs.is_dir():
        return 0
    return sum(p.stat().st_size for p in blobs.glob("*") if not (finished_only and p.suffix == ".incomplete"))


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    free_bytes: Callable[[Path], int] | None = None,
) -> Path:
    """The local snapshot folder of repo_id, downloading what's missing.

    progress gets byte counts as they arrive; setting cancel stops the download at the next block and raises
    DownloadCancelled. huggingface_hub writes each file to a uniquely named .incomplete file and renames it only
    when whole, so a stopped or killed download is never taken for a complete model. Files already finished are
    kept; the file that was in flight starts over (huggingface_hub 2.4 deletes its partial file on failure), and a
    connection that drops mid-file is resumed with a Range request within the same call.
    """
    from huggingface_hub import constants, snapshot_download

    patterns = allow_patterns(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    with hub_errors(repo_id, revision):
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not (completely) in the cache yet: go to the network below
            pass
    if constants.HF_HUB_OFFLINE:
        raise _offline(repo_id)
    cache_dir = Path(constants.HF_HUB_CACHE)
    files = remote_files(repo_id, revision, patterns)
    total = sum(files.values())
    # Partial files left by an earlier, killed pull are never reused, so they don't count as already here.
    already = _cached_bytes(cache_dir, repo_id, finished_only=True)
    check_disk(max(0, total - already), cache_dir, free_bytes)
    tracker = _tracker(total, lambda: _cached_bytes(cache_dir, repo_id), progress, cancel)
    with hub_errors(repo_id, revision):
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=tracker)
        )
    if progress:
        progress(Progress(total, total, 0.0))
    return folder


def _tracker(total: int, measure: Callable[[], int], progress, cancel):
    """A tqdm stand-in for snapshot_download's bars: on each update it checks `cancel` and, a few times a second,
    reports the bytes on disk (finished and .incomplete blobs), which doesn't depend on how the bars are wired."""
    start_bytes = measure()
    state = {"start": time.monotonic(), "last": 0.0}

    class Tracker:
        def __init__(self, *args, **kwargs):
            self.total = kwargs.get("total")
            self.n = 0

        def update(self, n=1):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download stopped; run the same pull again to finish it")
            now = time.monotonic()
            if progress is None or now - state["last"] < 0.2:
                return
            state["last"] = now
            done = min(total, measure())
            progress(Progress(done, total, (done - start_bytes) / max(now - state["start"], 1e-6)))

        def __getattr__(self, _name):
            return lambda *args, **kwargs: None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __iter__(self):
            return iter(())

    return Tracker


@dataclass(frozen=True)
class LocalModel:
    repo_id: str
    revisions: tuple[str, ...]
    size_bytes: int
    path: Path


def list_local() -> list[LocalModel]:
    """Models in the standard HF cache, biggest first."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    models = [
        LocalModel(r.repo_id, tuple(sorted(rev.commit_hash[:12] for rev in r.revisions)), r.size_on_disk, r.repo_path)
        for r in info.repos
        if r.repo_type == "model"
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
                search=text, pipeline_tag="text-generation", sort="downloads", limit=limit,
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

    from .facts import facts_from_config

    with hub_errors(repo_id, revision):
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        metadata = get_safetensors_metadata(repo_id, revision=revision)
    return facts_from_config(repo_id, config, sum(metadata.parameter_count.values()))
