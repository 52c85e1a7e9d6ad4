"""Downloads into the standard Hugging Face cache that resume across pulls, with progress, cancel and a disk check.

huggingface_hub 2.4 writes each file to a process-unique `.incomplete` name and deletes it when the download
fails, so a pull that is cancelled or killed starts the file over next time. For multi-GB weights that is not
good enough. Here each missing blob is fetched into a stable `blobs/<etag>.incomplete` file, appended to with
a Range request on the next pull, checked against the Hub's sha256, and only then renamed to `blobs/<etag>`.
snapshot_download then finds every blob in place and lays out `snapshots/` and `refs/` itself, so the cache
stays exactly what every other HF tool expects.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ChatappError, HubError
from .hub import (
    allow_patterns,
    folder_missing,
    hub_errors,
    is_network_error,
    matching,
    missing_for_loading,
    offline_error,
    pickle_only,
)
from .units import gb, mb


class DownloadCancelled(ChatappError):
    """The user stopped a download. What arrived is kept; the next pull of the same model continues from there."""


class WontFit(HubError):
    """No preset can ever fit this machine, planned from the model's headers: nothing was downloaded."""


def nothing_fits(source, hardware) -> str | None:
    """The planner's reason when no preset fits this machine even at its smallest context, from config.json and
    the safetensors headers alone (a few KB); None when one fits, or when the headers can't tell (no
    safetensors, an odd config): then the download goes ahead and loading has the last word."""
    from . import planner
    from .facts import facts_for

    try:
        plan = planner.choose(hardware, facts_for(source))
    except Exception:  # can't tell is not a refusal: the download and the loader report their own errors
        return None
    return None if plan.choice else plan.reasons[-1]


def refuse_what_cannot_fit(source, hardware: Callable[[], object], hint: str = "") -> Callable[[], None]:
    """A before_fetch for download(): raises WontFit, naming the planner's reason (and `hint`), when no preset
    fits. hardware() is asked only then, since detecting it may talk to the GPU driver."""

    def check() -> None:
        reason = nothing_fits(source, hardware())
        if reason:
            raise WontFit(f"'{source.label}' fits no preset on this machine ({reason}); nothing was downloaded{hint}")

    return check


@dataclass(frozen=True)
class Progress:
    done_bytes: int
    total_bytes: int
    bytes_per_s: float


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    etag: str
    url: str
    sha256: str | None  # the Hub's LFS hash, when the file is in LFS


def check_disk(needed: int, where: Path, free_bytes: Callable[[Path], int] | None = None) -> None:
    """Refuse before starting when the cache's disk can't hold what is left to download."""
    where = Path(where)
    probe = next((p for p in [where, *where.parents] if p.exists()), Path("/"))
    free = free_bytes(probe) if free_bytes else shutil.disk_usage(probe).free
    if needed > free:
        raise HubError(
            f"not enough disk space in {where}: the download needs {gb(needed, 2)}, "
            f"{gb(free, 2)} is free ({gb(needed - free, 2)} missing)"
        )


def download(
    repo_id: str,
    revision: str | None = None,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    free_bytes: Callable[[Path], int] | None = None,
    before_fetch: Callable[[], None] | None = None,
) -> Path:
    """The local snapshot folder of repo_id, downloading what's missing.

    before_fetch runs when files must come from the network, before any of them does: a check that raises
    to refuse (a model that can't fit here).

    progress gets byte counts a few times a second; setting cancel raises DownloadCancelled within a fraction of
    a second, at any speed, keeping what arrived. A model is only ever a snapshot once every file in it is whole
    and checked.
    """
    from huggingface_hub import constants, snapshot_download

    patterns = allow_patterns(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    with hub_errors(repo_id, revision):
        try:
            here = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:  # not in the cache yet: go to the network below
            here = None
    # huggingface_hub returns any snapshot folder it has, even one where another tool (a plan) put only config.json.
    if here is not None and folder_missing(here, allow_pickle=allow_pickle) is None:
        return here
    if here is not None and not allow_pickle and folder_missing(here) is None:
        raise HubError(pickle_only(repo_id, next(p.name for p in here.rglob("*.bin"))))
    if constants.HF_HUB_OFFLINE:
        raise offline_error(repo_id)
    meter = _Meter(progress, cancel)
    fetch = functools.partial(_from_hub, repo_id, revision, patterns, allow_pickle, free_bytes, meter, before_fetch)
    return fetch() if cancel is None else _until_cancelled(fetch, cancel, meter)


def _until_cancelled(fetch: Callable[[], Path], cancel: threading.Event, meter: _Meter) -> Path:
    """fetch() in a thread of its own, or DownloadCancelled as soon as cancel is set.

    A read from the network blocks until its block has arrived, which takes minutes from a server sending a
    few kB/s. So the caller doesn't wait for it: the thread notices cancel at its next block and ends, its
    partial file a clean prefix for the next pull, and a process that exits meanwhile doesn't wait (daemon).
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["folder"] = fetch()
        except BaseException as exc:  # handed to the caller, whatever it is
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="chatapp-download", daemon=True)
    thread.start()
    while thread.is_alive():
        if cancel.wait(0.05):
            raise meter.stopped()
        thread.join(0.05)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["folder"]


def _from_hub(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    allow_pickle: bool,
    free_bytes: Callable[[Path], int] | None,
    meter: _Meter,
    before_fetch: Callable[[], None] | None,
) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    files = _remote_files(repo_id, revision, patterns, allow_pickle)
    if before_fetch is not None:
        before_fetch()
    total = sum(f.size for f in files)
    missing = [f for f in files if not (blobs / f.etag).exists()]
    partial = sum(_size(blobs / f"{f.etag}.incomplete") for f in missing)
    check_disk(sum(f.size for f in missing) - partial, blobs, free_bytes)

    # huggingface_hub reads in 10 MiB blocks, and progress can only be told between blocks, and a killed pull
    # loses the block it was reading: 16 KiB keeps both small on a slow link.
    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, 1 << 14)
    meter.start(total, total - sum(f.size for f in missing) + partial)
    blobs.mkdir(parents=True, exist_ok=True)
    for remote in missing:
        _fetch_blob(repo_id, remote, blobs, meter)
    with hub_errors(repo_id, revision):
        # Every blob is in place, so this only writes the snapshot links and refs/<revision>.
        folder = Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=_silent_class())
        )
    meter.finish()
    return folder


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _remote_files(repo_id: str, revision: str | None, patterns: list[str], allow_pickle: bool) -> list[RemoteFile]:
    """What the download needs, pinned to one commit so that every file comes from the same revision; refused
    before any of it is fetched when the repo lacks something loading needs."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    with hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        siblings = [s for s in info.siblings or [] if matching(s.rfilename, patterns)]
        if allow_pickle and any(s.rfilename.endswith(".safetensors") for s in siblings):
            siblings = [s for s in siblings if not s.rfilename.endswith(".bin")]  # the same weights twice
        _check_loadable(repo_id, {s.rfilename for s in info.siblings or []}, {s.rfilename for s in siblings})
        files = []
        for sibling in siblings:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, sibling.rfilename, revision=info.sha))
            if meta.etag is None or meta.size is None:
                raise HubError(f"the Hub gave no ETag or size for {repo_id}/{sibling.rfilename}; can't download it")
            lfs = getattr(sibling, "lfs", None)
            files.append(
                RemoteFile(sibling.rfilename, meta.size, meta.etag, meta.location, lfs.sha256 if lfs else None)
            )
    return files


def _check_loadable(repo_id: str, in_repo: set[str], wanted: set[str]) -> None:
    lacking = missing_for_loading(wanted)
    if lacking is None:
        return
    pickles = sorted(n for n in in_repo - wanted if n.endswith(".bin") and "/" not in n)
    if pickles and missing_for_loading(wanted | set(pickles)) is None:
        raise HubError(pickle_only(repo_id, pickles[0]))
    raise HubError(f"'{repo_id}' can't be loaded: the Hub repo has no {lacking}")


def _fetch_blob(repo_id: str, remote: RemoteFile, blobs: Path, meter: _Meter) -> None:
    """Fill blobs/<etag> through a stable partial file that a later pull continues with a Range request."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    target = blobs / remote.etag
    partial = blobs / f"{remote.etag}.incomplete"
    # The same lock file huggingface_hub takes, so another HF tool never writes this blob at the same time.
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / blobs.parent.name / f"{remote.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock), hub_errors(repo_id):
        if target.exists():
            return
        if _size(partial) > remote.size:
            partial.unlink()
        partial.touch()
        with partial.open("r+b") as handle:
            resumed = handle.seek(0, os.SEEK_END)
            try:
                http_get(
                    remote.url,
                    handle,
                    resume_size=resumed,
                    headers=build_hf_headers(),
                    expected_size=remote.size,
                    displayed_filename=remote.name,
                    tqdm_class=lambda **_: meter,
                )
            except Exception as exc:
                if not is_network_error(exc):
                    raise
                handle.flush()
                raise HubError(
                    f"the connection to the Hub broke while downloading {remote.name} "
                    f"({mb(_size(partial))} of {mb(remote.size)} kept, {type(exc).__name__}); "
                    "run the pull again to continue"
                ) from None
        if remote.sha256 and _sha256(partial) != remote.sha256:
            partial.unlink()
            raise HubError(
                f"{repo_id}/{remote.name} arrived corrupted (its sha256 doesn't match the Hub's); "
                "the broken copy was deleted, run the pull again"
            )
        os.replace(partial, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _silent_class():
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        """snapshot_download's own "Fetching N files" bars, which would print under ours."""

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


class _Meter:
    """Stands in for http_get's tqdm bar: counts bytes for the progress callback and checks for cancel."""

    def __init__(self, progress, cancel):
        self.progress, self.cancel = progress, cancel
        self.total = self.done = self._start_done = 0
        self._start, self._last = time.monotonic(), 0.0

    def start(self, total: int, done: int) -> None:
        self.total, self.done, self._start_done, self._start = total, done, done, time.monotonic()

    def update(self, n: int = 1) -> None:
        # http_get rolls back with a negative n when a server ignores Range and the file starts over.
        self.done += n
        if self.cancel is not None and self.cancel.is_set():
            raise self.stopped()
        now = time.monotonic()
        if self.progress is not None and now - self._last >= 0.2:
            self._last = now
            self.progress(Progress(min(self.done, self.total), self.total, self.rate(now)))

    def stopped(self) -> DownloadCancelled:
        here = f" with {mb(min(self.done, self.total))} of {mb(self.total)} kept" if self.total else ""
        return DownloadCancelled(f"download stopped{here}; the next pull of it continues from there")

    def rate(self, now: float) -> float:
        return (self.done - self._start_done) / max(now - self._start, 1e-6)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(Progress(self.total, self.total, self.rate(time.monotonic())))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
