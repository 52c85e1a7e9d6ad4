"""Real faults for the conversation database: a small disk that fills up, and files damaged or locked on disk."""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

PAGE = 4096


@contextmanager
def small_disk(folder: Path, size: str = "2m"):
    """A tmpfs of `size` mounted at `folder`: a disk that really fills up. Skips the test where mounting is not
    allowed (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a small disk here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_up(folder: Path) -> Path:
    """Write a filler file until the disk holding `folder` has no byte left; delete it to make room again."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def damage_pages(path: Path, start: float = 0.5, end: float = 0.95) -> None:
    """Overwrite the pages from `start` to `end` (fractions of the file) with bytes SQLite can't read."""
    pages = Path(path).stat().st_size // PAGE
    with open(path, "r+b") as f:
        for page in range(max(2, int(pages * start)), int(pages * end)):
            f.seek(page * PAGE)
            f.write(b"\xa5" * PAGE)


def lock(path: Path) -> bool:
    """Make a file read-only for everyone, root included (chattr +i); chmod where we are not root."""
    if os.geteuid() == 0:
        return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    os.chmod(path, 0o400)
    return True


def unlock(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        os.chmod(path, 0o600)


def many_chats(store, chats: int = 30, messages: int = 20) -> None:
    """Chats enough for about 200 pages, so damage to some of them leaves the rest readable."""
    for i in range(chats):
        c = store.new_conversation(f"chat {i}")
        for j in range(messages):
            store.add_message(c.id, "user" if j % 2 == 0 else "assistant", f"message {j} " + "words " * 150)
