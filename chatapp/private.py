"""Chats, logs, exports and KV snapshots are the user's alone: folders we make are 0700, files 0600."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Make a folder only the user can enter. One that exists is left as the user set it (it may be theirs,
    e.g. a data_dir in their home); the files we put in it are private anyway."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask
    return path


def private_file(path: Path) -> None:
    """Make a file (and SQLite's -wal and -shm beside a database) readable by the user only."""
    for candidate in (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            os.chmod(candidate, 0o600)
        except FileNotFoundError:
            pass


def write_private_text(path: Path, text: str) -> None:
    """Write a whole file, private, through a temporary file renamed into place: a full disk leaves nothing
    half-written behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
