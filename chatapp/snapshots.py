"""KV cache snapshots on disk: where they live, what each holds, the disk budget. Imports no torch.

A snapshot is one safetensors file per chat and model key: the cache's tensors, an `ids` tensor with the
exact token ids the cache holds, and our metadata (the key, the chat, the model) in the header. The engine
writes and reads the tensors (chatapp.engine.snapshot); the UI and `chatapp cache` only need this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

#: Bump when the file layout or the meaning of the key changes: older snapshots then no longer match.
FORMAT_VERSION = 1
SUFFIX = ".kv.safetensors"
#: A snapshot budget never takes more than this share of the disk's free space.
MAX_FREE_SHARE = 0.25
#: A temporary file older than this is what a killed writer left behind.
STALE_TMP_S = 3600


def kv_dir(data_dir: Path) -> Path:
    return data_dir / "kv"


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def path_for(folder: Path, chat_id: int, key: dict) -> Path:
    return folder / f"chat{chat_id}-{key_hash(key)}{SUFFIX}"


@dataclass
class SnapshotInfo:
    path: Path
    chat_id: int
    model: str
    preset: str
    tokens: int
    size_bytes: int
    #: Last written or restored: the disk budget drops the oldest first.
    used: float
    key_hash: str

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.used)


class SnapshotError(Exception):
    pass


def read_header(path: Path) -> tuple[dict, dict]:
    """A safetensors file's tensor table and our metadata, read without loading any tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SnapshotError("it is shorter than a header")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise SnapshotError("its header length is not plausible")
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"its header can't be read ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    try:
        ours = json.loads(meta["chatapp"])
    except (KeyError, ValueError):
        raise SnapshotError("it has no chatapp metadata") from None
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + length + end > size:
        raise SnapshotError(f"it is truncated ({size:,} of {8 + length + end:,} bytes)")
    return header, ours


def info(path: Path) -> SnapshotInfo:
    _tensors, meta = read_header(path)
    try:
        return SnapshotInfo(
            path=path,
            chat_id=int(meta["chat_id"]),
            model=str(meta["key"]["model"]),
            preset=str(meta["key"]["preset"]),
            tokens=int(meta["tokens"]),
            size_bytes=path.stat().st_size,
            used=path.stat().st_mtime,
            key_hash=str(meta["key_hash"]),
        )
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise SnapshotError(f"its metadata is incomplete ({exc})") from None


def list_snapshots(folder: Path) -> tuple[list[SnapshotInfo], list[Path]]:
    """The readable snapshots, most recently used first, and the files that are not (corrupt, foreign)."""
    good, bad = [], []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        try:
            good.append(info(path))
        except SnapshotError:
            bad.append(path)
    good.sort(key=lambda s: s.used, reverse=True)
    return good, bad


def remove(paths) -> int:
    """Delete files; the bytes freed."""
    freed = 0
    for path in paths:
        try:
            size = path.stat().st_size
            path.unlink()
            freed += size
        except FileNotFoundError:
            pass
    return freed


def delete(folder: Path, *, chat_id: int | None = None, model: str | None = None) -> tuple[int, int]:
    """Delete the snapshots of one chat, of one model, or all; (files, bytes) removed. Corrupt files go too
    when everything is cleared."""
    good, bad = list_snapshots(folder)
    chosen = [s.path for s in good if (chat_id is None or s.chat_id == chat_id) and (model is None or s.model == model)]
    if chat_id is not None:
        # A chat's files are named after it, so even one whose header broke goes with its chat.
        chosen += [p for p in bad if p.name.startswith(f"chat{chat_id}-")]
    elif model is None:
        chosen += bad
    return len(chosen), remove(chosen)


def budget_bytes(folder: Path, configured_gb: float) -> int:
    """The configured budget, but never more than MAX_FREE_SHARE of the free disk (free space counts what the
    snapshots already hold, since dropping them frees it)."""
    folder.mkdir(parents=True, exist_ok=True)
    held = sum(s.size_bytes for s in list_snapshots(folder)[0])
    free = shutil.disk_usage(folder).free + held
    return int(min(configured_gb * 1e9, free * MAX_FREE_SHARE))


def enforce_budget(folder: Path, budget: int, keep: Path | None = None) -> list[SnapshotInfo]:
    """Delete least recently used snapshots until the rest fit the budget; `keep` goes last. Also clears
    temporary files a killed writer left. Returns what was deleted."""
    now = time.time()
    for tmp in folder.glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass
    good, _bad = list_snapshots(folder)
    order = sorted(good, key=lambda s: (s.path == keep, s.used))  # oldest first, the one just written last
    total = sum(s.size_bytes for s in good)
    gone = []
    for snap in order:
        if total <= budget:
            break
        remove([snap.path])
        total -= snap.size_bytes
        gone.append(snap)
    return gone


def private_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder
